"""The world of the random-interleaving machines: three resources of each kind, the policy they
run under, and ``Ledger``, our own record of grants against which limits are checked.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import strategies as st
from scheduler_world import (
    EPS,
    capacity,
    concurrency,
    rate,
)

from ray_quota._core.scheduler import Policy
from ray_quota._spec import Enforcement, Kind, ResourceSpec

# ========================================================================= random interleavings


RATE_SPEC = rate("rate", value=40, period_s=1.0, burst=16)
CAP_SPEC = capacity("cap", value=150, enforcement=Enforcement.REJECT, wait_limit_s=2.0)
CONC_SPEC = concurrency("conc", value=5, enforcement=Enforcement.TERMINATE, wait_limit_s=1.5)
SPECS = {s.name: s for s in (RATE_SPEC, CAP_SPEC, CONC_SPEC)}
HOLDERS = ("h1", "h2", "h3")
# A short grace before an orphaned token is released, so that runs get to see it happen.
_GRACE = {"orphan_grace_s": 6.0} if "orphan_grace_s" in Policy.__dataclass_fields__ else {}
MACHINE_POLICY = Policy(credit_factor=2.0, lease_ttl_s=4.0, max_lease_fraction=0.25, **_GRACE)
ACQUIRE = {"index": st.integers(0, 10**6), "holder": st.sampled_from(HOLDERS),
           "share": st.integers(1, 100), "prefetch": st.integers(0, 12),
           "timeout": st.none() | st.sampled_from([0.0, 0.5, 1.0, 2.5])}


@dataclass
class Ledger:
    """Our own record of one resource: every grant, accepted return and declared debt, in order."""

    spec: ResourceSpec
    granted: int = 0
    returned: int = 0
    debt: int = 0
    # rate: running sum of (grants - returns + debt) and the least (sum - rate * t) seen at an event
    running: float = 0.0
    least: float = math.inf
    grants: list[tuple[float, int]] = field(default_factory=list)

    def _event(self, now: float, delta: int) -> None:
        self.least = min(self.least, self.running - self.spec.refill_per_s * now)
        self.running += delta

    def grant(self, now: float, units: int) -> None:
        self._event(now, units)
        self.granted += units
        self.grants.append((now, units))
        if self.spec.kind is Kind.RATE:
            # Every window [t1, now] ending at a grant: granted - returned + debt <= burst + r*T.
            worst = self.running - self.spec.refill_per_s * now - self.least
            assert worst <= self.spec.burst + EPS, (
                f"rate exceeded: {worst} units net in a window, burst {self.spec.burst}")
        elif self.spec.kind is Kind.CAPACITY:
            assert self.granted - self.returned + self.debt <= self.spec.value, "budget exceeded"

    def give_back(self, now: float, units: int) -> None:
        if units:
            self._event(now, -units)
            self.returned += units

    def charge(self, now: float, units: int) -> None:
        if units and self.spec.kind is not Kind.CONCURRENCY:
            self._event(now, units)
            self.debt += units


def orphans_due(orphans: dict[str, float], expired: set[str], now: float, live: set[str],
                has_leases: Callable[[str], bool], waits: Callable[[str], bool],
                released: Callable[[str], bool], born: dict[str, float]) -> list[str]:
    """Tokens the executor released at this poll (``released``), each checked against its
    rule: a token that holds nothing (no lease, no waiting request) is released once unused
    for a grace period (a Ray retry, or its idle process, may use it again meanwhile). Calls
    and reports that name it restart that period, and we do not follow them all here, so we
    check that a release is never too early: never while it holds something, never within a
    grace of its opening, nor of its last lease expiring."""
    grace = getattr(MACHINE_POLICY, "orphan_grace_s", 0.0)
    for token in expired:
        if token in live and not has_leases(token):
            orphans[token] = now + grace
    gone = sorted(token for token in live if released(token))
    for token in gone:
        assert not has_leases(token) and not waits(token), "released while holding"
        assert born[token] + grace <= now, "released within a grace of its opening"
        assert orphans.get(token, now) <= now, "released within a grace of its expiry"
    for token in list(orphans):
        if token not in live or token in gone:
            del orphans[token]
    return gone
