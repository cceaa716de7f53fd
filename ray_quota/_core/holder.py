"""A holder's side of a lease: serve reservations locally, settle them, report at renewal.

Pure and clock-free like the scheduler: the Ray client and the tests drive it with ``now``.

Reports carry running totals (units returned, used, owed as debt), never increments, so the
executor can apply a report twice, late or out of order without harm. A lease is known to the
executor by its holder key; when the holder can no longer trust that both sides agree on the
totals (a grant's answer was lost, or the lease expired), it starts a new lease under a new key
and settles the old one as final.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray_quota._core.protocol import TRUST
from ray_quota._spec import Kind


@dataclass(frozen=True, slots=True)
class Settlement:
    """A lease's running totals, as the holder reports them."""

    returned: int  # unused units given back to the pool
    used: int  # units consumed from the lease
    debt: int  # units consumed beyond any grant


class LocalLease:
    """Units of one token held by this process under one holder key.

    Example:
        >>> lease = LocalLease(Kind.RATE, key="proc-1:0", max_prefetch=64)
        >>> lease.take(10, now=0.0)            # nothing held yet: ask the executor
        False
        >>> lease.granted(10, units=20, sent_at=0.0, ttl_s=10.0, contended=False)
        >>> lease.take(10, now=1.0), lease.spare
        (True, 0)
    """

    __slots__ = ("kind", "key", "spare", "reserved", "returned", "used", "debt", "active",
                 "final", "contended", "via", "_valid_until", "_prefetch", "_max_prefetch",
                 "_busy")

    def __init__(self, kind: Kind, *, key: str, max_prefetch: int) -> None:
        self.kind = kind
        self.key = key  # the executor knows this lease as (token id, key)
        self.spare = 0  # held and not in an open reservation
        self.reserved = 0  # held by open reservations
        self.returned = self.used = self.debt = 0  # running totals
        self.active = False  # the executor has a record of this lease
        self.final = False  # settled as final: the executor ends it; no more grants into it
        self.contended = False
        self.via: str | None = None  # a broker's lease key, when a broker re-leased these units
        self._valid_until = float("-inf")
        self._prefetch = 0
        self._max_prefetch = max_prefetch
        self._busy = False  # served a reservation since the last renewal

    def take(self, amount: int, now: float) -> bool:
        """Serve ``amount`` from spare units if the lease is trusted and nobody else waits.

        Under contention every reservation goes through the executor's fair queue.
        """
        if self.spare >= amount and not self.contended and now < self._valid_until:
            self.spare -= amount
            self.reserved += amount
            self._busy = True
            return True
        return False

    def prefetch(self) -> int:
        """Spare units to ask for beyond a request: grows while alone, none under contention."""
        return 0 if self.contended else self._prefetch

    def granted(self, amount: int, *, units: int, sent_at: float, ttl_s: float,
                contended: bool, waited_s: float = 0.0) -> None:
        """Record a grant of ``units`` for a request of ``amount``, and reserve ``amount``.

        The grant renewed the lease ``waited_s`` after the request, sent at ``sent_at``, reached
        the executor. A renewal answered meanwhile may vouch for longer: trust never moves back.
        """
        if sent_at >= self._valid_until:
            self.let_go()
        self.active = True
        self._valid_until = max(self._valid_until, sent_at + waited_s + ttl_s * TRUST)
        self.spare += units - amount
        self.reserved += amount
        self._busy = True
        self.contended = contended
        if not contended:
            self._prefetch = min(self._max_prefetch, max(2 * self._prefetch, amount))

    def settle(self, amount: int, used: int) -> bool:
        """Close a reservation of ``amount`` that really used ``used``.

        Returns whether debt grew: overuse that spare units could not cover, which the caller
        should report at once so that the pool stops granting what was already consumed.
        """
        self.reserved -= amount
        if self.kind is Kind.CONCURRENCY:
            self.spare += amount  # the slots are free again, whatever was "used"
            over = max(0, used - amount)
        elif used <= amount:
            self.spare += amount - used
            self.used += used
            over = 0
        else:
            cover = min(used - amount, self.spare)  # overuse comes out of spare units first
            self.spare -= cover
            self.used += amount + cover
            over = used - amount - cover
        self.debt += over
        return over > 0

    def recall(self) -> bool:
        """Others wait: stop serving locally and give every spare unit back.

        Returns whether there was anything to give back.
        """
        self.contended = True
        if not self.spare:
            return False
        self.returned += self.spare
        self.spare = 0
        return True

    def release_all(self) -> None:
        """The lease ends: open reservations count as used in full, spare goes back."""
        if self.reserved:
            self.settle(self.reserved, self.reserved)
        self.returned += self.spare
        self.spare = 0

    def report(self, now: float, *, keep_spare: bool) -> Settlement:
        """The totals to send at renewal; spare goes back unless kept, trusted and in use."""
        if now >= self._valid_until:
            self.let_go()
        elif not keep_spare or self.contended or not self._busy:
            self.returned += self.spare
            self.spare = 0
        self._busy = False
        return self.totals()

    def let_go(self) -> None:
        """Trust ran out: never serve the spare units again, and say so. If the executor still
        has the lease they go back to the pool; if it expired the lease, it ignores the report."""
        self.returned += self.spare
        self.spare = 0

    def totals(self) -> Settlement:
        return Settlement(self.returned, self.used, self.debt)

    def renewed(self, *, contended: bool, sent_at: float, ttl_s: float) -> None:
        """Apply the executor's answer to a renewal sent at ``sent_at``."""
        self.contended = contended
        self._valid_until = max(self._valid_until, sent_at + ttl_s * TRUST)

    @property
    def valid_until(self) -> float:
        """When local trust in the lease ends, on the holder's monotonic clock."""
        return self._valid_until

    @property
    def held(self) -> int:
        """Units this holder knows it holds: spare and in open reservations."""
        return self.spare + self.reserved
