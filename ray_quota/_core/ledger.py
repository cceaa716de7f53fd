"""The lease ledger: which holder holds how many units of which token, until when.

A lease is addressed by (token id, lease key). A holder (a process, or a broker that re-leases)
uses one key per token until that lease ends, then a new one: the ledger remembers ended keys
(with the debt applied by then) so that a late report is never applied to a fresh lease. The
ledger keeps the books only; what units and credit a lease's events are worth is the
scheduler's to decide.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass

from ray_quota._core.ended import EndedKeys
from ray_quota._core.state import ChangeLog, LeaseKey, SavedLease

# Ended lease keys (and closed token ids) remembered one by one, oldest forgotten first; ended
# keys stay ended beyond that (see ray_quota._core.ended).
TOMBSTONES = 100_000


@dataclass(slots=True, eq=False)
class Lease:
    """Units of one token held under one lease key, and the holder's totals applied so far."""

    token_id: str
    key: str  # the lease key
    resource: str
    units: int
    expires_at: float
    # Running totals the holder reported and that were applied: settling is idempotent.
    returned: int = 0
    used: int = 0
    debt: int = 0
    # Concurrency: slot-seconds held and not yet charged, accrued up to ``accrued_at`` (None
    # until the first grant into it; not stored: a restored lease starts accruing afresh).
    slot_s: float = 0.0
    accrued_at: float | None = None
    # Units adoption moved out of this (a broker's) lease that its holder still counts: its
    # reports give them back later, and those returns free nothing.
    moved_out: int = 0

    @property
    def ident(self) -> LeaseKey:
        """How the ledger knows this lease: (token id, lease key)."""
        return (self.token_id, self.key)

    def advance_totals(self, returned: int, used: int, debt: int,
                       max_debt: int) -> tuple[int, int, int]:
        """Take up a holder's running totals; returns what is new in each (never negative,
        so a report that comes twice or late adds nothing). New debt is taken up to
        ``max_debt`` (see :func:`fresh_debt`)."""
        fresh = (max(0, returned - self.returned), max(0, used - self.used),
                 fresh_debt(debt, self.debt, max_debt))
        self.returned += fresh[0]
        self.used += fresh[1]
        self.debt += fresh[2]
        return fresh

    def absorb_moved(self, used: int, returned: int, *, slots: bool) -> tuple[int, int]:
        """What is left of fresh ``used`` and ``returned`` units once they made up for units
        moved out (see :meth:`Scheduler.adopt`).

        A broker settles the sub-lease whose units moved when it expires there: rate and
        capacity units as used (what else another process used makes up for them just as
        well), and concurrency ``slots`` as returned. Those returns may be another process's
        slot, freed really: it is held back until the moved ones come back (the sub-lease's
        time-to-live at most), rather than free a slot the adopting process holds.
        """
        take = min(self.moved_out, returned + used if slots else used)
        self.moved_out -= take
        from_used = min(take, used)
        return used - from_used, returned - (take - from_used)

    def saved(self) -> SavedLease:
        return SavedLease(self.token_id, self.key, self.resource, self.units, self.returned,
                          self.used, self.debt, self.moved_out)


def fresh_debt(reported: int, applied: int, max_debt: int) -> int:
    """The debt a report adds: what its total adds to the debt ``applied`` so far, at most
    ``max_debt`` (the resource's ``max_overuse``: one commit may add no more, so one report
    adds no more either). A report declaring more is a hostile or broken client's, and charges
    the cap; an honest holder's rest, if reports were reordered, comes with its next report,
    whose total still carries it."""
    return min(max_debt, max(0, reported - applied))


class LeaseLedger(Mapping[LeaseKey, Lease]):
    """The live leases by (token id, lease key), their expiry order, and the keys that ended.

    Adding and dropping a lease is recorded in the :class:`ChangeLog` it is given.

    Example:
        >>> ledger = LeaseLedger()
        >>> lease = ledger.add(Lease("t1", "proc-1:1", "tok", units=5, expires_at=10.0))
        >>> [l.units for l in ledger.due(now=10.0)], ledger.is_ended(("t1", "proc-1:1"))
        ([5], False)
        >>> ledger.end(lease)
        >>> ("t1", "proc-1:1") in ledger, ledger.is_ended(("t1", "proc-1:1"))
        (False, True)
    """

    __slots__ = (
        "_by_key",
        "_by_resource",
        "_changes",
        "_count",
        "_ended",
        "_expiries",
        "_leases",
        "_recalls",
    )

    def __init__(self, changes: ChangeLog | None = None) -> None:
        self._leases: dict[LeaseKey, Lease] = {}
        self._by_key: dict[str, set[str]] = {}  # lease key -> token ids
        self._by_resource: dict[str, set[LeaseKey]] = {}
        self._count: dict[str, int] = {}  # token id -> its live leases
        # (expires_at, token id, lease key): an entry is stale once its lease was renewed or
        # ended, and is skipped when it comes up.
        self._expiries: list[tuple[float, str, str]] = []
        self._recalls: dict[str, set[str]] = {}  # lease key -> token ids
        self._changes = changes if changes is not None else ChangeLog()
        self._ended = EndedKeys(self._changes, window=TOMBSTONES)

    # ------------------------------------------------------------------------------- mapping

    def __getitem__(self, key: LeaseKey) -> Lease:
        return self._leases[key]

    def __iter__(self) -> Iterator[LeaseKey]:
        return iter(self._leases)

    def __len__(self) -> int:
        return len(self._leases)

    # ------------------------------------------------------------------------- add, renew, end

    def add(self, lease: Lease) -> Lease:
        """Record a new lease under a key that holds none; returns it."""
        key = lease.ident
        self._leases[key] = lease
        self._by_key.setdefault(lease.key, set()).add(lease.token_id)
        self._by_resource.setdefault(lease.resource, set()).add(key)
        self._count[lease.token_id] = self._count.get(lease.token_id, 0) + 1
        self._ended.started(key)
        heapq.heappush(self._expiries, (lease.expires_at, lease.token_id, lease.key))
        self._changes.leases.add(key)
        return lease

    def extend(self, lease: Lease, expires_at: float) -> None:
        """Move the lease's expiry to ``expires_at``."""
        lease.expires_at = expires_at
        heapq.heappush(self._expiries, (expires_at, lease.token_id, lease.key))

    def extend_key(self, key: str, expires_at: float) -> list[Lease]:
        """Move the expiry of every lease under the lease key ``key``; returns them."""
        leases = [self._leases[(token_id, key)] for token_id in self._by_key.get(key, ())]
        for lease in leases:
            self.extend(lease, expires_at)
        return leases

    def end(self, lease: Lease) -> None:
        """Drop the lease and remember its key as ended, with the debt it had applied."""
        self._ended.stopped(lease.ident, lease.debt)
        self._drop(lease)

    def mark_ended(self, key: LeaseKey, debt: int) -> None:
        """Remember ``key`` as ended (before its lease is dropped, or again with later debt)."""
        self._ended.mark(key, debt)

    def ended_debt(self, key: LeaseKey) -> int | None:
        """The debt applied under ``key`` when it ended, or None if it has not ended (or that
        is no longer known)."""
        return self._ended.debt(key)

    def take_late_debt(self, key: LeaseKey, wanted: int, cap: int) -> int:
        """How much of ``wanted`` late debt under the ended ``key`` to charge (see
        :meth:`EndedKeys.take_late`)."""
        return self._ended.take_late(key, wanted, cap)

    def is_ended(self, key: LeaseKey) -> bool:
        """Whether ``key`` ended: it is never used for a lease again."""
        return self._ended.covers(key, live=key in self._leases)

    def tick(self, now: float) -> None:
        """The time is ``now`` (see :meth:`EndedKeys.tick`)."""
        self._ended.tick(now)

    def token_closed(self, token_id: str) -> None:
        """The token is closed: its lease keys need not be remembered beyond its leases."""
        self._ended.token_closed(token_id)

    def _drop(self, lease: Lease) -> None:
        key = lease.ident
        del self._leases[key]
        left = self._count.pop(lease.token_id) - 1
        if left:
            self._count[lease.token_id] = left
        self._changes.leases.add(key)
        self._changes.resources.add(lease.resource)
        self._by_resource[lease.resource].discard(key)
        tokens = self._by_key[lease.key]
        tokens.discard(lease.token_id)
        if not tokens:
            del self._by_key[lease.key]

    # -------------------------------------------------------------------------------- expiry

    def due(self, now: float) -> Iterator[Lease]:
        """Leases whose expiry is at or before ``now``, earliest first.

        Each is taken off the expiry order as it is yielded; the caller ends it (or renews it)
        before asking for the next, and leases added or renewed meanwhile are seen.
        """
        while self._expiries and self._expiries[0][0] <= now:
            expires_at, token_id, key = heapq.heappop(self._expiries)
            lease = self._leases.get((token_id, key))
            if lease is not None and lease.expires_at == expires_at:
                yield lease

    def next_expiry(self) -> float | None:
        """The earliest expiry on record (possibly of a lease renewed since), or None."""
        return self._expiries[0][0] if self._expiries else None

    # --------------------------------------------------------------------------- by owner

    def has_leases(self, token_id: str) -> bool:
        """Whether any lease of the token is live."""
        return token_id in self._count

    def leases_of(self, token_id: str) -> int:
        """How many leases of the token are live."""
        return self._count.get(token_id, 0)

    def tokens_of(self, key: str) -> Collection[str]:
        """The tokens leased under the lease key ``key``."""
        return self._by_key.get(key, set())

    def of_resource(self, resource: str) -> Iterator[Lease]:
        """The live leases of ``resource``."""
        return (self._leases[key] for key in self._by_resource.get(resource, ()))

    def recall(self, resource: str) -> None:
        """Mark every holder of a lease of ``resource`` to be told to give spare units back."""
        for token_id, key in self._by_resource.get(resource, ()):
            self._recalls.setdefault(key, set()).add(token_id)

    def take_recalls(self) -> dict[str, set[str]]:
        """The recalls marked since the last call, per lease key: the token ids to give back."""
        recalls, self._recalls = self._recalls, {}
        return recalls
