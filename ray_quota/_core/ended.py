"""Lease keys that ended, remembered so that none of them ever starts a lease again, in memory
that grows with holders rather than with keys.

A holder mints its lease keys as ``holder:n`` with ``n`` growing (see
:mod:`ray_quota._core.protocol`; a node broker's keys carry a suffix, ``holder:n.digest``), and starts the leases of one token in that order: it moves to a
new key only once it is done with the last. So for each token and holder it is enough to know
the highest ``n`` that held a lease: a key at or below it that holds none now ended, or was
skipped and is as good as ended (a holder that asks under it anyway is told the lease ended, and
carries on under a new key). Churn cannot outrun this, unlike a count of ended keys.

Besides those marks, the latest ended keys are remembered exactly, with the debt applied by then
(a late report's overuse is still owed), as are keys that do not read as ``holder:n``. A mark
is forgotten once its token is closed (a closed token takes no leases) or its holder held no
lease of it for :data:`HOLDER_MEMORY_S`. The store keeps what a restart needs: the exact keys and,
for each mark, the highest key that ended under it (the rest comes back with the live leases).
"""

from __future__ import annotations

import functools
from collections import OrderedDict

from ray_quota._core.protocol import HOLDER_MEMORY_S
from ray_quota._core.state import ChangeLog, LeaseKey

Group = tuple[str, str]  # (token id, holder)


class _Mark:
    """A holder's highest lease key for one token, and the highest of its keys that ended."""

    __slots__ = ("debt", "key", "key_n", "live", "top")

    def __init__(self) -> None:
        self.top = -1  # the highest n that held a lease
        self.live = 0  # leases live under the holder's keys
        self.key: str | None = None  # the highest key that ended, kept on record
        self.key_n = -1  # its n
        self.debt = 0  # the debt applied under ``key`` by its end


@functools.lru_cache(maxsize=1024)  # a key is looked at several times while its lease ends
def _parse(key: LeaseKey) -> tuple[Group, int] | None:
    """(token id, holder) and ``n`` of a lease key ``holder:n`` (see
    :func:`~ray_quota._core.protocol.holder_of`); None for another form."""
    token_id, lease_key = key
    holder, _, tail = lease_key.rpartition(":")
    tail = tail.partition(".")[0]  # a broker's key ends with its adoption suffix, ``.digest``
    if not (holder and 0 < len(tail) <= 18 and tail.isascii() and tail.isdigit()):
        return None
    return (token_id, holder), int(tail)


class EndedKeys:
    """Which lease keys ended, for a :class:`~ray_quota._core.ledger.LeaseLedger`.

    Example:
        >>> ended = EndedKeys(window=1)
        >>> ended.started(("t1", "p:1"))
        >>> ended.stopped(("t1", "p:1"), debt=0)
        >>> ended.mark(("t1", "q:7"), 0)  # another key ends: p:1 leaves the exact window
        >>> [ended.covers(("t1", f"p:{n}"), live=False) for n in range(3)]
        [True, True, False]
    """

    __slots__ = ("_changes", "_closing", "_idle", "_late", "_marks", "_now", "_recent",
                 "_window")

    def __init__(self, changes: ChangeLog | None = None, *, window: int) -> None:
        self._window = window
        self._recent: OrderedDict[LeaseKey, int] = OrderedDict()  # latest ended -> debt
        self._marks: dict[str, dict[str, _Mark]] = {}  # token id -> holder -> mark
        self._idle: OrderedDict[Group, float] = OrderedDict()  # marks with no live lease
        self._closing: set[str] = set()  # closed tokens whose marks go once they are idle
        self._changes = changes if changes is not None else ChangeLog()
        self._now = float("-inf")  # the time of the last tick
        # Late debt taken since the restart, per (token, holder); per key for other keys.
        self._late: dict[Group | LeaseKey, int] = {}

    # -------------------------------------------------------------------------------- leases

    def started(self, key: LeaseKey) -> None:
        """A lease under ``key`` was added."""
        if (parsed := _parse(key)) is None:
            return
        group, n = parsed
        mark = self._marks.setdefault(group[0], {}).setdefault(group[1], _Mark())
        mark.top = max(mark.top, n)
        mark.live += 1
        self._idle.pop(group, None)

    def stopped(self, key: LeaseKey, debt: int) -> None:
        """The lease under ``key`` ended with ``debt`` applied: its key is ended."""
        self.mark(key, debt)
        if (parsed := _parse(key)) is None:
            return
        group = parsed[0]
        mark = self._marks[group[0]][group[1]]
        mark.live -= 1
        if not mark.live:
            if group[0] in self._closing:
                self._forget(group)
            else:
                self._idle[group] = self._now

    def mark(self, key: LeaseKey, debt: int) -> None:
        """Remember ``key`` as ended, with ``debt`` applied by then (again with later debt)."""
        self._recent[key] = debt
        self._changes.ended[key] = debt
        self._changes.forgotten.discard(key)
        if (parsed := _parse(key)) is not None:
            group, n = parsed
            holders = self._marks.setdefault(group[0], {})
            if (mark := holders.get(group[1])) is None:
                mark = holders[group[1]] = _Mark()
                self._idle[group] = self._now  # known from the store only: no lease live
            mark.top = max(mark.top, n)
            if n >= mark.key_n:
                old, mark.key, mark.key_n, mark.debt = mark.key, key[1], n, debt
                if old is not None and old != key[1]:
                    self._release((key[0], old))
        while len(self._recent) > self._window:
            self._release(self._recent.popitem(last=False)[0])

    # ------------------------------------------------------------------------------- queries

    def covers(self, key: LeaseKey, *, live: bool) -> bool:
        """Whether ``key`` ended, or can no longer start a lease; ``live`` says whether a
        lease is live under it (a live lease that ends is marked before it is dropped)."""
        if key in self._recent:
            return True
        parsed = _parse(key)
        if live or parsed is None:
            return False
        (token_id, holder), n = parsed
        mark = self._marks.get(token_id, {}).get(holder)
        return mark is not None and n <= mark.top

    def debt(self, key: LeaseKey) -> int | None:
        """The debt applied under ``key`` when it ended, or None if that is not known."""
        if key in self._recent:
            return self._recent[key]
        parsed = _parse(key)
        if parsed is None:
            return None
        mark = self._marks.get(key[0], {}).get(parsed[0][1])
        return mark.debt if mark is not None and mark.key == key[1] else None

    def take_late(self, key: LeaseKey, wanted: int, cap: int) -> int:
        """How much of ``wanted`` debt reported late under the ended ``key`` to charge: at most
        ``cap`` in all per token and holder. An honest holder's late overuse (it was frozen
        past its lease) is one commit's, or a few; a holder that no longer owns the token could
        otherwise add ``cap`` with every report, or under every key it ever used. (Counted in
        memory: a restart allows one more ``cap``.)"""
        parsed = _parse(key)
        late_key = parsed[0] if parsed is not None else key
        taken = self._late.get(late_key, 0)
        granted = max(0, min(wanted, cap - taken))
        if granted:
            self._late[late_key] = taken + granted
        return granted

    # ------------------------------------------------------------------------------ forgetting

    def tick(self, now: float) -> None:
        """The time is ``now``: forget marks whose holder held no lease for the horizon."""
        self._now = now
        while self._idle:
            group, since = next(iter(self._idle.items()))
            if since + HOLDER_MEMORY_S > now:
                break
            self._forget(group)

    def token_closed(self, token_id: str) -> None:
        """The token is closed: forget its marks, each once no lease of it is live."""
        for holder, mark in list(self._marks.get(token_id, {}).items()):
            if not mark.live:
                self._forget((token_id, holder))
        if self._marks.get(token_id):
            self._closing.add(token_id)

    def _forget(self, group: Group) -> None:
        token_id, holder = group
        holders = self._marks[token_id]
        mark = holders.pop(holder)
        self._idle.pop(group, None)
        self._late.pop(group, None)
        if not holders:
            del self._marks[token_id]
            self._closing.discard(token_id)
        if mark.key is not None:
            self._release((token_id, mark.key))

    def _release(self, key: LeaseKey) -> None:
        """The store forgets the ended ``key`` unless it is still in the exact window or its
        mark's record."""
        if key in self._recent:
            return
        if (parsed := _parse(key)) is not None:
            mark = self._marks.get(key[0], {}).get(parsed[0][1])
            if mark is not None and mark.key == key[1]:
                return
        self._changes.ended.pop(key, None)
        self._changes.forgotten.add(key)
        self._late.pop(key, None)
