"""The whole system as its sans-IO parts, on one fake clock: an executor (``ExecutorService`` and a
real SQLite ``StateStore``, written before anything is answered), and processes whose tokens keep
their leases in ``LeaseSet``s, as ``QuotaToken`` does. Calls are delivered at once; time moves
only when a test moves it.

What the processes did is recorded here, by them (``Records``): every reservation they opened,
when, and what its commit said it used. The checks read those records, never the executor's
counters.
"""

from __future__ import annotations

import bisect
import itertools
import math
import sqlite3
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fakes import FakeClock

from ray_quota._core.credentials import add_proofs, holder_id, make_claim
from ray_quota._core.holder import LeaseSet, LocalLease
from ray_quota._core.protocol import Grant, Report, prefetch_cap
from ray_quota._core.resource import Policy
from ray_quota._core.service import ExecutorService
from ray_quota._errors import ExecutorUnavailableError, LeaseEndedError, QuotaError
from ray_quota._spec import Enforcement, Kind, ResourceSpec
from ray_quota._store import StateStore

RATE = ResourceSpec("rate", Kind.RATE, value=50, period_s=1.0, burst=25)
CAP = ResourceSpec("cap", Kind.CAPACITY, value=400, enforcement=Enforcement.REJECT,
                   wait_limit_s=1.0)
CONC = ResourceSpec("conc", Kind.CONCURRENCY, value=3, wait_limit_s=30.0)
SPECS = {spec.name: spec for spec in (RATE, CAP, CONC)}
POLICY = Policy(lease_ttl_s=4.0, orphan_grace_s=6.0)
EPS = 1e-6


class Crashed(Exception):
    """The executor failed to write its state and went down; Ray would restart it."""


class FlakyStore(StateStore):
    """A real store whose next write can be made to fail, as a full or locked disk does."""

    fail_next = False

    def write(self, changes: Any) -> None:
        if self.fail_next:
            self.fail_next = False
            raise sqlite3.OperationalError("database or disk is full")
        super().write(changes)


class Executor:
    """The executor actor's rules around the service: write the outbox's changes first, then
    answer; a failed write takes the executor down (it restarts from what is on disk)."""

    def __init__(self, clock: FakeClock, path: Path) -> None:
        self.clock = clock
        self.path = path
        self.store = FlakyStore(path)
        self.restarts = 0
        ids = itertools.count()
        self._new_id = lambda: f"tok-{next(ids)}"
        self.service = ExecutorService(SPECS, clock=clock, policy=POLICY, new_id=self._new_id)
        self.store.start("cluster", "test")
        self.saved_at = clock.now
        self.waiting: dict[int, Callable[[Grant | QuotaError], None]] = {}
        self.recall: Callable[[str, frozenset[str]], None] = lambda holder, ids: None
        self._deliver()

    def call(self, method: str, *args: Any) -> Any:
        """Make one call; raise its error; raise :class:`Crashed` if its write failed."""
        answer = getattr(self.service, method)(*args)
        self._deliver()
        if isinstance(answer, QuotaError):
            raise answer
        return answer

    def tick(self) -> None:
        self.service.tick()
        self._deliver()

    def restart(self) -> None:
        """Come back from the store, as Ray restarts a dead executor: answers not yet given
        are lost with the old one."""
        self.restarts += 1
        self.store.close()
        self.store = FlakyStore(self.path)
        saved = self.store.load()
        assert saved is not None
        self.service = ExecutorService(SPECS, clock=self.clock, policy=POLICY,
                                       new_id=self._new_id)
        self.service.restore(saved.resources, saved.tokens, saved.leases,
                             elapsed_s=self.clock.now - self.saved_at, ended=saved.ended)
        lost, self.waiting = self.waiting, {}
        for answer in lost.values():
            answer(ExecutorUnavailableError("the executor died before answering"))

    def _deliver(self) -> None:
        outbox = self.service.drain()
        try:
            for changes in outbox.changes:
                self.store.write(changes)
        except sqlite3.Error:
            self.restart()
            raise Crashed() from None
        if outbox.changes:
            self.saved_at = self.clock.now
        for resolved in outbox.resolved:
            answer = self.waiting.pop(resolved.ticket, None)
            if answer is not None:
                answer(resolved.outcome)
        for recall in outbox.recalls:
            self.recall(recall.holder, recall.token_ids)


@dataclass(eq=False)
class Held:
    """An open reservation, as the process that holds it knows it."""

    handle: Handle
    lease: LocalLease
    amount: int
    opened_at: float


@dataclass(eq=False)
class Handle:
    """One process's handle of a token: what ``QuotaToken`` keeps."""

    token_id: str
    resource: str
    generation: int
    leases: LeaseSet
    expected_use: int
    parent: str | None = None
    proofs: tuple[str, ...] = ()  # what the pickled bytes of a move carried
    live: bool = True  # False once closed, merged or moved away
    waiting: int = 0  # requests of this handle waiting at the executor


@dataclass
class Records:
    """What processes say they did, per resource: reservations (opened, amount, used or None
    while open), and overuse each commit declared beyond what its lease could cover."""

    opened: dict[str, list[list[Any]]] = field(default_factory=lambda: defaultdict(list))
    debt: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # (time, units the processes held of the resource when the clock reached it)
    held: dict[str, list[tuple[float, int]]] = field(default_factory=lambda: defaultdict(list))

    def open(self, resource: str, now: float, amount: int) -> list[Any]:
        entry = [now, amount, None]  # opened at, amount, used within grants (None: open)
        self.opened[resource].append(entry)
        return entry


class Process:
    """A worker process: a holder id, a claimant, and its token handles."""

    def __init__(self, name: str, world: World) -> None:
        self.name = name
        self.world = world
        # A secret of its own (deterministic here), and the holder id it proves.
        self.secret = f"{name}-{next(world.incarnations)}"
        self.holder = holder_id(self.secret, self.secret)
        self.claimant = make_claim(f"process:{self.holder}", self.secret)
        self.keys = itertools.count()
        self.handles: list[Handle] = []
        self.held: list[tuple[Held, list[Any]]] = []
        self.frozen_until = -math.inf
        self.dead = False
        self.cut_off = False  # frozen once for longer than a lease lives: presumed dead

    def new_key(self) -> str:
        return f"{self.holder}:{next(self.keys)}"

    def claim(self, *handles: Handle) -> str:
        """The claim the token calls about ``handles`` carry: with the proofs they came with."""
        return add_proofs(self.claimant, [proof for handle in handles for proof in handle.proofs])

    def adopt_handle(self, token_id: str, resource: str, generation: int, expected_use: int,
                     parent: str | None, proofs: tuple[str, ...] = ()) -> Handle:
        spec = SPECS[resource]
        handle = Handle(token_id, resource, generation,
                        LeaseSet(token_id, spec.kind, max_prefetch=prefetch_cap(spec),
                                 new_key=self.new_key), expected_use, parent, proofs)
        self.handles.append(handle)
        return handle

    @property
    def frozen(self) -> bool:
        return self.world.clock.now < self.frozen_until

    # -------------------------------------------------------------------------- reservations

    def reserve(self, handle: Handle, amount: int) -> str:
        """Reserve as ``QuotaToken.reserve`` does; returns what happened."""
        now = self.world.clock.now
        lease = handle.leases.take(amount, now)
        if lease is not None:
            self._opened(handle, lease, amount)
            return "local"
        lease = handle.leases.current
        sent_at = now
        queued = False

        def answer(outcome: Grant | QuotaError) -> None:
            if queued:
                handle.waiting -= 1
            if self.dead:
                return
            if isinstance(outcome, Grant):
                if handle.leases.granted(lease, amount, outcome, sent_at=sent_at):
                    self._opened(handle, lease, amount)
            elif isinstance(outcome, LeaseEndedError):
                handle.leases.ended(lease)
            elif isinstance(outcome, ExecutorUnavailableError):
                handle.leases.lost(lease)

        executor = self.world.executor
        try:
            ticket = executor.call("acquire", handle.token_id, handle.generation,
                                   self.claim(handle), lease.key, amount, lease.prefetch(), None,
                                   self.secret)
        except Crashed:
            answer(ExecutorUnavailableError("lost"))
            return "lost"
        except QuotaError as exc:
            answer(exc)
            return type(exc).__name__
        if ticket.outcome is None:
            executor.waiting[ticket.id] = answer
            handle.waiting += 1
            queued = True
            return "waiting"
        answer(ticket.outcome)
        return "granted" if isinstance(ticket.outcome, Grant) else type(ticket.outcome).__name__

    def _opened(self, handle: Handle, lease: LocalLease, amount: int) -> None:
        now = self.world.clock.now
        entry = self.world.records.open(handle.resource, now, amount)
        self.held.append((Held(handle, lease, amount, now), entry))

    def commit(self, index: int, used: int) -> None:
        held, entry = self.held.pop(index % len(self.held))
        lease = held.lease
        debt_before = lease.debt
        report = held.handle.leases.settle(lease, held.amount, used)
        uncovered = lease.debt - debt_before  # overuse the lease's spare could not cover
        entry[2] = used - uncovered
        self.world.records.debt[held.handle.resource] += uncovered
        if report is not None:
            self.world.send("settle", [report], self.secret)

    # ------------------------------------------------------------------------------ renewals

    def renew(self) -> None:
        now = self.world.clock.now
        reports = [report for handle in self.handles
                   for report in handle.leases.reports(now, live=handle.live)]
        try:
            alive = self.world.executor.call("renew", self.holder, reports, self.secret)
        except Crashed:
            return  # the next renewal reports the same totals again
        for handle in self.handles:
            handle.leases.renewed(alive, now)
        self.handles = [h for h in self.handles if h.live or h.leases.reserved
                        or any(lease.active and not lease.final for lease in h.leases)]

    def recalled(self, token_ids: frozenset[str]) -> None:
        if self.dead or self.frozen:
            return
        reports = [report for handle in self.handles if handle.token_id in token_ids
                   and (report := handle.leases.recall()) is not None]
        if reports:
            self.world.send("settle", reports, self.secret)

    def final_reports(self, handle: Handle) -> list[Report]:
        """The handle ends (close, merge, merge back): its open reservations end with it,
        counted as used in full, as the contract says."""
        handle.live = False
        for held, entry in [pair for pair in self.held if pair[0].handle is handle]:
            self.held.remove((held, entry))
            entry[2] = held.amount
        return handle.leases.final_reports()


class World:
    """An executor and a few processes on one fake clock, with the processes' records."""

    def __init__(self, path: Path, processes: int = 3) -> None:
        self.clock = FakeClock()
        self.incarnations = itertools.count()
        self.executor = Executor(self.clock, path)
        self.executor.recall = self._recall
        self.records = Records()
        self.processes = [Process(f"p{i}", self) for i in range(processes)]

    def live_processes(self) -> Iterator[Process]:
        return (p for p in self.processes if not p.dead and not p.frozen)

    def send(self, method: str, *args: Any) -> None:
        """A call whose answer nobody waits for (settle): lost if the executor goes down."""
        try:
            self.executor.call(method, *args)
        except (Crashed, QuotaError):
            pass

    def token_call(self, method: str, *args: Any) -> Any:
        """A token call, retried once after an executor restart (as the client's retry does)."""
        try:
            return self.executor.call(method, *args)
        except Crashed:
            return self.executor.call(method, *args)

    def advance(self, seconds: float, *, renew_every: float = 1.0) -> None:
        """Let ``seconds`` pass: the executor ticks at its wake-ups, processes renew on time."""
        end = self.clock.now + seconds
        next_renewal = math.floor(self.clock.now / renew_every + 1) * renew_every
        while True:
            wake = min(self.executor.service.next_wakeup(), next_renewal)
            if wake > end:
                break
            self.clock.set(max(self.clock.now, wake))
            self._snapshot()
            self._tick()
            if self.clock.now >= next_renewal - EPS:
                next_renewal += renew_every
                for process in list(self.live_processes()):
                    process.renew()
        self.clock.set(end)
        self._snapshot()
        self._tick()

    def _snapshot(self) -> None:
        held: dict[str, int] = defaultdict(int)
        for process in self.processes:
            if not process.dead:
                for handle in process.handles:
                    held[handle.resource] += sum(lease.held for lease in handle.leases)
        for resource in SPECS:
            self.records.held[resource].append((self.clock.now, held[resource]))

    def _tick(self) -> None:
        try:
            self.executor.tick()
        except Crashed:
            pass

    def _recall(self, holder: str, token_ids: frozenset[str]) -> None:
        for process in self.processes:
            if process.holder == holder:
                process.recalled(token_ids)


# --------------------------------------------------------------------------------- checks


def rate_excess(records: Records, spec: ResourceSpec) -> float:
    """The most units used in a window [t1, t2] beyond burst + rate x (t2 - t1), what the
    processes held when the window opened (granted before it), and the overuse they declared."""
    events = sorted((t, amount if used is None else min(used, amount))
                    for t, amount, used in records.opened[spec.name])
    snapshots = records.held[spec.name]
    times = [t for t, _ in snapshots]
    worst = -math.inf
    for i, (t1, _) in enumerate(events):
        at = bisect.bisect_right(times, t1 + EPS) - 1
        held = snapshots[at][1] if at >= 0 else 0
        total = 0.0
        for t2, units in events[i:]:
            total += units
            worst = max(worst, total - spec.burst - spec.refill_per_s * (t2 - t1) - held)
    return worst - records.debt[spec.name]


def consumed(records: Records, resource: str) -> int:
    """Units used of ``resource`` within grants: committed use, open reservations in full."""
    return sum(amount if used is None else used for _, amount, used in records.opened[resource])


def slots_in_use(world: World) -> int:
    """Concurrency slots held now by processes that are alive and whose lease they may trust:
    a process frozen past its lease's trust has lost its slots, by the lease contract."""
    now = world.clock.now
    return sum(held.amount for process in world.processes if not process.dead
               for held, _ in process.held
               if held.handle.resource == CONC.name
               and (not process.frozen or held.lease.valid_until > now))


# ------------------------------------------------------------------------------ workloads


def backlog(world: World, resource: str, weights: list[int], *, seconds: float,
            one_shot: tuple[int, int] | None = None, hold_s: float | list[float] = 0.0,
            amount: int | list[int] | None = None, parallel: int = 1,
            step_s: float = 0.05) -> tuple[list[int], list[float], int]:
    """Keep one token per weight backlogged on ``resource`` for ``seconds``: each always has a
    request out for ``amount`` units (its expected use if not given; a list: per token) and
    commits it in full as soon as it has
    it (or after ``hold_s``, per token if a list), with ``parallel`` requests out at a time
    (as that many threads of one task would). ``one_shot=(count, weight)`` adds a stream of fresh tokens, one
    request each, ``count`` of them waiting at any time, as ``@quota`` opens per call.

    Returns the units each backlogged token was granted, each one's longest wait, and how many
    one-shot tokens were served.
    """
    spec = SPECS[resource]
    workers = [p for p in world.processes if not p.dead][:2]
    assert workers, "no process left to work"
    worker, streamer = workers[0], workers[-1]
    handles = []
    for weight in weights:
        info = world.token_call("open_token", resource, weight, worker.claimant, None)
        handles.append(worker.adopt_handle(info.id, resource, 0, weight, None))
    amounts = amount if isinstance(amount, list) else [amount or w for w in weights]
    holds = hold_s if isinstance(hold_s, list) else [hold_s] * len(weights)
    units = [0] * len(handles)
    asked_at: dict[int, float] = {}
    longest = [0.0] * len(handles)
    stream: list[Handle] = []
    served = 0
    end = world.clock.now + seconds
    while world.clock.now < end:
        now = world.clock.now
        for i, handle in enumerate(handles):
            mine = [pair for pair in worker.held if pair[0].handle is handle]
            for held, entry in mine:
                if now - held.opened_at >= holds[i] - EPS:
                    worker.commit(worker.held.index((held, entry)), held.amount)
                    units[i] += held.amount
                    longest[i] = max(longest[i], held.opened_at - asked_at.pop(i, now))
            out = handle.waiting + sum(p[0].handle is handle for p in worker.held)
            for _ in range(parallel - out):
                asked_at.setdefault(i, now)
                worker.reserve(handle, min(amounts[i], spec.ceiling))
        if one_shot is not None:
            count, weight = one_shot
            for handle in list(stream):
                if not handle.waiting:
                    for held, entry in [p for p in streamer.held if p[0].handle is handle]:
                        streamer.commit(streamer.held.index((held, entry)), held.amount)
                        served += 1
                    world.token_call("close", handle.token_id, 0, streamer.claimant,
                                     streamer.final_reports(handle), streamer.secret)
                    stream.remove(handle)
            while len(stream) < count:
                info = world.token_call("open_token", resource, weight, streamer.claimant, None)
                handle = streamer.adopt_handle(info.id, resource, 0, weight, None)
                stream.append(handle)
                streamer.reserve(handle, min(weight, spec.ceiling))
        world.advance(step_s)
    for handle in [*handles, *stream]:
        owner = worker if handle in handles else streamer
        world.token_call("close", handle.token_id, 0, owner.claimant, owner.final_reports(handle),
                         owner.secret)
    return units, longest, served
