"""The whole system as its sans-IO parts, on one fake clock: an executor (``ExecutorService`` and a
real SQLite ``StateStore``, written before anything is answered), node brokers (``BrokerCore``,
see ``system_broker``), and processes whose tokens keep their leases in ``LeaseSet``s, as
``QuotaToken`` does, some directly at the executor and some through their node's broker. Calls
are delivered at once; time moves only when a test moves it.

What the processes did is recorded here, by them (``Records``): every reservation they opened,
when, and what its commit said it used. The checks read those records, never the executor's
counters.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fakes import FakeClock
from system_broker import Node
from system_checks import consumed, held_slots, rate_excess, slots_in_use
from system_executor import CAP, CONC, EPS, POLICY, QUICK, RATE, SPECS, Crashed, Executor

from ray_quota._core.credentials import add_proofs, holder_id, make_claim
from ray_quota._core.holder import LeaseSet, LocalLease
from ray_quota._core.protocol import RENEW_INTERVAL_S, Grant, Renewed, Report, prefetch_cap
from ray_quota._errors import ExecutorUnavailableError, LeaseEndedError, QuotaError
from ray_quota._spec import Kind, ResourceSpec

__all__ = [  # the checks and the executor's settings, re-exported for the tests
    "CAP", "CONC", "EPS", "POLICY", "QUICK", "RATE", "SPECS", "Crashed", "Executor", "World", "backlog",
    "consumed", "held_slots", "rate_excess", "slots_in_use",
]

# Which node's broker each process leases through (None: directly at the executor): the model
# test's layout, and the plain one (three direct processes).
LAYOUT: tuple[str | None, ...] = (None, "a", "a", "b")
DIRECT: tuple[str | None, ...] = (None, None, None)


@dataclass(eq=False)
class Held:
    """An open reservation, as the process that holds it knows it."""

    handle: Handle
    lease: LocalLease
    amount: int
    opened_at: float
    # Its holder was frozen past its lease's trust while it was open: by the lease contract,
    # the units (a slot) are no longer its own, though it may go on to use them.
    lapsed: bool = False


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
    # The limits in force, from when (a limit changes when the executor has stored it).
    limits: dict[str, list[tuple[float, ResourceSpec]]] = field(
        default_factory=lambda: {name: [(0.0, spec)] for name, spec in SPECS.items()})
    # The most capacity that may be admitted in all: the limit, or, after it was lowered
    # below what was admitted then, what was admitted then (no new admission beyond it).
    capacity_bound: float = float(CAP.value)

    def open(self, resource: str, now: float, amount: int) -> list[Any]:
        entry = [now, amount, None]  # opened at, amount, used within grants (None: open)
        self.opened[resource].append(entry)
        return entry


class Process:
    """A worker process: a holder id, a claimant, its token handles, and the node broker it
    leases through (None: directly at the executor)."""

    def __init__(self, name: str, world: World, broker: Node | None = None) -> None:
        self.name = name
        self.world = world
        # A secret of its own (deterministic here), and the holder id it proves.
        self.secret = f"{name}-{next(world.incarnations)}"
        self.holder = holder_id(self.secret, self.secret)
        self.claimant = make_claim(f"process:{self.holder}", self.secret)
        self.broker = broker
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

    def freeze(self, seconds: float) -> None:
        """Stop for ``seconds`` (a long GC pause, a stalled node): no renewals, no answers
        to recalls. Reservations whose lease's trust runs out meanwhile have lapsed."""
        self.frozen_until = self.world.clock.now + seconds
        # Renewals come once a second: a freeze of two seconds less than a lease lives may
        # already let it expire, and the process then looks dead.
        self.cut_off |= seconds + 2.0 >= self.world.policy.lease_ttl_s
        for held, _ in self.held:
            held.lapsed |= held.lease.valid_until < self.frozen_until

    # ------------------------------------------------------------------------------ routing

    def _route(self) -> Node | None:
        """This process's broker, or None: if it died, take the leases over first (as
        ``_runtime/routing.py`` does when a call to the broker finds it dead)."""
        node = self.broker
        if node is None or not node.dead:
            return node
        self.broker = None
        entries = [entry for handle in self.handles for entry in handle.leases.adoptions()]
        adopted: set[tuple[str, str]] = set()
        if entries:
            try:
                adopted = {tuple(pair) for pair in
                           self.world.token_call("adopt", entries, self.secret)}
            except QuotaError:
                pass  # none adopted: each lease is replaced or dropped at its renewal
        # A lease the executor did not let it adopt is gone (the adoption is bound to the
        # token's current claim: a process the token moved away from cannot adopt): units
        # held under it, a slot included, are no longer its own, though it may go on to use
        # them. (Issue 13, item 2b's reservation that outlives its token's end on the node
        # is protected only while the broker lives.)
        for held, _ in self.held:
            if held.lease.via is not None and (held.handle.token_id, held.lease.key) \
                    not in adopted:
                held.lapsed = True
        for handle in self.handles:
            handle.leases.adopted(adopted)  # type: ignore[arg-type]
        return None

    def send(self, method: str, reports: list[Report]) -> None:
        """A settle nobody waits for, to the broker or the executor."""
        node = self._route()
        if node is not None:
            node.settle(reports, self.secret)
        else:
            self.world.send(method, reports, self.secret)

    def ending_call(self, method: str, ending: str, reports: list[Report], *args: Any) -> Any:
        """close, merge or merge_back (``args``: the token call's, its claim included),
        carrying the ending token's final lease totals, and this process's secret."""
        node = self._route()
        if node is not None:
            return node.ending(method, ending, reports, self.secret, *args)
        return self.world.token_call(method, *args, reports, self.secret)

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
        state = {"queued": False, "done": False}

        def answer(outcome: Grant | QuotaError) -> None:
            state["done"] = True
            if state["queued"]:
                handle.waiting -= 1
            if self.dead:
                return
            if isinstance(outcome, Grant):
                if handle.leases.granted(lease, amount, outcome, sent_at=sent_at):
                    self._opened(handle, lease, amount)
            elif isinstance(outcome, LeaseEndedError):
                handle.leases.ended(lease)
            elif isinstance(outcome, ExecutorUnavailableError):
                # Its broker died while it waited: routing takes the leases over before the
                # call raises (``routing.leasing``), so the lease is adopted, then retired.
                self._route()
                handle.leases.lost(lease)

        died = self.broker is not None and self.broker.dead
        broker = self._route()
        if died:
            # Its broker died: the leases were taken over, and the outcome of the request is
            # unknown (routing raises).
            answer(ExecutorUnavailableError("the node's broker died"))
            return "lost"
        args = (handle.token_id, handle.generation, self.claim(handle), lease.key, amount,
                lease.prefetch())
        if broker is not None:
            broker.acquire(handle.resource, *args, self.secret, answer)
            outcome = "granted"
        else:
            outcome = self.world.executor_acquire(answer, self.secret, *args)
        if not state["done"]:
            handle.waiting += 1
            state["queued"] = True
            return "waiting"
        return outcome

    def _opened(self, handle: Handle, lease: LocalLease, amount: int) -> None:
        now = self.world.clock.now
        entry = self.world.records.open(handle.resource, now, amount)
        self.held.append((Held(handle, lease, amount, now), entry))

    def commit(self, index: int, used: int) -> int:
        """Close a reservation as used ``used``; returns the overuse its lease could not
        cover (the debt it declared)."""
        held, entry = self.held.pop(index % len(self.held))
        lease = held.lease
        debt_before = lease.debt
        report = held.handle.leases.settle(lease, held.amount, used)
        uncovered = lease.debt - debt_before  # overuse the lease's spare could not cover
        entry[2] = used - uncovered
        self.world.records.debt[held.handle.resource] += uncovered
        if report is not None:
            self.send("settle", [report])
        return uncovered

    # ------------------------------------------------------------------------------ renewals

    def renew(self) -> None:
        now = self.world.clock.now
        reports = [report for handle in self.handles
                   for report in handle.leases.reports(now, live=handle.live)]
        node = self._route()
        alive: Renewed
        if node is not None:
            alive = node.renew(self.holder, reports, self.secret)
        else:
            try:
                alive = self.world.executor.call("renew", self.holder, reports, self.secret)
            except Crashed:
                return  # the next renewal reports the same totals again
        for handle in self.handles:
            handle.leases.renewed(alive, now)
        # As the renewer's weak set: a handle stays while anything can still reach it (a
        # request of it waiting, moved away or not, holds it, and its grant renews a lease).
        self.handles = [h for h in self.handles if h.live or h.waiting or h.leases.reserved
                        or any(lease.active and not lease.final for lease in h.leases)]

    def recalled(self, token_ids: frozenset[str]) -> None:
        if self.dead or self.frozen:
            return
        reports = [report for handle in self.handles if handle.token_id in token_ids
                   and (report := handle.leases.recall()) is not None]
        if reports:
            self.send("settle", reports)

    def final_reports(self, handle: Handle) -> list[Report]:
        """The handle ends (close, merge, merge back): its open reservations end with it,
        counted as used in full, as the contract says."""
        handle.live = False
        for held, entry in [pair for pair in self.held if pair[0].handle is handle]:
            self.held.remove((held, entry))
            entry[2] = held.amount
        return handle.leases.final_reports()


class World:
    """An executor, node brokers and a few processes on one fake clock, with the processes'
    records. ``layout`` names each process's node broker (None: it leases directly)."""

    def __init__(self, path: Path, layout: tuple[str | None, ...] = DIRECT) -> None:
        self.clock = FakeClock()
        self.policy = POLICY
        self.specs = dict(SPECS)  # the limits in force
        self.incarnations = itertools.count()
        self.renewals = 0  # renewal rounds so far (brokers', then processes')
        self.executor = Executor(self.clock, path)
        self.executor.recall = self.recall_holder
        self.records = Records()
        self.nodes: dict[str, Node] = {name: Node(name, self) for name in layout if name}
        self.processes = [Process(f"p{i}", self, self.nodes[node] if node else None)
                          for i, node in enumerate(layout)]
        self.node_of = {f"p{i}": node for i, node in enumerate(layout)}

    def live_processes(self) -> Iterator[Process]:
        return (p for p in self.processes if not p.dead and not p.frozen)

    def replace(self, process: Process) -> Process:
        """A new process in the place of a dead one, on the same node (with a new broker if
        that node's broker died)."""
        node_name = self.node_of[process.name.rstrip("'")]
        node = None
        if node_name is not None:
            if self.nodes[node_name].dead:
                self.nodes[node_name] = Node(node_name, self)
            node = self.nodes[node_name]
        new = Process(process.name + "'", self, node)
        self.processes.append(new)
        return new

    def kill_broker(self, name: str) -> None:
        """The node's broker dies; a new one will serve processes that start there later."""
        self.nodes[name].die()

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

    def executor_acquire(self, answer: Callable[[Grant | QuotaError], None], secret: str,
                         *args: Any) -> str:
        """An acquire at the executor, made with ``secret`` (the caller's: a process's, or
        a broker's); ``answer`` gets its outcome now or when it comes."""
        executor = self.executor
        try:
            ticket = executor.call("acquire", *args, None, secret)
        except Crashed:
            answer(ExecutorUnavailableError("lost"))
            return "lost"
        except QuotaError as exc:
            answer(exc)
            return type(exc).__name__
        if ticket.outcome is None:
            executor.waiting[ticket.id] = answer
            return "waiting"
        answer(ticket.outcome)
        return "granted" if isinstance(ticket.outcome, Grant) else type(ticket.outcome).__name__

    def set_limit(self, spec: ResourceSpec, *, apply: bool = False) -> bool:
        """Change a limit at the executor (by ``set_limit``, or by ``apply`` with the whole
        manifest); whether it took effect (a failed write leaves the old one, restored from
        the store). The capacity bound follows: no new admission beyond the new limit, though
        what was admitted already may exceed it."""
        try:
            if apply:
                self.executor.call("apply", {**self.specs, spec.name: spec})
            else:
                self.executor.call("set_limit", spec)
        except Crashed:
            return False
        now = self.clock.now
        self.specs[spec.name] = spec
        self.records.limits[spec.name].append((now, spec))
        if spec.kind is Kind.CAPACITY:
            self.records.capacity_bound = max(float(spec.value), self.admitted(spec.name))
        return True

    def admitted(self, resource: str) -> float:
        """Units of ``resource`` admitted so far, by the processes' records: used or in open
        reservations, plus the spare that live processes and brokers hold to serve later."""
        return consumed(self.records, resource) + self._spare(resource)

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass: the executor ticks at its wake-ups, brokers and processes
        renew on time (every ``RENEW_INTERVAL_S``, on the whole second)."""
        end = self.clock.now + seconds
        while True:
            # Counted, not found from the clock: sums of steps such as 0.2 fall short of the
            # whole second (0.6 + 7 x 0.2 < 2.0), and rounding from there skipped a renewal.
            next_renewal = (self.renewals + 1) * RENEW_INTERVAL_S
            wake = min(self.executor.service.next_wakeup(), next_renewal)
            if wake > end:
                break
            self.clock.set(max(self.clock.now, wake))
            self._snapshot()
            self._tick()
            if self.clock.now >= next_renewal - EPS:
                self.renewals += 1
                for node in list(self.nodes.values()):
                    if not node.dead:
                        node.renew_upstream()
                for process in list(self.live_processes()):
                    process.renew()
        self.clock.set(end)
        self._snapshot()
        self._tick()

    def _spare(self, resource: str) -> int:
        return self._broker_spare(resource) + sum(
            lease.spare for p in self.processes if not p.dead for h in p.handles
            if h.resource == resource for lease in h.leases)

    def _broker_spare(self, resource: str) -> int:
        """Units live brokers hold of the resource's tokens, not yet handed to a process."""
        tokens = {h.token_id for p in self.processes for h in p.handles if h.resource == resource}
        return sum(node.core.spare(token_id) for node in self.nodes.values() if not node.dead
                   for token_id in tokens)

    def _snapshot(self) -> None:
        """What processes (and brokers, as spare) hold of each resource now."""
        held: dict[str, int] = defaultdict(int)
        for process in self.processes:
            if not process.dead:
                for handle in process.handles:
                    held[handle.resource] += sum(lease.held for lease in handle.leases)
        for resource in SPECS:
            self.records.held[resource].append(
                (self.clock.now, held[resource] + self._broker_spare(resource)))

    def _tick(self) -> None:
        try:
            self.executor.tick()
        except Crashed:
            pass

    def recall_holder(self, holder: str, token_ids: frozenset[str]) -> None:
        for process in self.processes:
            if process.holder == holder:
                process.recalled(token_ids)
        for node in list(self.nodes.values()):
            if node.holder == holder and not node.dead:
                node.recalled(token_ids)


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
    spec = world.specs[resource]
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
                    streamer.ending_call("close", handle.token_id, streamer.final_reports(handle),
                                         handle.token_id, 0, streamer.claim(handle))
                    stream.remove(handle)
            while len(stream) < count:
                info = world.token_call("open_token", resource, weight, streamer.claimant, None)
                handle = streamer.adopt_handle(info.id, resource, 0, weight, None)
                stream.append(handle)
                streamer.reserve(handle, min(weight, spec.ceiling))
        world.advance(step_s)
    for handle in [*handles, *stream]:
        owner = worker if handle in handles else streamer
        owner.ending_call("close", handle.token_id, owner.final_reports(handle),
                          handle.token_id, 0, owner.claim(handle))
    return units, longest, served
