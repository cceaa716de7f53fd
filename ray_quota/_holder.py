"""A holder's side of a lease: serve reservations locally, settle them, report at renewal.

Pure and clock-free like the scheduler: the Ray client and the tests drive it with ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray_quota._spec import Kind

# A lease is trusted locally for this share of its time-to-live, measured from when the request
# that granted or renewed it was *sent*, so the holder always stops before the executor expires it.
TRUST = 0.8


@dataclass(frozen=True, slots=True)
class Settlement:
    """What a holder tells the executor about one lease at renewal."""

    give_back: int  # unused units returned to the pool
    used: int  # units consumed from the lease
    debt: int  # units consumed beyond any grant


class LocalLease:
    """Units of one token held by this process.

    Example:
        >>> lease = LocalLease(Kind.RATE, max_prefetch=64)
        >>> lease.take(10, now=0.0)            # nothing held yet: ask the executor
        False
        >>> lease.granted(10, units=20, sent_at=0.0, ttl_s=10.0, contended=False)
        >>> lease.take(10, now=1.0), lease.spare
        (True, 0)
    """

    __slots__ = ("kind", "spare", "reserved", "_used", "_valid_until", "contended",
                 "_prefetch", "_max_prefetch", "_busy")

    def __init__(self, kind: Kind, *, max_prefetch: int) -> None:
        self.kind = kind
        self.spare = 0  # held and not in an open reservation
        self.reserved = 0  # held by open reservations
        self._used = 0
        self._valid_until = float("-inf")
        self.contended = False
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
                contended: bool) -> None:
        """Record a grant of ``units`` for a request of ``amount``, and reserve ``amount``."""
        if sent_at >= self._valid_until:
            self.spare = 0  # the executor may have expired the old lease and its spare with it
        self._valid_until = sent_at + ttl_s * TRUST
        self.spare += units - amount
        self.reserved += amount
        self._busy = True
        self.contended = contended
        if not contended:
            self._prefetch = min(self._max_prefetch, max(2 * self._prefetch, amount))

    def settle(self, amount: int, used: int) -> int:
        """Close a reservation of ``amount`` that really used ``used``.

        Returns the overuse that spare units could not cover: debt the caller should report at
        once, so that the pool stops granting what was already consumed.
        """
        self.reserved -= amount
        if self.kind is Kind.CONCURRENCY:
            self.spare += amount  # the slots are free again, whatever was "used"
            return max(0, used - amount)
        if used <= amount:
            self.spare += amount - used
            self._used += used
            return 0
        cover = min(used - amount, self.spare)  # overuse comes out of spare units first
        self.spare -= cover
        self._used += amount + cover
        return used - amount - cover

    def report(self, now: float, *, keep_spare: bool) -> Settlement:
        """What to settle at renewal; spare units go back unless ``keep_spare`` and still trusted."""
        give_back = 0
        if now >= self._valid_until:
            self.spare = 0  # forfeit: the executor settles an expired lease by itself
        elif not keep_spare or self.contended or not self._busy:
            give_back, self.spare = self.spare, 0
        settlement = Settlement(give_back, self._used, 0)
        self._used = 0
        self._busy = False
        return settlement

    def recall(self) -> int:
        """Others wait: stop serving locally and hand back all spare units (returned)."""
        self.contended = True
        give_back, self.spare = self.spare, 0
        return give_back

    def renewed(self, *, alive: bool, sent_at: float, ttl_s: float, contended: bool) -> None:
        """Apply the executor's answer to a renewal sent at ``sent_at``."""
        self.contended = contended
        if alive:
            self._valid_until = sent_at + ttl_s * TRUST
        else:
            self.spare = 0
            self._valid_until = float("-inf")

    @property
    def idle(self) -> bool:
        """Nothing held and nothing to report: the lease can be forgotten."""
        return not (self.spare or self.reserved or self._used)
