"""Fairness on a fake clock: shares in proportion to expected use, credit capped, debt paid
back, and no request starved (large ones behind small ones, or behind fresh tokens).
"""

from __future__ import annotations

import itertools

import pytest
from scheduler_client import Client
from scheduler_world import (
    EPS,
    HOLDER,
    ME,
    STEP_BUDGET,
    Backlog,
    Env,
    capacity,
    concurrency,
    granted,
    jain,
    rate,
)

from ray_quota._core.protocol import Grant
from ray_quota._core.scheduler import Policy
from ray_quota._spec import Kind

# ================================================================================ weighted fairness


@pytest.mark.parametrize("poll_every", [None, 0.01], ids=["at-wakeups", "every-10ms"])
@pytest.mark.parametrize("amounts", [(100, 200, 400), (50, 50, 50)], ids=["amount=eu", "equal"])
def test_backlogged_tokens_share_in_proportion_to_expected_use(
        amounts: tuple[int, ...], poll_every: float | None) -> None:
    # How often the executor happens to poll must not change the shares.
    env = Env(rate(value=700, burst=400))
    weights = (100, 200, 400)
    tokens = [env.token("r", w) for w in weights]
    backlog = Backlog(env, poll_every=poll_every)
    for token, amount in zip(tokens, amounts, strict=True):
        backlog.add(token, amount)
    backlog.run(until=lambda: min(backlog.count(t) for t in tokens) >= 60)

    total = sum(backlog.units(t) for t in tokens)
    shares = [backlog.units(t) / total for t in tokens]
    targets = [w / sum(weights) for w in weights]
    for share, target in zip(shares, targets, strict=True):
        assert abs(share - target) <= 0.05 * target, (shares, targets)
    assert jain([s / t for s, t in zip(shares, targets, strict=True)]) >= 0.99


def test_one_token_alone_uses_at_least_95_percent_of_a_rate_limit() -> None:
    env = Env(rate(value=100, burst=50))
    token = env.token("r", 10)
    backlog = Backlog(env)
    backlog.add(token, 10)
    start_units = backlog.units(token)  # the initial burst does not count towards the rate
    backlog.run_for(600.0)
    assert backlog.units(token) - start_units >= 0.95 * 100 * 600


def test_one_token_alone_with_a_local_lease_uses_at_least_95_percent_of_a_rate_limit() -> None:
    env = Env(rate(value=1000, burst=1000), policy=Policy(lease_ttl_s=2.0))
    client = Client(env, env.token("r", 20), Kind.RATE, max_prefetch=200)
    used, next_renew = 0, 0.5
    for step in itertools.count():
        assert step < STEP_BUDGET, "the client loop makes no progress"
        if env.now >= 60.0:
            break
        if env.now >= next_renew:
            client.renew()
            next_renew += 0.5
        held = client.reserve(20)
        if held.ticket is not None and held.ticket.outcome is None:
            wakeup = env.sched.next_wakeup()
            assert wakeup is not None
            env.clock.set(min(max(wakeup, env.now), next_renew))
            env.sched.poll()
            if not client.finish(held):
                env.sched.cancel(held.ticket)
                continue
        client.commit(held, 20)
        used += 20
    assert used >= 0.95 * 1000 * 60


def test_client_loop_serves_most_reservations_locally() -> None:
    env = Env(rate(value=100_000, burst=20_000), policy=Policy(lease_ttl_s=2.0))
    client = Client(env, env.token("r", 10), Kind.RATE, max_prefetch=1000)
    for i in range(2000):
        env.clock.advance(0.001)
        if i % 250 == 0:
            client.renew()
        held = client.reserve(10)
        assert client.finish(held)
        client.commit(held, 10)
    assert client.asked <= 2000 / 20  # prefetch grew: about one ask per 100 reservations


def test_waiter_that_fits_is_granted_without_waiting_for_a_poll() -> None:
    env = Env(concurrency(value=2))
    a, b = env.token("k", 1), env.token("k", 1)
    env.acquire(a, 2)
    waiting = env.acquire(b, 1)
    assert waiting.outcome is None
    env.sched.give_back(a, HOLDER, 1)
    assert granted(waiting) == 1


def test_small_waiter_fills_free_slots_while_a_large_head_is_blocked() -> None:
    env = Env(concurrency(value=4))
    big, small = env.token("k", 4), env.token("k", 1)
    holder_token = env.token("k", 4)
    env.acquire(holder_token, 3)
    head = env.acquire(big, 4)  # the lowest pass: it is the head, and it cannot fit
    backfill = env.acquire(small, 1)
    assert head.outcome is None
    assert granted(backfill) == 1


@pytest.mark.parametrize("credit_factor", [1.0, 3.0])
def test_idle_token_gains_at_most_max_credit(credit_factor: float) -> None:
    env = Env(rate(value=100, burst=100), policy=Policy(credit_factor=credit_factor))
    busy, idle = env.token("r", 100), env.token("r", 100)
    backlog = Backlog(env)
    backlog.add(busy, 100)
    backlog.run_for(1000.0)
    joined = len(backlog.log)  # grants from here on happened with both tokens backlogged
    backlog.add(idle, 100)
    backlog.run_for(100.0)

    # Normalised advantage of the returning token over the busy one, after every grant.
    advantage, worst = 0.0, 0.0
    for _, token, units in backlog.log[joined:]:
        advantage += units / 100 if token == idle else -units / 100
        worst = max(worst, advantage)
    one_grant = 1.0
    assert worst <= credit_factor + one_grant + EPS
    assert worst >= credit_factor  # and it does get the credit it saved
    # Afterwards they alternate.
    late = env.now - 50.0
    assert abs(backlog.count(idle, late) - backlog.count(busy, late)) <= 1


def test_new_token_starts_with_no_credit() -> None:
    env = Env(rate(value=100, burst=100))
    busy = env.token("r", 100)
    backlog = Backlog(env)
    backlog.add(busy, 100)
    backlog.run_for(100.5)
    fresh = env.token("r", 100)
    assert env.sched.credit(fresh) <= EPS


def test_new_token_does_not_go_before_tokens_already_waiting() -> None:
    env = Env(rate(value=100, burst=100))
    busy = env.token("r", 100)
    backlog = Backlog(env)
    backlog.add(busy, 100)
    backlog.run_for(100.5)  # busy's next request waits for the bucket
    waiting = backlog.tickets[busy]
    assert waiting.outcome is None
    fresh = env.token("r", 100)
    mine = env.acquire(fresh, 100)
    env.step()
    assert isinstance(waiting.outcome, Grant)
    assert mine.outcome is None


def test_overuse_delays_the_token_then_it_returns_to_its_fair_share() -> None:
    env = Env(rate(value=100, burst=100))
    a, b = env.token("r", 100), env.token("r", 100)
    overuse_at: list[float] = []

    def use(token: str, amount: int) -> int:
        if token == a and not overuse_at and env.now >= 20.0:
            overuse_at.append(env.now)
            return amount + 500  # five grants' worth of debt
        return amount

    backlog = Backlog(env, use)
    backlog.add(a, 100)
    backlog.add(b, 100)
    backlog.run_for(20.0)
    assert abs(backlog.count(a) - backlog.count(b)) <= 1  # fair before
    backlog.run_for(1.0)
    assert overuse_at
    debt_at = overuse_at[0]
    assert env.sched.credit(a) < env.sched.credit(b) - 400  # the debt is on the token

    # Debt: b gets about five grants (the debt) before a gets its next one.
    next_a = min(t for t, tok, _ in backlog.log if tok == a and t > debt_at) \
        if backlog.count(a, debt_at + EPS) else None
    while next_a is None:
        assert env.now < debt_at + 120.0, "the indebted token was never served again"
        backlog.run_for(1.0)
        later = [t for t, tok, _ in backlog.log if tok == a and t > debt_at]
        next_a = min(later) if later else None
    b_between = sum(1 for t, tok, _ in backlog.log if tok == b and debt_at < t < next_a)
    assert b_between >= 5
    # The pool was charged too: nobody was granted for the 500 units of debt.
    assert next_a - debt_at >= 5.0

    # Recovery: over a long later stretch the shares are even again.
    recovered = env.now
    backlog.run_for(200.0)
    ca, cb = backlog.count(a, recovered), backlog.count(b, recovered)
    assert ca >= 50 and cb >= 50
    assert abs(ca - cb) <= 0.05 * (ca + cb) / 2


# ================================================================================= no starvation


def test_large_request_is_granted_in_bounded_time_under_a_stream_of_small_ones() -> None:
    policy = Policy()
    env = Env(rate(value=100, burst=100), policy=policy)
    small = [env.token("r", 10) for _ in range(4)]
    large = env.token("r", 10)  # a small weight asking for the whole burst
    backlog = Backlog(env)
    for token in small:
        backlog.add(token, 10)
    backlog.run_for(30.0)
    asked_at = env.now
    ticket = env.acquire(large, 100)
    while ticket.outcome is None:
        assert env.now - asked_at < 60.0, "the large request starved"
        env.step()
        backlog.harvest()
    waited = env.now - asked_at
    # At most: one turn for each small token, the bypass budget, then its own 100 units.
    bound = (len(small) * 10 + 100 * policy.bypass_factor + 100) / 100
    assert waited <= bound + EPS
    assert granted(ticket) == 100


def test_large_request_is_not_starved_by_a_stream_of_fresh_tokens() -> None:
    # Tasks that each open a fresh token (no token in scope) and reserve once.
    env = Env(rate(value=100, burst=100))
    large = env.token("r", 100)
    env.commit(large, granted(env.acquire(large, 100)))
    ticket = env.acquire(large, 100)
    asked_at = env.now
    for _ in range(10_000):
        if ticket.outcome is not None or env.now - asked_at >= 60.0:
            break
        fresh = env.token("r", 10)
        small = env.acquire(fresh, 10)
        while small.outcome is None and ticket.outcome is None:
            env.step()
        if isinstance(small.outcome, Grant):
            env.commit(fresh, 10)
        env.sched.close_token(fresh, 0, ME)
    assert ticket.outcome is not None, "the large request starved behind fresh tokens"
    assert env.now - asked_at <= 10.0


def test_blocked_head_lets_smaller_waiters_past_only_up_to_its_own_amount() -> None:
    env = Env(concurrency(value=10))
    head_token = env.token("k", 10)
    others = [env.token("k", 10) for _ in range(20)]
    filler = env.token("k", 1)
    env.acquire(filler, 10)
    head = env.acquire(head_token, 6)  # the head: the lowest pass, asked first
    tickets = [env.acquire(t, 1) for t in others]  # each would finish before the head
    for _ in range(10):
        env.sched.give_back(filler, HOLDER, 1)
    served = sum(1 for t in tickets if isinstance(t.outcome, Grant))
    assert served == 6  # bypassed by its own amount, then everyone waits for the head
    for t in tickets:
        if isinstance(t.outcome, Grant):
            env.sched.give_back(t.token_id, HOLDER, 1)
    assert granted(head) == 6


def test_only_waiters_that_would_finish_first_may_pass_a_blocked_head() -> None:
    # A token of small requests must not take a large request's share by slipping past it.
    env = Env(capacity(value=20))
    head_token, light, filler = env.token("c", 10), env.token("c", 1), env.token("c", 1)
    granted(env.acquire(filler, 18))
    env.commit(light, granted(env.acquire(light, 1)))
    env.sched.give_back(light, HOLDER, debt=1)  # light is now further on than the head
    head = env.acquire(head_token, 6)  # finishes at its pass + 0.6
    small = env.acquire(light, 2)  # starts later and finishes at its pass + 2: after the head
    env.sched.give_back(filler, HOLDER, 4)
    assert head.outcome is None and small.outcome is None
    env.sched.give_back(filler, HOLDER, 2)
    assert granted(head) == 6


def test_a_holder_asking_for_nothing_more_stops_slowing_virtual_time() -> None:
    """A token holding units of a reservation it keeps open, asking for nothing more, counts as
    active only until its credit is full. Counted for as long as it held, it slowed virtual
    time to half the pace of the one token really competing, so that a token entering at
    virtual time went before that token's waiting request."""
    env = Env(rate(value=100, burst=100))
    holder = env.token("r", 100)
    assert granted(env.acquire(holder, 50)) == 50  # kept open throughout (its lease renewed)
    busy = env.token("r", 100)
    backlog = Backlog(env)
    backlog.add(busy, 100)
    backlog.run_for(100.5)  # busy's next request waits for the bucket
    assert env.sched.credit(busy) >= -100 - EPS  # virtual time kept up with it
    waiting = backlog.tickets[busy]
    assert waiting.outcome is None
    fresh = env.token("r", 100)
    mine = env.acquire(fresh, 100)
    env.step()
    assert isinstance(waiting.outcome, Grant)
    assert mine.outcome is None
