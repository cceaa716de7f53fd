"""The promises the whole-system model checks, read from the processes' own records (see
``system_world``) against the limits in force."""

from __future__ import annotations

import bisect
import itertools
import math
from typing import TYPE_CHECKING

from system_executor import CONC, EPS

from ray_quota._spec import ResourceSpec

if TYPE_CHECKING:
    from system_world import Records, World


def rate_excess(records: Records, spec: ResourceSpec) -> float:
    """The most units used in a window [t1, t2] beyond the burst in force at t1 plus what the
    rates in force refilled over the window, what the processes held when the window opened
    (granted before it), and the overuse they declared. (A lowered limit clamps the bucket to
    its new burst; a raised one does not fill it.)"""
    events = sorted((t, amount if used is None else min(used, amount))
                    for t, amount, used in records.opened[spec.name])
    snapshots = records.held[spec.name]
    times = [t for t, _ in snapshots]
    limits = records.limits[spec.name]
    starts = [t for t, _ in limits]
    # Units refilled from time 0 to the start of each limit's period.
    refilled = [0.0]
    for (t, old), (next_t, _) in itertools.pairwise(limits):
        refilled.append(refilled[-1] + old.refill_per_s * (next_t - t))

    def refill_until(t: float) -> float:
        at = bisect.bisect_right(starts, t) - 1
        return refilled[at] + limits[at][1].refill_per_s * (t - starts[at])

    # The excess of the window from event i to event j is (S_j - R(t_j)) + (R(t_i) - S_(i-1)
    # - burst(t_i) - held(t_i)), S the units used up to an event and R the refill up to a
    # time: one pass, keeping the best start so far.
    worst = best_start = -math.inf
    used_before = 0.0
    for t1, units in events:
        at = bisect.bisect_right(times, t1 + EPS) - 1
        held = snapshots[at][1] if at >= 0 else 0
        # The burst in force at t1 (the larger, if the limit changed at t1).
        burst = max(limit.burst for _, limit in limits[
            max(0, bisect.bisect_left(starts, t1 - EPS) - 1):bisect.bisect_right(starts, t1 + EPS)])
        refill = refill_until(t1)
        best_start = max(best_start, refill - used_before - burst - held)
        used_before += units
        worst = max(worst, used_before - refill + best_start)
    return worst - records.debt[spec.name]


def consumed(records: Records, resource: str) -> int:
    """Units used of ``resource`` within grants: committed use, open reservations in full."""
    return sum(amount if used is None else used for _, amount, used in records.opened[resource])


def slots_in_use(world: World) -> int:
    """Concurrency slots held now by processes that are alive, in reservations that have not
    lapsed: a process frozen past its lease's trust has lost its slots, by the lease
    contract (a process whose broker's trust ran out has not: it kept renewing)."""
    return sum(held.amount for process in world.processes if not process.dead
               for held, _ in process.held
               if held.handle.resource == CONC.name and not held.lapsed)


def held_slots(world: World) -> int:
    """Concurrency slots held by processes that are not dead (trusted or not, in reservations
    or spare) and by live brokers: they grow only by a grant."""
    return world._broker_spare(CONC.name) + sum(
        lease.held for process in world.processes if not process.dead
        for handle in process.handles if handle.resource == CONC.name
        for lease in handle.leases)
