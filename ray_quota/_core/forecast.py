"""Wait estimates for rate resources: the queue played forward on copies, by its own rules.

Counting the units ahead in stride order is not what the queue does: smaller requests may pass a
blocked head (so a large request waits longer than the units ahead of it say), a small request may
itself pass one (so it waits less), and waiters whose wait runs out leave. So the estimate replays
the queue as it stands on a copy of it and of the bucket, with the same :func:`serve` and the same
wake-ups as the scheduler, assuming no one else arrives and nothing is given back meanwhile. Under
that assumption it is exact for an executor that polls at its wake-ups.

A replay costs what it plays, so it is cut short: after :data:`REPLAY_STEPS` grants and
departures, or once its clock passes a horizon (a reject resource only asks whether the request
fits in its wait limit). Only the part of the queue that can move within that many steps is
copied: a token can be served only once every token ahead of it in stride order (beyond the
:data:`~ray_quota._core.fair_queue.BACKFILL_SCAN` that may pass a blocked head) has been served
or has left, one step each. A replay cut short still bounds the wait: not before its clock, and
no later than the bucket takes to refill every unit still queued (the request's included).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice

from ray_quota._core.fair_queue import BACKFILL_SCAN, FairQueue, Flow, Ticket, Waiter
from ray_quota._core.pools import RatePool

STEPS_PER_WAITER = 4  # replay steps allowed per queued waiter before giving up (float trouble)
REPLAY_STEPS = 256  # grants and departures a replay plays before it bounds the rest


@dataclass(frozen=True, slots=True)
class Estimate:
    """Seconds until a request is granted: exactly ``low`` if ``exact``, else between ``low``
    and ``high``."""

    low: float
    high: float
    exact: bool


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
             ask: tuple[Flow, int, float] | None = None,
             horizon: float = math.inf) -> Estimate | None:
    """Seconds until ``target`` (queued in ``queue``) is granted, if no one else arrives and
    nothing is given back; None if the replay cannot tell.

    Or, with ``ask`` = (token, amount, pass) instead of a target: until a request of
    ``amount`` units the token would make now is granted (``pass``: where it would join, if it
    has no waiters yet). Past ``horizon`` seconds the replay stops: the estimate then only says
    it is later than that.
    """
    queued = queue.units + (ask[1] if ask is not None else 0)  # units, the request's included
    bucket = copy.copy(pool)
    replay, twin = _copy(queue, target, ask)
    if twin is None:  # too far back to be granted within a replay
        return _bounded(bucket, now, now, queued)
    deadlines = sorted((w for w in replay.waiters() if w is not twin and w.deadline != math.inf),
                       key=lambda w: (w.deadline, w.seq))
    clock = [now]  # the replay's time, read by the callbacks below
    # grants and departures so far, the units they took out of the queue, and the step that
    # granted the request (a step past REPLAY_STEPS may have missed a token not copied)
    played = [0, 0, REPLAY_STEPS + 1]

    def grant(waiter: Waiter, free: int) -> None:
        replay.leave(waiter)
        bucket.take(waiter.ticket.amount, clock[0])
        waiter.token.pass_ += waiter.ticket.amount / max(1, waiter.token.expected_use)
        replay.rekey(waiter.token)
        depart(waiter)
        if waiter is twin:
            played[2] = played[0]

    def depart(waiter: Waiter) -> None:
        played[0] += 1
        played[1] += waiter.ticket.amount

    def available() -> int:
        return bucket.available(clock[0])

    for _ in range(STEPS_PER_WAITER * replay.waiting + 16):
        at = clock[0]
        serve(replay, available, grant)
        while deadlines and deadlines[0].deadline <= at:  # as poll: grants first, then expiry
            waiter = deadlines.pop(0)
            if not waiter.done:
                replay.leave(waiter)
                depart(waiter)
                serve(replay, available, grant)
        if played[2] <= REPLAY_STEPS:
            return Estimate(at - now, at - now, exact=True)
        if played[0] >= REPLAY_STEPS:  # the rest of the queue was not copied: bound it
            return _bounded(bucket, now, at, queued - played[1])
        fit = next_fit(replay, bucket, at)
        if fit is None:
            return None
        clock[0] = max(at, min(fit, deadlines[0].deadline if deadlines else math.inf))
        if clock[0] - now > horizon:
            return _bounded(bucket, now, clock[0], queued - played[1])
    return None


def _bounded(bucket: RatePool, now: float, at: float, units: int) -> Estimate | None:
    """A replay stopped at ``at`` without granting: not sooner than that, and no later than
    the bucket takes to refill the ``units`` still queued (none are granted before)."""
    rest = bucket.time_until(units, at)
    return None if rest is None else Estimate(at - now, at - now + rest, exact=False)


def _copy(queue: FairQueue, target: Waiter | None,
          ask: tuple[Flow, int, float] | None) -> tuple[FairQueue, Waiter | None]:
    """A copy of the part of ``queue`` a replay can reach (tokens and waiters copied, the
    originals untouched), and in it the copy of ``target`` or the request asked, which never
    runs out of time; None instead if that request is out of reach."""
    replay = FairQueue(queue.bypass_factor, 0.0)  # its virtual time is not used
    twin: Waiter | None = None
    flows: dict[int, Flow] = {}
    reach = REPLAY_STEPS + BACKFILL_SCAN + 2  # tokens a replay can reach, and waiters of each
    queued = sorted((waiter for first in queue.firsts(reach)
                     for waiter in islice(first.token.waiters, reach)), key=lambda w: w.seq)
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
        if token.waiters and (id(token) not in flows or len(token.waiters) >= reach):
            return replay, None  # behind its own requests, which are out of reach
        flow = flows.get(id(token)) or Flow(pass_, token.expected_use)
        seq = queued[-1].seq + 1 if queued else 0
        twin = Waiter(Ticket(-1, "", "", amount), flow, 0, math.inf, seq)
        replay.join(twin)
    return replay, twin
