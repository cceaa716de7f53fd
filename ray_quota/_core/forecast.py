"""Wait estimates for rate resources: the queue played forward on copies, by its own rules.

Counting the units ahead in stride order is not what the queue does: smaller requests may pass a
blocked head (so a large request waits longer than the units ahead of it say), a small request may
itself pass one (so it waits less), and waiters whose wait runs out leave. So the estimate replays
the queue as it stands on a copy of it and of the bucket, with the same :func:`serve` and the same
wake-ups as the scheduler, assuming no one else arrives and nothing is given back meanwhile. Under
that assumption it is exact for an executor that polls at its wake-ups.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

from ray_quota._core.fair_queue import FairQueue, Flow, Ticket, Waiter
from ray_quota._core.pools import RatePool

STEPS_PER_WAITER = 4  # replay steps allowed per queued waiter before giving up (float trouble)


def serve(queue: FairQueue, available: Callable[[], int],
          grant: Callable[[Waiter, int], None]) -> None:
    """Grant waiters in stride order while they fit, letting smaller ones past a blocked head
    within its bypass budget. ``grant`` is given the waiter and the units then available."""
    while (head := queue.head()) is not None:
        free = available()
        if head.ticket.amount <= free:
            grant(head, free)
            continue
        if free < 1:
            return  # nobody can pass the head: skip the scan
        for waiter in queue.may_pass(head):
            if waiter.ticket.amount <= free and queue.admit_past(head, waiter):
                grant(waiter, free)
                free = available()
        return


def next_fit(queue: FairQueue, pool: RatePool, now: float) -> float | None:
    """When the head, or the smallest waiter allowed past it, next fits; None if none waits."""
    head = queue.head()
    if head is None:
        return None
    smallest = min((w.ticket.amount for w in queue.may_pass(head)),
                   default=head.ticket.amount)
    wait = pool.time_until(min(head.ticket.amount, smallest), now)
    return None if wait is None else now + wait


def forecast(queue: FairQueue, pool: RatePool, now: float, target: Waiter | None = None,
             ask: tuple[Flow, int, float] | None = None) -> float | None:
    """Seconds until ``target`` (queued in ``queue``) is granted, if no one else arrives and
    nothing is given back; None if the replay cannot tell.

    Or, with ``ask`` = (token, amount, pass) instead of a target: until a request of
    ``amount`` units the token would make now is granted (``pass``: where it would join, if it
    has no waiters yet).
    """
    replay, twin = _copy(queue, target, ask)
    bucket = copy.copy(pool)
    deadlines = sorted((w for w in replay.waiters() if w is not twin and w.deadline != math.inf),
                       key=lambda w: (w.deadline, w.seq))
    clock = [now]  # the replay's time, read by the callbacks below

    def grant(waiter: Waiter, free: int) -> None:
        replay.leave(waiter)
        bucket.take(waiter.ticket.amount, clock[0])
        waiter.token.pass_ += waiter.ticket.amount / max(1, waiter.token.expected_use)
        replay.rekey(waiter.token)

    def available() -> int:
        return bucket.available(clock[0])

    for _ in range(STEPS_PER_WAITER * replay.waiting + 16):
        at = clock[0]
        serve(replay, available, grant)
        while deadlines and deadlines[0].deadline <= at:  # as poll: grants first, then expiry
            waiter = deadlines.pop(0)
            if not waiter.done:
                replay.leave(waiter)
                serve(replay, available, grant)
        if twin.done:
            return at - now
        fit = next_fit(replay, bucket, at)
        if fit is None:
            return None
        clock[0] = max(at, min(fit, deadlines[0].deadline if deadlines else math.inf))
    return None


def _copy(queue: FairQueue, target: Waiter | None,
          ask: tuple[Flow, int, float] | None) -> tuple[FairQueue, Waiter]:
    """A copy of ``queue`` (tokens and waiters copied, the originals untouched), and in it the
    copy of ``target`` or the request asked, which never runs out of time."""
    replay = FairQueue(queue.bypass_factor, 0.0)  # its virtual time is not used
    twin: Waiter | None = None
    flows: dict[int, Flow] = {}
    queued = sorted(queue.waiters(), key=lambda w: w.seq)
    for waiter in queued:
        token = waiter.token
        flow = flows.get(id(token))
        if flow is None:
            flow = flows[id(token)] = Flow(token.pass_, token.expected_use)
        ticket = waiter.ticket
        clone = Waiter(Ticket(ticket.id, ticket.token_id, ticket.key, ticket.amount), flow,
                       waiter.prefetch, math.inf if waiter is target else waiter.deadline,
                       waiter.seq, bypassed=waiter.bypassed)
        replay.join(clone)
        if waiter is target:
            twin = clone
    if ask is not None:
        token, amount, pass_ = ask
        flow = flows.get(id(token)) or Flow(pass_, token.expected_use)
        seq = queued[-1].seq + 1 if queued else 0
        twin = Waiter(Ticket(-1, "", "", amount), flow, 0, math.inf, seq)
        replay.join(twin)
    assert twin is not None, "nothing to forecast"
    return replay, twin
