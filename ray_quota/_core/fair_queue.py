"""The waiters of one resource, in the order stride scheduling serves them.

How passes move, and why, is the scheduler's (:mod:`ray_quota._core.scheduler`); this module only
orders by them. The rule, written into the data structure: each token's waiters form a FIFO, and
only the first of each is in a heap keyed ``(pass, seq, version)``, so the lowest pass goes first
and, at equal passes, the request that arrived first. When a first waiter leaves or its token's
pass moves, the token's (new) first waiter is pushed again with a higher version; the entries left
behind are stale: skipped when they come up, and swept once they outnumber the live entries, so a
token that waits while its pass keeps moving (reports, refunds, debt) cannot grow the heap.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ray_quota._core.protocol import Grant
from ray_quota._errors import QuotaError

BACKFILL_SCAN = 64  # waiters looked at when the head is blocked
STALE_SLACK = 64  # stale heap entries allowed beyond the live ones before a sweep


@dataclass(slots=True, eq=False)
class Ticket:
    """One acquire request; ``outcome`` is None while it waits."""

    id: int
    token_id: str
    key: str  # the lease key to grant into
    amount: int
    outcome: Grant | QuotaError | None = None


@dataclass(slots=True, eq=False)
class Flow:
    """A token as its queue sees it: its pass in virtual time, its weight, its waiters in order."""

    pass_: float
    expected_use: int
    waiters: deque[Waiter] = field(default_factory=deque)
    stamp: int = 0  # which of its entries in the virtual time's heaps is live (0: none yet)


@dataclass(slots=True, eq=False)
class Waiter:
    """A queued ticket. ``seq`` orders arrivals; ``version`` tells its live heap entry."""

    ticket: Ticket
    token: Flow
    prefetch: int
    deadline: float
    seq: int
    version: int = 0
    bypassed: int = 0  # units granted past it while it was a blocked head
    done: bool = False

    def finish(self) -> float:
        """Its finish tag: its token's pass once it is granted."""
        return self.token.pass_ + self.ticket.amount / self.token.expected_use


Entry = tuple[float, int, int, Waiter]  # (pass, seq, version, waiter) in the heap
Mark = tuple[float, int, Flow]  # (pass or minus it, stamp, token) in the virtual time's heaps


class FairQueue:
    """The waiters of one resource: per-token FIFOs, tokens in a heap by (pass, arrival).

    Example:
        >>> queue = FairQueue()
        >>> light, heavy = Flow(pass_=0.0, expected_use=1), Flow(pass_=0.0, expected_use=4)
        >>> first = Waiter(Ticket(1, "light", "p", 2), light, prefetch=0, deadline=9.0, seq=1)
        >>> queue.join(first)
        >>> queue.join(Waiter(Ticket(2, "heavy", "p", 2), heavy, prefetch=0, deadline=9.0, seq=2))
        >>> light.pass_ = 2.0; queue.rekey(light)  # light was granted 2 units elsewhere
        >>> queue.head().ticket.token_id, queue.waiting
        ('heavy', 2)
    """

    __slots__ = ("_bypass_factor", "_heap", "flows", "units", "virtual", "waiting")

    def __init__(self, bypass_factor: float = 1.0, credit_factor: float = 1.0) -> None:
        self._heap: list[Entry] = []
        self._bypass_factor = bypass_factor
        self.waiting = 0  # waiters queued, every token's
        self.units = 0  # units they ask for, summed
        self.flows = 0  # tokens with waiters: the live heap entries
        # Told of every change of a token's waiters or pass.
        self.virtual = VirtualTime(credit_factor)

    # ------------------------------------------------------------------------ join and leave

    def join(self, waiter: Waiter) -> None:
        """Queue ``waiter`` behind its token's earlier waiters."""
        waiters = waiter.token.waiters
        waiters.append(waiter)
        self.waiting += 1
        self.units += waiter.ticket.amount
        if len(waiters) == 1:
            self.flows += 1
            self.touch(waiter.token)
            self._push(waiter)

    def leave(self, waiter: Waiter) -> None:
        """Take ``waiter`` out, wherever it stands; its token's next waiter competes next."""
        waiters = waiter.token.waiters
        was_first = waiters and waiters[0] is waiter
        waiters.remove(waiter)
        waiter.done = True
        self.waiting -= 1
        self.units -= waiter.ticket.amount
        if not waiters:
            self.flows -= 1
            self.touch(waiter.token)
        elif was_first:
            self._push(waiters[0])

    def rekey(self, token: Flow) -> None:
        """Re-place ``token`` after its pass (or its expected use) changed."""
        self.touch(token)
        if token.waiters:
            self._push(token.waiters[0])

    def touch(self, token: Flow, *, closed: bool = False) -> None:
        """Count ``token`` as active or not (see :class:`VirtualTime`)."""
        self.virtual.place(token, closed=closed)

    def _push(self, waiter: Waiter) -> None:
        waiter.version += 1
        heap = self._heap
        heapq.heappush(heap, (waiter.token.pass_, waiter.seq, waiter.version, waiter))
        if len(heap) > 2 * self.flows + STALE_SLACK:
            heap[:] = self._live_entries(heap)
            heapq.heapify(heap)

    @property
    def bypass_factor(self) -> float:
        return self._bypass_factor

    @property
    def entries(self) -> int:
        """Heap entries held, stale ones included until swept (for tests)."""
        return len(self._heap)

    @staticmethod
    def _live_entries(entries: Iterable[Entry]) -> list[Entry]:
        return [entry for entry in entries if not entry[3].done and entry[2] == entry[3].version]

    @classmethod
    def _live(cls, entries: Iterable[Entry]) -> Iterator[Waiter]:
        return (entry[3] for entry in cls._live_entries(entries))

    # ------------------------------------------------------------------------------- order

    def head(self) -> Waiter | None:
        """The waiter served next: the lowest pass, then the earliest arrival."""
        heap = self._heap
        while heap:
            _, _, version, waiter = heap[0]
            if not waiter.done and version == waiter.version:
                return waiter
            heapq.heappop(heap)
        return None

    def firsts(self, limit: int) -> list[Waiter]:
        """The first waiters of the ``limit`` tokens served soonest, in that order: a walk down
        the heap from its root, stale entries stepped over, that costs ``limit`` (and the stale
        entries met), not the whole queue, and leaves the heap as it is."""
        heap, found = self._heap, list[Waiter]()
        frontier = [(heap[0], 0)] if heap else []  # entries are unique: indices never compared
        while frontier and len(found) < limit:
            (_, _, version, waiter), i = heapq.heappop(frontier)
            if not waiter.done and version == waiter.version:
                found.append(waiter)
            for child in (2 * i + 1, 2 * i + 2):
                if child < len(heap):
                    heapq.heappush(frontier, (heap[child], child))
        return found

    def waiters(self) -> list[Waiter]:
        """Every queued waiter, token by token, each token's in arrival order."""
        return [waiter for first in list(self._live(self._heap))
                for waiter in list(first.token.waiters)]

    def may_pass(self, head: Waiter) -> list[Waiter]:
        """Waiters allowed past a blocked head, within its bypass budget: those no further on in
        virtual time than the head, or that a fluid fair share would finish before it. Others
        would let a token of small requests take a large one's share."""
        budget = self._budget(head) - head.bypassed
        if budget < 1:
            return []
        head_pass, head_finish = head.token.pass_, head.finish()
        # Stale entries are left out before the cut: they must not hide the real candidates.
        return [w for w in self.firsts(BACKFILL_SCAN)
                if w is not head and w.ticket.amount <= budget
                and (w.token.pass_ <= head_pass or w.finish() <= head_finish)]

    def admit_past(self, head: Waiter, waiter: Waiter) -> bool:
        """Count ``waiter`` against ``head``'s bypass budget if it still fits; whether it did."""
        bypassed = head.bypassed + waiter.ticket.amount
        if bypassed > self._budget(head):
            return False
        head.bypassed = bypassed
        return True

    def _budget(self, head: Waiter) -> int:
        """Units, as multiples of a blocked head's request, smaller waiters may take before it."""
        return math.ceil(head.ticket.amount * self._bypass_factor)


class VirtualTime:
    """A resource's virtual time, and the weight of the active tokens it advances by.

    Stride scheduling follows a fluid fair share, in which every active token is served at a
    rate in proportion to its expected use; virtual time moves as the pass of such a token does:
    a grant of ``n`` units moves it by ``n / W``, ``W`` the active tokens' expected use, summed.

    A token is active while virtual time moving on still changes where it stands: while it
    waits, and else until virtual time is ``credit_factor`` past its pass (by then it has its
    maximum credit, which virtual time moving on no longer adds to; see
    :meth:`Resource.credit`). So a token between two requests of a backlog counts, with its
    pass at, a little ahead of or a little behind virtual time; one that only holds what it was
    granted (an open reservation, a broker's stock for its node, an idle token renewing an
    empty lease) stops counting a bounded while after its last grant. Counting holders for as
    long as they hold made virtual time lag the tokens competing, so that newcomers, entering
    at it, took more than their weight; counting only waiters, or only tokens with their pass
    ahead, let it run ahead of tokens busy between two requests. A closed token stands nowhere
    and stops counting at once: a stream of one-shot tokens is counted by the ones waiting,
    not also by those served and closed before them, which slowed virtual time and let the
    stream take more than its weight.

    The rule is written into the data: tokens not waiting sit in one of two heaps by horizon
    (where they stop counting), those ahead of virtual time (active) and those at or behind it,
    and virtual time crossing a horizon moves the token across. An entry is stale once its
    token was placed again (its ``stamp``).

    Example:
        >>> vt = VirtualTime(credit_factor=0.0)
        >>> holder, busy = Flow(pass_=1.0, expected_use=1), Flow(pass_=1.0, expected_use=3)
        >>> vt.place(holder); vt.place(busy)  # each granted its expected use
        >>> vt.weight
        4
        >>> vt.advance(4); vt.now, vt.weight  # the fluid share served both
        (1.0, 0)
        >>> vt.step_back(3); vt.now, vt.weight  # 3 units came back unused
        (0.25, 4)
    """

    __slots__ = ("_ahead", "_behind", "_counted", "_grace", "_placed", "_stamps", "now",
                 "weight")

    def __init__(self, credit_factor: float = 1.0) -> None:
        self.now = 0.0
        self.weight = 0  # expected use of the active tokens, summed
        self._grace = credit_factor  # how far behind virtual time a pass still counts
        self._counted: dict[Flow, int] = {}  # active token -> the weight counted for it
        self._placed: set[Flow] = set()  # tokens placed and not closed: bounds the heaps
        self._ahead: list[Mark] = []  # (horizon, stamp, token): not waiting, active
        self._behind: list[Mark] = []  # (-horizon, stamp, token): not waiting, not active
        self._stamps = 0

    def place(self, token: Flow, *, closed: bool = False) -> None:
        """Count ``token`` as active or not, after its waiters, pass or weight changed."""
        if closed:
            self._placed.discard(token)
            self._put(token, token.pass_, active=False, listed=False)
        else:
            self._placed.add(token)
            horizon = token.pass_ + self._grace
            self._put(token, horizon, active=bool(token.waiters) or horizon > self.now,
                      listed=not token.waiters)

    def advance(self, units: float) -> None:
        """Serve ``units`` in the fluid share: tokens whose horizon it reaches stop counting."""
        left = float(units)
        while left > 0:
            weight = max(1, self.weight)
            edge = self._first(self._ahead)
            if edge is None or self.now + left / weight < edge[0]:
                self.now += left / weight
                return
            left -= (edge[0] - self.now) * weight
            self.now = edge[0]
            while (edge := self._first(self._ahead)) is not None and edge[0] <= self.now:
                self._put(edge[2], edge[0], active=False, listed=True)

    def step_back(self, units: float) -> None:
        """Take ``units`` of service back (granted, then given back unused): tokens whose
        horizon it goes back below count again."""
        left = float(units)
        while left > 0:
            weight = max(1, self.weight)
            edge = self._first(self._behind)
            if edge is None or self.now - left / weight >= -edge[0]:
                self.now -= left / weight
                return
            left -= (self.now + edge[0]) * weight
            self.now = -edge[0]
            while (edge := self._first(self._behind)) is not None and -edge[0] >= self.now:
                self._put(edge[2], -edge[0], active=True, listed=True)

    def _put(self, token: Flow, horizon: float, *, active: bool, listed: bool) -> None:
        """Count ``token`` at its weight if ``active``, and list it by ``horizon`` if
        ``listed``; whatever entries it had are stale from now on."""
        weight = token.expected_use if active else 0
        self.weight += weight - self._counted.pop(token, 0)
        if weight:
            self._counted[token] = weight
        self._stamps += 1
        token.stamp = self._stamps
        if not listed:
            return
        heap = self._ahead if active else self._behind
        heapq.heappush(heap, (horizon if active else -horizon, token.stamp, token))
        if len(heap) > 2 * len(self._placed) + STALE_SLACK:
            heap[:] = [entry for entry in heap if entry[1] == entry[2].stamp]
            heapq.heapify(heap)

    @staticmethod
    def _first(heap: list[Mark]) -> Mark | None:
        """The heap's first live entry (stale ones before it are dropped), or None."""
        while heap and heap[0][1] != heap[0][2].stamp:
            heapq.heappop(heap)
        return heap[0] if heap else None

    @property
    def entries(self) -> int:
        """Heap entries held, stale ones included until swept (for tests)."""
        return len(self._ahead) + len(self._behind)
