"""The fair queue alone: stride order, stale heap entries and the bypass budget (wait
estimates replay the queue: see test_scheduler_regressions)."""

from __future__ import annotations

import itertools

from ray_quota._core.fair_queue import FairQueue, Flow, Ticket, Waiter

_seq = itertools.count(1)


def flow(pass_: float = 0.0, expected_use: int = 1) -> Flow:
    return Flow(pass_, expected_use)


def waiter(token: Flow, amount: int = 1) -> Waiter:
    seq = next(_seq)
    return Waiter(Ticket(seq, f"t{id(token)}", "p", amount), token, prefetch=0,
                  deadline=float("inf"), seq=seq)


def queued(queue: FairQueue, token: Flow, amount: int = 1) -> Waiter:
    w = waiter(token, amount)
    queue.join(w)
    return w


def drain(queue: FairQueue) -> list[Waiter]:
    """Serve the queue to the end, in its order."""
    served = []
    while (head := queue.head()) is not None:
        queue.leave(head)
        served.append(head)
    return served


# ----------------------------------------------------------------------------------------- order


def test_lowest_pass_goes_first_then_the_earliest_arrival() -> None:
    queue = FairQueue()
    late, early, behind = flow(1.0), flow(1.0), flow(0.5)
    a = queued(queue, late)
    b = queued(queue, early)
    c = queued(queue, behind)
    assert drain(queue) == [c, a, b]  # pass 0.5, then the two at 1.0 in arrival order


def test_waiters_of_one_token_are_served_in_arrival_order() -> None:
    queue = FairQueue()
    token, other = flow(0.0), flow(0.0)
    first, second = queued(queue, token), queued(queue, token)
    third = queued(queue, other)
    # Only a token's first waiter competes: the second waits behind it, whatever its seq.
    assert queue.head() is first
    queue.leave(first)
    assert queue.head() is second  # pass still 0.0 and it arrived before ``third``
    queue.leave(second)
    assert queue.head() is third
    assert queue.waiting == 1


def test_rekey_moves_a_token_whose_pass_moved_and_the_old_entry_is_ignored() -> None:
    queue = FairQueue()
    a, b = flow(0.0), flow(0.5)
    wa, wb = queued(queue, a), queued(queue, b)
    a.pass_ = 1.0  # granted elsewhere
    queue.rekey(a)
    assert queue.head() is wb  # the entry at pass 0.0 is stale: skipped, not served
    assert drain(queue) == [wb, wa]


def test_a_waiter_that_left_from_the_middle_is_never_served() -> None:
    queue = FairQueue()
    token = flow()
    first, middle, last = (queued(queue, token) for _ in range(3))
    queue.leave(middle)
    assert middle.done and queue.waiting == 2
    assert drain(queue) == [first, last]
    assert queue.head() is None and queue.waiting == 0


def test_waiters_lists_every_queued_waiter_token_by_token() -> None:
    queue = FairQueue()
    a, b = flow(0.0), flow(1.0)
    a1, b1, a2 = queued(queue, a), queued(queue, b), queued(queue, a)
    assert queue.waiters() == [a1, a2, b1]


# ----------------------------------------------------------------------------------- may pass


def test_only_waiters_within_the_budget_that_would_finish_first_may_pass() -> None:
    queue = FairQueue(bypass_factor=1.0)
    head = queued(queue, flow(0.0, expected_use=10), amount=6)  # finishes at 0.6
    before = queued(queue, flow(0.2, expected_use=10), amount=2)  # finishes at 0.4: may pass
    after = queued(queue, flow(0.1, expected_use=1), amount=2)  # finishes at 2.1: may not
    too_big = queued(queue, flow(0.0, expected_use=100), amount=7)  # above the budget of 6
    assert queue.head() is head
    assert queue.may_pass(head) == [before]
    assert after not in queue.may_pass(head) and too_big not in queue.may_pass(head)


def test_bypass_budget_is_the_heads_amount_times_the_factor() -> None:
    queue = FairQueue(bypass_factor=1.5)
    head = queued(queue, flow(0.0, expected_use=10), amount=4)  # budget: ceil(6.0) = 6
    small = [queued(queue, flow(0.0, expected_use=10), amount=2) for _ in range(4)]
    admitted = [w for w in small if queue.admit_past(head, w)]
    assert admitted == small[:3] and head.bypassed == 6
    assert queue.may_pass(head) == []  # budget spent: nobody else may pass


def test_admit_past_refuses_a_waiter_that_would_overrun_the_budget() -> None:
    queue = FairQueue()
    head = queued(queue, flow(0.0, expected_use=10), amount=5)
    assert queue.admit_past(head, waiter(flow(), amount=3))
    assert not queue.admit_past(head, waiter(flow(), amount=3))  # 6 > 5
    assert head.bypassed == 3
    assert queue.admit_past(head, waiter(flow(), amount=2))
    assert head.bypassed == 5


# -------------------------------------------------------------------------------------- ahead
