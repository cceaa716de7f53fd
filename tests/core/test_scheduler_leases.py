"""Leases: expiry and renewal, prefetch, settling running totals, recalls, and keys that ended."""

from __future__ import annotations

import pytest
from scheduler_client import Client
from scheduler_world import (
    HOLDER,
    Env,
    capacity,
    concurrency,
    granted,
    rate,
)

from ray_quota._core.protocol import Grant
from ray_quota._core.scheduler import Policy
from ray_quota._spec import Kind

# =================================================================================== leases


def test_lease_expires_when_the_holder_stops_renewing() -> None:
    env = Env(concurrency(value=3), rate(value=10, burst=10), capacity(value=50),
              policy=Policy(lease_ttl_s=5.0))
    tk, tr, tc = env.token("k", 1), env.token("r", 1), env.token("c", 1)
    for token, amount in ((tk, 3), (tr, 10), (tc, 20)):
        granted(env.acquire(token, amount, holder="dead"))
    env.clock.set(4.9)
    env.sched.poll()
    assert env.sched.held(tk, "dead") == 3
    assert env.status("k").available == 0
    env.clock.set(5.0)
    env.sched.poll()
    assert env.sched.lease_expiries == 3
    assert [env.sched.held(t, "dead") for t in (tk, tr, tc)] == [0, 0, 0]
    assert env.sched.renew("dead") == {}
    # Concurrency slots come back; rate and capacity units stay charged (they may have been used).
    assert env.status("k").available == 3
    assert env.status("c").available == 30
    assert env.sched.pool("r").level(5.0) == pytest.approx(10.0)  # refill only: capped at burst
    assert all(s.leases == 0 and s.leased_units == 0 for s in env.sched.status())


def test_rate_units_of_an_expired_lease_are_not_returned() -> None:
    env = Env(rate(value=1, burst=10), policy=Policy(lease_ttl_s=2.0))
    token = env.token("r", 1)
    granted(env.acquire(token, 10, holder="dead"))
    env.clock.set(2.0)
    env.sched.poll()
    assert env.sched.held(token, "dead") == 0
    assert env.status("r").available == 2  # what refilled, nothing more
    env.sched.give_back(token, "dead", 10)  # a late give-back of an expired lease is ignored
    assert env.status("r").available == 2


def test_renewing_keeps_a_lease_alive_past_its_ttl() -> None:
    env = Env(concurrency(value=2), policy=Policy(lease_ttl_s=5.0))
    a, b = env.token("k", 1), env.token("k", 1)
    env.acquire(a, 1, holder="alive")
    for t in (4.0, 8.0, 12.0):
        env.clock.set(t)
        env.keep_alive()  # its process names b, which it holds idle
        env.sched.poll()
        assert env.sched.renew("alive") == {a: False}
    waiting = env.acquire(b, 2)
    assert env.sched.renew("alive") == {a: True}  # others wait: give spare back soon
    env.clock.set(16.9)
    env.sched.poll()
    assert env.sched.held(a, "alive") == 1
    assert waiting.outcome is None
    env.clock.set(17.0)
    env.sched.poll()
    assert env.sched.held(a, "alive") == 0
    assert granted(waiting) == 2  # the expired slot went straight to the waiter


def test_debt_reported_after_the_lease_expired_is_still_charged() -> None:
    # A call overran while its process was stalled past the TTL; the overuse is reported late.
    env = Env(capacity(value=100), policy=Policy(lease_ttl_s=1.0))
    token = env.token("c", 10)
    granted(env.acquire(token, 10))
    env.clock.set(1.0)
    env.sched.poll()
    env.sched.settle(token, HOLDER, returned=0, used=10, debt=50)  # overuse is never lost
    assert env.status("c").in_use == 60


def test_concurrency_slots_reported_as_used_are_still_freed() -> None:
    # A slot is never consumed: settling it as "used" must free it like giving it back.
    env = Env(concurrency(value=2), policy=Policy(lease_ttl_s=1.0))
    token = env.token("k", 1)
    env.acquire(token, 2)
    env.sched.give_back(token, HOLDER, used=2)
    env.clock.set(10.0)
    env.sched.poll()
    assert env.status("k").available == 2


def test_grant_carries_prefetch_only_when_nobody_waits() -> None:
    env = Env(rate(value=10, burst=100), policy=Policy(max_lease_fraction=0.1))
    a, b = env.token("r", 10), env.token("r", 10)
    assert granted(env.acquire(a, 10, prefetch=50)) == 10 + 10  # capped at 10% of the ceiling
    assert granted(env.acquire(a, 75, prefetch=50)) == 75 + 5  # capped by what is left
    assert env.sched.held(a, HOLDER) == 100
    first = env.acquire(b, 5, prefetch=10)
    second = env.acquire(a, 5, prefetch=10)
    env.sched.give_back(a, HOLDER, 10)  # room for both: the first is granted while one waits
    assert isinstance(first.outcome, Grant) and first.outcome.units == 5
    assert first.outcome.contended
    assert isinstance(second.outcome, Grant) and second.outcome.units == 5


def test_prefetched_units_given_back_refund_the_tokens_pass() -> None:
    # What a token gives back pulls its pass back by the units: credit against the other
    # active tokens (virtual time also gives back what the unused units' grant moved it).
    env = Env(rate(value=10, burst=100),
              policy=Policy(max_lease_fraction=0.5, credit_factor=10.0))
    a, b = env.token("r", 10), env.token("r", 10)
    granted(env.acquire(b, 10, holder="other"))  # b holds units: both are active
    assert granted(env.acquire(a, 10, prefetch=40)) == 50
    gap = env.sched.credit(a) - env.sched.credit(b)
    env.sched.give_back(a, HOLDER, 40, used=10)
    assert env.sched.credit(a) - env.sched.credit(b) == pytest.approx(gap + 40)


def test_settle_applies_running_totals_once() -> None:
    env = Env(capacity(value=100))
    token = env.token("c", 10)
    granted(env.acquire(token, 40))
    env.sched.settle(token, HOLDER, returned=10, used=5, debt=3)
    after_first = env.snapshot([token])
    assert env.sched.held(token, HOLDER) == 25
    assert env.status("c").in_use == 40 - 10 + 3
    env.sched.settle(token, HOLDER, returned=10, used=5, debt=3)  # the same report again
    env.sched.settle(token, HOLDER, returned=4, used=1, debt=0)  # an older one, late
    assert env.snapshot([token]) == after_first
    env.sched.settle(token, HOLDER, returned=15, used=5, debt=3)  # only the news counts
    assert env.sched.held(token, HOLDER) == 20
    assert env.status("c").in_use == 40 - 15 + 3


def test_final_settle_returns_what_the_executor_still_counts_and_ends_the_lease() -> None:
    env = Env(concurrency(value=4))
    token = env.token("k", 1)
    granted(env.acquire(token, 3))
    env.sched.settle(token, HOLDER, returned=1, used=0, debt=0, final=True)
    assert env.sched.held(token, HOLDER) == 0
    assert env.status("k").available == 4
    assert env.sched.renew_lease(token, HOLDER) is None
    assert env.sched.renew(HOLDER) == {}


def test_settle_of_an_expired_lease_changes_nothing() -> None:
    env = Env(capacity(value=100), policy=Policy(lease_ttl_s=1.0))
    token = env.token("c", 10)
    granted(env.acquire(token, 40))
    env.clock.set(1.0)
    env.sched.poll()
    before = env.sched.status()
    env.sched.settle(token, HOLDER, returned=40, used=0, debt=0, final=True)
    assert env.sched.status() == before  # expiry settled it: the 40 units stay charged


def test_renew_lease_extends_one_lease_and_says_when_it_is_gone() -> None:
    env = Env(concurrency(value=2), policy=Policy(lease_ttl_s=5.0))
    a, b = env.token("k", 1), env.token("k", 1)
    granted(env.acquire(a, 1))
    env.clock.set(4.0)
    assert env.sched.renew_lease(a, HOLDER) is False
    waiting = env.acquire(b, 2)
    assert env.sched.renew_lease(a, HOLDER) is True  # others wait
    env.clock.set(8.9)
    env.sched.poll()
    assert env.sched.held(a, HOLDER) == 1
    env.clock.set(9.0)
    env.sched.poll()
    assert env.sched.renew_lease(a, HOLDER) is None
    assert granted(waiting) == 2


def test_holders_are_recalled_when_someone_starts_waiting() -> None:
    env = Env(capacity(value=100), policy=Policy(max_lease_fraction=0.5))
    a, b = env.token("c", 10), env.token("c", 10)
    assert granted(env.acquire(a, 40, holder="p1", prefetch=50)) == 90
    assert env.sched.take_recalls() == {}
    waiting = env.acquire(b, 20, holder="p2")
    assert waiting.outcome is None
    assert env.sched.take_recalls() == {"p1": {a}}
    assert env.sched.take_recalls() == {}  # drained
    env.sched.settle(a, "p1", returned=50, used=0, debt=0)  # p1 gives its spare back
    assert granted(waiting) == 20


def test_set_limit_recalls_spare_units() -> None:
    env = Env(capacity(value=100), policy=Policy(max_lease_fraction=0.5))
    a = env.token("c", 10)
    granted(env.acquire(a, 10, holder="p1", prefetch=50))
    env.sched.set_limit(capacity(value=60))
    assert env.sched.take_recalls() == {"p1": {a}}


def test_final_settle_never_hands_back_units_it_granted_meanwhile() -> None:
    # A process closes its token while another of its threads waits under the same lease key.
    env = Env(concurrency(value=1))
    token, other = env.token("k", 1), env.token("k", 1)
    granted(env.acquire(token, 1))
    waiting = env.acquire(token, 1)
    env.sched.settle(token, HOLDER, returned=1, used=0, debt=0, final=True)
    if isinstance(waiting.outcome, Grant):  # the waiter got the slot: it must stay counted
        assert env.status("k").in_use == 1
        assert env.acquire(other, 1, holder="p2").outcome is None, "one slot, two holders"


def test_holder_reusing_its_key_after_its_lease_expired_cannot_reuse_a_freed_slot() -> None:
    # A stalled process's lease expired and its slot was freed (its holder is presumed dead).
    # The process resumes: its stale reservation must not turn into a spare slot that the
    # executor does not count.
    env = Env(concurrency(value=2), policy=Policy(lease_ttl_s=10.0))
    hog = env.token("k", 1)
    granted(env.acquire(hog, 1, holder="elsewhere"))
    client = Client(env, env.token("k", 1), Kind.CONCURRENCY)
    a = client.reserve(1)  # reservation A, open through the stall
    assert client.finish(a)
    big = client.reserve(2, timeout=13.0)  # another thread waits: the token stays in use
    assert big.ticket is not None and big.ticket.outcome is None
    env.clock.set(9.0)
    env.sched.renew("elsewhere")
    env.clock.set(12.0)
    env.sched.poll()  # the stalled process's lease expired; A's slot is free again
    b = client.reserve(1)  # reservation B
    env.clock.set(13.0)
    env.sched.poll()  # the big one times out; B is granted
    assert client.finish(b)
    client.commit(a, 1)  # A ends
    c = client.reserve(1)  # reservation C
    in_use = 1 + 1 + (1 if client.finish(c) else 0)  # the hog, B and C
    assert in_use <= 2, "more slots in use than the limit"


def test_request_waiting_while_its_lease_expired_cannot_overdraw_a_budget() -> None:
    # The process stalled past the TTL while one of its requests waited. Granted afterwards, it
    # must not land in a fresh lease under the old key, where the old lease's running totals
    # (10 returned) would give back units that are reserved.
    env = Env(capacity(value=100), policy=Policy(lease_ttl_s=10.0))
    hog = env.token("c", 10)
    client = Client(env, env.token("c", 10), Kind.CAPACITY)
    first = client.reserve(10)
    client.commit(first, 0)
    env.clock.set(1.0)
    client.renew(keep_spare=False)  # totals now say: 10 returned
    granted(env.acquire(hog, 60, holder="elsewhere"))
    waiting = client.reserve(50)  # 40 free: waits, and keeps the token in use
    assert waiting.ticket is not None and waiting.ticket.outcome is None
    env.clock.set(9.0)
    env.sched.renew("elsewhere")
    env.clock.set(12.0)
    env.sched.poll()  # the stalled process's lease expired
    env.sched.give_back(hog, "elsewhere", 60)
    if client.finish(waiting):
        env.clock.set(12.5)
        client.renew()
        assert waiting.lease.held == 50
        assert env.sched.held(client.token, waiting.lease.key) >= 50
        assert env.status("c").in_use >= 50, "budget handed out twice"


def test_late_renewal_does_not_leak_concurrency_slots() -> None:
    # A holder keeps a free slot as spare; one renewal comes after its trust ran out but before
    # the executor's TTL. The holder forfeits the slot; the executor must not keep it for ever.
    env = Env(concurrency(value=2), policy=Policy(lease_ttl_s=10.0))
    holder = Client(env, env.token("k", 1), Kind.CONCURRENCY)
    held = holder.reserve(1)
    holder.commit(held, 1)  # the slot stays in the lease as spare
    env.clock.set(1.0)
    holder.renew()
    env.clock.set(9.5)  # trusted until 9.0, expires at 11.0
    holder.renew()
    assert holder.lease.held == 0  # the holder has let the slot go
    other = env.token("k", 1)
    ticket = env.acquire(other, 2, holder="elsewhere")
    for t in range(10, 60, 3):  # the holder process lives on and keeps renewing
        env.clock.set(float(t))
        env.sched.poll()
        holder.renew()
    assert isinstance(ticket.outcome, Grant), "a forfeited slot stays leased for ever"
