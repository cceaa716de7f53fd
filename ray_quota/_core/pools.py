"""Unit pools: how many units of one resource can be granted now, and when more will be.

Pure and clock-free: every method takes ``now`` (seconds on a monotonic clock) from its caller.
"""

from __future__ import annotations

import math

from ray_quota._spec import Kind, ResourceSpec


class Pool:
    """The grantable units of one resource.

    Units leave a pool when they are granted and come back when a holder returns them unused.
    Overuse that a commit declares is charged as debt and delays later grants.
    """

    __slots__ = ("spec",)

    def __init__(self, spec: ResourceSpec) -> None:
        self.spec = spec

    def available(self, now: float) -> int:
        """Units that can be granted at ``now``."""
        raise NotImplementedError

    def take(self, units: int, now: float) -> None:
        """Grant ``units``; the caller has checked that they are available."""
        raise NotImplementedError

    def give_back(self, units: int, now: float) -> None:
        """Take back units granted earlier and not used."""
        raise NotImplementedError

    def charge_debt(self, units: int, now: float) -> None:
        """Charge units used beyond what was granted."""

    def time_until(self, units: int, now: float) -> float | None:
        """Seconds until ``units`` are available with no other grants, or None if unknowable."""
        return 0.0 if self.available(now) >= units else None

    def in_use(self, now: float) -> int:
        """Units granted and not yet back (for status and metrics)."""
        raise NotImplementedError

    def resize(self, spec: ResourceSpec, now: float) -> None:
        """Apply a changed limit of the same kind, keeping what is in use or spent."""
        self.spec = spec

    def save(self, now: float) -> float:
        """The one number that is this pool's state, for a durable store."""
        raise NotImplementedError

    def load(self, saved: float, elapsed_s: float, now: float) -> None:
        """Take up a state saved ``elapsed_s`` seconds ago."""
        raise NotImplementedError

    def refill(self, leased: int, now: float) -> int:
        """An operator's reset: forget what was spent, keep the ``leased`` units holders still
        have. Returns the units that became available (none for slots: they come back when
        released)."""
        return 0


class RatePool(Pool):
    """A token bucket that refills continuously: ``value`` units per period, at most ``burst``.

    An effective limit below the manifest's (:meth:`throttle`, DESIGN 8) scales both the refill
    and the burst; a hold (:meth:`hold`) empties the bucket and starts its refill later.
    """

    __slots__ = ("_level", "_stamp", "_rate", "_granted", "_scale")

    def __init__(self, spec: ResourceSpec, now: float) -> None:
        super().__init__(spec)
        self._level = float(spec.burst)
        self._stamp = now  # refilled up to here; in the future while grants are held
        self._rate = spec.refill_per_s
        self._granted = 0  # net units out of the bucket; only for status
        self._scale = 1.0  # the effective limit over the manifest's

    @property
    def _cap(self) -> float:
        return max(1.0, self.spec.burst * self._scale)

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._level = min(self._cap, self._level + (now - self._stamp) * self._rate * self._scale)
            self._stamp = now

    def throttle(self, scale: float, now: float) -> None:
        """Grant at ``scale`` (0 < scale <= 1) of the limit: refill that much slower and hold
        that much less (the effective limit, see :mod:`ray_quota._core.feedback`)."""
        self._refill(now)
        self._scale = scale
        self._level = min(self._level, self._cap)

    def hold(self, until: float, cap: float, now: float) -> None:
        """Hold at most ``cap`` units from ``now``, and grant nothing before ``until``: the
        bucket is empty then and refills from there."""
        self._refill(now)
        self._level = min(self._level, cap)
        if until > now:
            self._level = min(self._level, 0.0)
            self._stamp = max(self._stamp, until)

    def level(self, now: float) -> float:
        """Units in the bucket; negative while debt is being paid off."""
        self._refill(now)
        return self._level

    def available(self, now: float) -> int:
        if now < self._stamp:
            return 0  # held: units given back meanwhile wait for the hold's end too
        # A tiny epsilon keeps float refill from leaving a unit a hair short for ever.
        return max(0, math.floor(self.level(now) + 1e-9))

    def take(self, units: int, now: float) -> None:
        self._refill(now)
        self._level -= units
        self._granted += units

    def give_back(self, units: int, now: float) -> None:
        # Returned units past the burst are dropped: the bucket never holds more than burst.
        self._refill(now)
        self._level = min(self._cap, self._level + units)
        self._granted -= units

    def charge_debt(self, units: int, now: float) -> None:
        self._refill(now)
        self._level -= units

    def time_until(self, units: int, now: float) -> float | None:
        held = max(0.0, self._stamp - now)
        missing = units - self.level(now)
        return held if missing <= 1e-9 else held + missing / (self._rate * self._scale)

    def in_use(self, now: float) -> int:
        return max(0, self.spec.burst - self.available(now))

    def resize(self, spec: ResourceSpec, now: float) -> None:
        self._refill(now)
        super().resize(spec, now)
        self._rate = spec.refill_per_s
        self._level = min(self._level, self._cap)

    def save(self, now: float) -> float:
        return self.level(now)

    def refill(self, leased: int, now: float) -> int:
        before = self.available(now)
        self._level = max(self.level(now), float(self.spec.burst))
        return self.available(now) - before

    def load(self, saved: float, elapsed_s: float, now: float) -> None:
        # Refill for the time the executor was down, as if it had kept running.
        self._level = min(float(self.spec.burst), saved + max(0.0, elapsed_s) * self._rate)
        self._stamp = now


class CapacityPool(Pool):
    """A budget that never refills: what is spent stays spent, whatever the limit becomes."""

    __slots__ = ("spent",)

    def __init__(self, spec: ResourceSpec, spent: int = 0) -> None:
        super().__init__(spec)
        self.spent = spent  # granted (leased or charged) and not given back, plus debt

    def available(self, now: float) -> int:
        return max(0, self.spec.value - self.spent)

    def take(self, units: int, now: float) -> None:
        self.spent += units

    def give_back(self, units: int, now: float) -> None:
        self.spent -= units

    def charge_debt(self, units: int, now: float) -> None:
        self.spent += units

    def in_use(self, now: float) -> int:
        return self.spent

    def save(self, now: float) -> float:
        return float(self.spent)

    def load(self, saved: float, elapsed_s: float, now: float) -> None:
        self.spent = int(saved)

    def refill(self, leased: int, now: float) -> int:
        before = self.available(now)
        self.spent = min(self.spent, leased)
        return self.available(now) - before


class ConcurrencyPool(Pool):
    """Slots held while reservations are open; commit or release puts them back."""

    __slots__ = ("held",)

    def __init__(self, spec: ResourceSpec) -> None:
        super().__init__(spec)
        self.held = 0

    def available(self, now: float) -> int:
        return max(0, self.spec.value - self.held)

    def take(self, units: int, now: float) -> None:
        self.held += units

    def give_back(self, units: int, now: float) -> None:
        self.held -= units

    def in_use(self, now: float) -> int:
        return self.held

    def save(self, now: float) -> float:
        return float(self.held)

    def load(self, saved: float, elapsed_s: float, now: float) -> None:
        self.held = int(saved)


def make_pool(spec: ResourceSpec, now: float) -> Pool:
    """The pool for ``spec``'s kind, full."""
    if spec.kind is Kind.RATE:
        return RatePool(spec, now)
    if spec.kind is Kind.CAPACITY:
        return CapacityPool(spec)
    return ConcurrencyPool(spec)
