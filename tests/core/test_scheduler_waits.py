"""Waiting: estimated waits, enforcement (throttle, reject, terminate), limits changed at run
time, and when the scheduler next has something to do.
"""

from __future__ import annotations

import pytest
from scheduler_world import (
    EPS,
    HOLDER,
    ME,
    Backlog,
    Env,
    capacity,
    concurrency,
    granted,
    rate,
)

from ray_quota._core.protocol import RECALL_GRACE_S, Grant
from ray_quota._core.scheduler import Policy
from ray_quota._errors import (
    FailedReservation,
    InvalidAmountError,
    QuotaTerminated,
    TokenClosedError,
    TokenStateError,
    UnknownResourceError,
)
from ray_quota._spec import Enforcement, ResourceSpec

# ================================================================================ estimated wait


def test_estimated_wait_with_an_empty_queue_is_exact() -> None:
    env = Env(rate(value=8, burst=16))  # 8 units/s
    token = env.token("r", 4)
    env.commit(token, granted(env.acquire(token, 16)))
    env.clock.advance(0.25)  # the refill phase: 2 units in the bucket
    estimate = env.sched.estimate_wait(token, 6)
    assert estimate == pytest.approx(0.5)
    ticket = env.acquire(token, 6)
    assert ticket.outcome is None
    start = env.now
    assert env.wait_for(ticket) - start == pytest.approx(estimate, abs=EPS)


def test_estimated_wait_counts_the_waiters_ahead() -> None:
    env = Env(rate(value=10, burst=10))
    me, a, b = env.token("r", 10), env.token("r", 10), env.token("r", 10)
    env.commit(me, granted(env.acquire(me, 10)))  # my pass is now behind theirs; bucket empty
    ta, tb = env.acquire(a, 4), env.acquire(b, 3)
    estimate = env.sched.estimate_wait(me, 5)
    assert estimate == pytest.approx(1.2)
    mine = env.acquire(me, 5)
    env.wait_for(mine)
    assert ta.outcome is not None and tb.outcome is not None
    assert env.now == pytest.approx(estimate, abs=EPS)


def test_estimated_wait_counts_every_queued_request_that_will_go_first() -> None:
    # Another token with two requests queued: both pass before mine.
    env = Env(rate(value=10, burst=10))
    me, a = env.token("r", 10), env.token("r", 10)
    env.commit(me, granted(env.acquire(me, 10)))
    a1, a2 = env.acquire(a, 3), env.acquire(a, 3)
    estimate = env.sched.estimate_wait(me, 4)
    mine = env.acquire(me, 4)
    env.wait_for(mine)
    assert a1.outcome is not None and a2.outcome is not None
    assert env.now == pytest.approx(estimate, abs=EPS)


def test_estimated_wait_counts_my_own_earlier_requests() -> None:
    env = Env(rate(value=10, burst=10))
    me = env.token("r", 10)
    env.commit(me, granted(env.acquire(me, 10)))
    first = env.acquire(me, 3)
    estimate = env.sched.estimate_wait(me, 4)
    second = env.acquire(me, 4)
    env.wait_for(second)
    assert first.outcome is not None
    assert env.now == pytest.approx(estimate, abs=EPS)


def test_reject_fails_at_once_with_the_exact_wait_to_retry_after() -> None:
    env = Env(rate(value=10, burst=10, enforcement=Enforcement.REJECT))
    token = env.token("r", 10)
    env.commit(token, granted(env.acquire(token, 8)))
    env.clock.advance(0.1)  # 3 units in the bucket
    before = env.snapshot([token])
    ticket = env.acquire(token, 7)
    error = ticket.outcome
    assert isinstance(error, FailedReservation)
    assert (error.resource, error.amount) == ("r", 7)
    assert error.estimated_wait_s == pytest.approx(0.4)
    assert env.snapshot([token]) == before  # a rejected request takes nothing
    env.clock.advance(error.estimated_wait_s - 1e-3)
    assert isinstance(env.acquire(token, 7).outcome, FailedReservation)
    env.clock.advance(1e-3)
    assert granted(env.acquire(token, 7)) == 7


def test_reject_waits_when_the_estimate_is_within_the_wait_limit() -> None:
    env = Env(rate(value=10, burst=10, enforcement=Enforcement.REJECT, wait_limit_s=1.0))
    token = env.token("r", 10)
    env.commit(token, granted(env.acquire(token, 10)))
    ticket = env.acquire(token, 5)  # 0.5 s away
    assert ticket.outcome is None
    assert env.wait_for(ticket) == pytest.approx(0.5)
    assert granted(ticket) == 5


def test_reject_fails_at_once_when_the_estimate_exceeds_the_wait_limit() -> None:
    env = Env(rate(value=10, burst=10, enforcement=Enforcement.REJECT, wait_limit_s=1.0))
    token = env.token("r", 10)
    env.commit(token, granted(env.acquire(token, 10)))
    ticket = env.acquire(token, 10, timeout=None)
    assert ticket.outcome is None  # exactly 1.0 s away: within the limit
    late = env.acquire(token, 5)  # 1.5 s away, behind the first
    assert isinstance(late.outcome, FailedReservation)
    assert late.outcome.estimated_wait_s == pytest.approx(1.5)


def test_request_ready_exactly_at_its_deadline_is_granted() -> None:
    # The estimate said the units come at the deadline, so the waiter stayed; it must get them.
    env = Env(rate(value=8, burst=8, enforcement=Enforcement.REJECT, wait_limit_s=0.5))
    token = env.token("r", 8)
    env.commit(token, granted(env.acquire(token, 8)))
    ticket = env.acquire(token, 4)
    assert ticket.outcome is None
    env.wait_for(ticket)
    assert env.now == 0.5
    assert granted(ticket) == 4


@pytest.mark.parametrize("spec", [capacity(enforcement=Enforcement.REJECT),
                                  concurrency(enforcement=Enforcement.REJECT)])
def test_no_estimated_wait_for_capacity_and_concurrency(spec: ResourceSpec) -> None:
    env = Env(spec)
    token = env.token(spec.name, 1)
    granted(env.acquire(token, spec.value))
    assert env.sched.estimate_wait(token, 1) is None
    ticket = env.acquire(token, 1)
    assert isinstance(ticket.outcome, FailedReservation)
    assert ticket.outcome.estimated_wait_s is None


# ================================================================================== enforcement


def test_throttle_waits_until_units_come_back() -> None:
    env = Env(capacity(value=10))
    a, b = env.token("c", 5), env.token("c", 5)
    env.acquire(a, 8)
    ticket = env.acquire(b, 5)
    assert ticket.outcome is None
    assert env.sched.next_wakeup() == Policy().lease_ttl_s  # only a's lease expiry is ahead
    env.sched.give_back(a, HOLDER, 3)
    assert granted(ticket) == 5


def test_throttle_timeout_fails_with_failed_reservation_at_the_deadline() -> None:
    env = Env(concurrency(value=1))
    a, b = env.token("k", 1), env.token("k", 1)
    env.acquire(a, 1)
    ticket = env.acquire(b, 1, timeout=2.5)
    env.sched.poll()  # reports the grant to a
    assert env.sched.next_wakeup() == 2.5
    env.clock.set(2.4)
    assert env.sched.poll() == []
    env.clock.set(2.5)
    assert env.sched.poll() == [ticket]
    assert isinstance(ticket.outcome, FailedReservation)
    assert env.status("k").waiters == 0


def test_wait_limit_fails_capacity_waiter_at_the_deadline() -> None:
    env = Env(capacity(value=10, enforcement=Enforcement.REJECT, wait_limit_s=3.0))
    a, b = env.token("c", 5), env.token("c", 5)
    env.acquire(a, 10)
    ticket = env.acquire(b, 1)
    assert ticket.outcome is None  # no estimate for capacity: it waits up to the limit
    env.wait_for(ticket)
    assert env.now == 3.0
    assert isinstance(ticket.outcome, FailedReservation)


def test_shorter_timeout_than_the_wait_limit_wins() -> None:
    env = Env(concurrency(value=1, wait_limit_s=10.0))
    a, b = env.token("k", 1), env.token("k", 1)
    env.acquire(a, 1)
    ticket = env.acquire(b, 1, timeout=1.0)
    env.wait_for(ticket)
    assert env.now == 1.0


def test_zero_timeout_fails_at_once() -> None:
    env = Env(concurrency(value=1))
    a, b = env.token("k", 1), env.token("k", 1)
    env.acquire(a, 1)
    assert isinstance(env.acquire(b, 1, timeout=0.0).outcome, FailedReservation)


def test_reject_with_no_wait_limit_fails_at_once() -> None:
    env = Env(capacity(value=10, enforcement=Enforcement.REJECT))
    token = env.token("c", 5)
    env.acquire(token, 10)
    before = env.snapshot([token])
    ticket = env.acquire(token, 1, timeout=100.0)  # a longer timeout does not extend a reject
    assert isinstance(ticket.outcome, FailedReservation)
    assert env.snapshot([token]) == before


def test_terminate_gives_quota_terminated_when_the_recall_grace_ends() -> None:
    env = Env(concurrency(value=1, enforcement=Enforcement.TERMINATE))
    a, b = env.token("k", 1), env.token("k", 1)
    env.acquire(a, 1)
    ticket = env.acquire(b, 1)
    assert ticket.outcome is None  # a's slot may be freed and on its way back: it is recalled
    assert env.wait_for(ticket) == RECALL_GRACE_S
    assert isinstance(ticket.outcome, QuotaTerminated)
    assert (ticket.outcome.resource, ticket.outcome.amount) == ("k", 1)


def test_terminate_after_the_wait_limit() -> None:
    env = Env(rate(value=10, burst=10, enforcement=Enforcement.TERMINATE, wait_limit_s=2.0))
    token = env.token("r", 10)
    env.commit(token, granted(env.acquire(token, 10)))
    ticket = env.acquire(token, 5)
    assert ticket.outcome is None
    assert env.wait_for(ticket) == pytest.approx(0.5)
    assert granted(ticket) == 5
    env.commit(token, 5)
    doomed = env.acquire(token, 10)  # 1.0 s: within the limit... then a debt pushes it out
    env.sched.give_back(token, HOLDER, debt=50)
    env.wait_for(doomed)
    assert isinstance(doomed.outcome, QuotaTerminated)
    assert env.now == pytest.approx(0.5 + 2.0)


def test_cancelled_waiter_leaves_the_queue() -> None:
    env = Env(concurrency(value=1))
    a, b = env.token("k", 1), env.token("k", 1)
    env.acquire(a, 1)
    ticket = env.acquire(b, 1)
    env.sched.cancel(ticket)
    assert isinstance(ticket.outcome, TokenStateError)
    assert env.status("k").waiters == 0
    env.sched.give_back(a, HOLDER, 1)
    assert env.status("k").available == 1


def test_closing_a_token_fails_its_waiters() -> None:
    env = Env(concurrency(value=1))
    a, b = env.token("k", 1), env.token("k", 1)
    env.acquire(a, 1)
    tickets = [env.acquire(b, 1) for _ in range(3)]
    env.sched.close_token(b, 0, ME)
    assert all(isinstance(t.outcome, TokenClosedError) for t in tickets)
    assert env.status("k").waiters == 0
    assert env.status("k").tokens == 1


def test_requests_of_one_token_are_served_in_order() -> None:
    env = Env(concurrency(value=3))
    a, filler = env.token("k", 3), env.token("k", 1)
    env.acquire(filler, 3)
    first, second, third = env.acquire(a, 3), env.acquire(a, 1), env.acquire(a, 1)
    env.sched.give_back(filler, HOLDER, 2)  # room for the later ones, not the first
    assert (first.outcome, second.outcome, third.outcome) == (None, None, None)
    env.sched.give_back(filler, HOLDER, 1)
    assert granted(first) == 3


# ================================================================================== set_limit


def test_lowering_a_limit_grants_nothing_until_use_falls_below_it() -> None:
    env = Env(concurrency(value=8))
    a, b = env.token("k", 4), env.token("k", 4)
    env.acquire(a, 6)
    env.sched.set_limit(concurrency(value=4))
    ticket = env.acquire(b, 1)
    assert ticket.outcome is None
    env.sched.give_back(a, HOLDER, 2)  # 4 held: at the new limit
    assert ticket.outcome is None
    env.sched.give_back(a, HOLDER, 1)
    assert granted(ticket) == 1
    assert env.status("k").in_use == 4


def test_lowering_a_capacity_limit_never_refills_and_raising_adds_only_the_difference() -> None:
    env = Env(capacity(value=100))
    a = env.token("c", 10)
    env.commit(a, granted(env.acquire(a, 80)))
    env.sched.set_limit(capacity(value=50))
    assert env.status("c").available == 0
    waiting = env.acquire(a, 30)
    assert waiting.outcome is None
    env.sched.set_limit(capacity(value=100))
    assert waiting.outcome is None  # 20 free: still short
    env.sched.set_limit(capacity(value=110))
    assert granted(waiting) == 30  # raising wakes waiters at once
    assert env.status("c").available == 0


def test_raising_a_concurrency_limit_wakes_waiters() -> None:
    env = Env(concurrency(value=2))
    a, b = env.token("k", 1), env.token("k", 1)
    env.acquire(a, 2)
    ticket = env.acquire(b, 2)
    env.sched.set_limit(concurrency(value=4))
    assert granted(ticket) == 2


def test_lowering_a_rate_limit_bounds_later_grants_by_the_new_limit() -> None:
    env = Env(rate(value=100, burst=100))
    token = env.token("r", 10)
    env.clock.advance(1.0)
    env.sched.set_limit(rate(value=10, burst=20))
    backlog = Backlog(env)
    start = env.now
    backlog.add(token, 5)
    backlog.run_for(10.0)
    assert backlog.units(token) <= 20 + 10 * (env.now - start) + EPS
    assert backlog.units(token) >= 20 + 10 * 10 - 5


def test_set_limit_below_a_waiting_request_does_not_block_the_queue_for_ever() -> None:
    env = Env(concurrency(value=8))
    a, b = env.token("k", 4), env.token("k", 4)
    env.acquire(a, 8)
    big = env.acquire(a, 6)
    env.sched.set_limit(concurrency(value=4))
    env.sched.give_back(a, HOLDER, 8)
    env.sched.poll()
    # The 6-slot request can never fit a 4-slot limit: it must fail, not hold up everyone.
    served = 0
    for _ in range(20):
        ticket = env.acquire(b, 1)
        env.sched.poll()
        if isinstance(ticket.outcome, Grant):
            served += 1
            env.sched.give_back(b, HOLDER, 1)
        else:
            break
    assert big.outcome is not None, "a request above the new limit waits for ever"
    assert served == 20


def test_set_limit_cannot_change_the_kind_and_changes_nothing() -> None:
    env = Env(concurrency(value=4))
    before = env.snapshot()
    with pytest.raises(InvalidAmountError):
        env.sched.set_limit(capacity(name="k", value=4))
    with pytest.raises(UnknownResourceError):
        env.sched.set_limit(capacity(name="nope", value=4))
    assert env.snapshot() == before
    assert env.sched.specs()["k"] == concurrency(value=4)


# ============================================================================== next_wakeup


def test_next_wakeup_is_when_the_rate_head_fits() -> None:
    env = Env(rate(value=10, burst=10))
    token = env.token("r", 10)
    assert env.sched.next_wakeup() is None
    env.acquire(token, 10)
    ticket = env.acquire(token, 4)
    env.sched.poll()
    assert env.sched.next_wakeup() == pytest.approx(0.4)
    env.clock.set(0.39)
    assert env.sched.poll() == []
    env.clock.set(env.sched.next_wakeup())
    assert env.sched.poll() == [ticket]


def test_next_wakeup_includes_a_smaller_waiter_that_can_go_past_a_blocked_head() -> None:
    env = Env(rate(value=10, burst=100))
    big, small = env.token("r", 100), env.token("r", 100)
    env.commit(small, granted(env.acquire(small, 60)))
    env.commit(big, granted(env.acquire(big, 40)))  # the bucket is empty; big's pass is lower
    head = env.acquire(big, 100)  # 10 s away
    passer = env.acquire(small, 10)  # fits after 1 s, and would finish before the head
    env.sched.poll()
    assert head.outcome is None and passer.outcome is None
    assert env.sched.next_wakeup() == pytest.approx(1.0)
    env.step()
    assert granted(passer) == 10
    assert head.outcome is None
