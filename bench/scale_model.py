"""A scale model: the real scheduling core under a simulated cluster, with and without brokers.

No Ray. A discrete-event simulation on a fake clock drives the real :class:`ExecutorService`,
:class:`BrokerCore` and :class:`LocalLease` objects the way the executor actor
(``ray_quota/_actors/executor.py``), the node broker (``_actors/broker.py``) and each process
(``_client.py``, ``_token.py``) drive them, and counts what reaches the executor.

Example:
    >>> results = run(quick(Params()), brokers=True)  # 4 nodes x 8 processes
    >>> round(results["executor"]["calls_per_s"]["renew"])  # one per node per second
    4

Time is modelled, not measured on a wall clock:

- The executor and each broker are single-threaded servers that take calls in arrival order.
  A call costs a fixed overhead (the Ray call, asyncio, the SQLite write) plus the CPU time the
  real core took for it here, measured with ``time.thread_time`` around the core calls (CPU
  time of this thread, so other jobs on a shared machine do not inflate it).
- A call that parks (a waiting ``acquire``, a ``watch``) costs a smaller reply overhead when it
  is answered; the executor's ticker (refills, expiries) costs a small loop overhead plus its
  core time.
- Every message crosses a hop: process to broker on the same node, anything to the executor
  across nodes.

Run ``python -m bench.scale_model --help`` for the knobs; ``--quick`` is 4 nodes x 8 processes.
"""

from __future__ import annotations

import argparse
import functools
import gc
import heapq
import itertools
import json
import math
import os
import random
import sys
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bench import check
from ray_quota._core.broker import BrokerCore, Forward
from ray_quota._core.holder import LocalLease
from ray_quota._core.pools import RatePool
from ray_quota._core.protocol import (
    PREFETCH_FRACTION,
    RENEW_INTERVAL_S,
    WATCH_TIMEOUT_S,
    Grant,
    Renewed,
    Report,
    TokenInfo,
    prefetch_cap,
)
from ray_quota._core.scheduler import Policy
from ray_quota._core.service import ExecutorService
from ray_quota._errors import LeaseEndedError, QuotaError
from ray_quota._spec import Enforcement, Kind, ResourceSpec

RESOURCE = "llm-tokens"
OUT_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True, slots=True)
class Params:
    """One run's cluster, workload and costs.

    The limit is set from the workload: ``overload`` is the nominal demand (every process
    reserving back to back, ``mean amount / mean think`` units per second) over the limit, so
    4.0 means four times more is asked for than the limit allows.
    """

    nodes: int = 100
    procs: int = 64  # per node
    seconds: float = 60.0  # measured, after the warm-up
    warmup_s: float = 15.0
    ramp_s: float = 10.0  # processes start at random times over this first stretch
    drain_s: float = 20.0  # at most, after the measured window: tasks end, tokens close
    overload: float = 4.0
    seed: int = 1
    weights: tuple[int, ...] = (1, 2, 4)  # per tenant; processes are dealt to tenants in turn
    weight_unit: int = 1000  # a task token's expected use per unit of tenant weight
    amount: tuple[int, int] = (200, 2000)  # units per reservation (LLM tokens)
    think_s: tuple[float, float] = (0.5, 3.0)  # the LLM call a reservation covers
    used_fraction: tuple[float, float] = (0.8, 1.0)  # of the reservation, really used
    reservations_per_task: tuple[int, int] = (3, 8)
    burst_s: float = 2.0  # the bucket holds this many seconds of refill
    executor_call_s: float = 0.3e-3  # per call, on top of the measured core time
    broker_call_s: float = 0.2e-3
    reply_s: float = 0.1e-3  # answering a parked call, or handling an answer it waited for
    tick_s: float = 0.05e-3  # one turn of the executor's ticker loop
    node_hop_s: float = 0.1e-3  # process -> broker, one way
    cluster_hop_s: float = 0.5e-3  # anything -> executor, one way
    core_time_s: float | None = None  # a fixed core time per call instead of the measured one
    batch_renewals: bool = True  # False: brokers renew upstream on every process renewal
    verbose: bool = False  # progress on stderr every 10 simulated seconds

    @property
    def processes(self) -> int:
        return self.nodes * self.procs

    @property
    def demand_per_s(self) -> float:
        """Units per second all processes would reserve if nothing ever made them wait."""
        mean_amount = sum(self.amount) / 2
        mean_think = sum(self.think_s) / 2
        return self.processes * mean_amount / mean_think

    def spec(self) -> ResourceSpec:
        """The rate resource: a tokens-per-minute limit, ``burst_s`` seconds of refill."""
        per_minute = max(60, round(self.demand_per_s * 60 / self.overload, -3))
        burst = max(self.amount[1], int(per_minute / 60 * self.burst_s))
        return ResourceSpec(RESOURCE, Kind.RATE, value=int(per_minute), period_s=60.0,
                            burst=burst, enforcement=Enforcement.THROTTLE, unit="token")


def quick(params: Params) -> Params:
    """The small model the tests run: 4 nodes x 8 processes, 150 measured seconds.

    Shorter windows measure luck, not fairness: under contention a weight-1 process is
    granted a reservation only every ~16 s, so 20 s would hold about one per process and the
    tenants' shares would be off by 20-35% whatever the scheduler did (seeds 2-6).
    """
    return replace(params, nodes=4, procs=8, seconds=150.0, warmup_s=10.0, ramp_s=2.0,
                   drain_s=45.0)


# ------------------------------------------------------------------------------- the clock


class Sim:
    """A heap of events on a fake clock; ``now`` moves only from one event to the next."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self.events = 0

    def __call__(self) -> float:
        return self.now  # the scheduler's clock

    def at(self, when: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._heap, (max(when, self.now), next(self._seq), fn, args))

    def after(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        self.at(self.now + delay, fn, *args)

    def run(self, until: float, done: Callable[[], bool],
            progress: Callable[[float], None] | None = None) -> None:
        """Process events in time order until ``until`` or until ``done()`` says so;
        ``progress(now)`` is called every 10 simulated seconds."""
        heap = self._heap
        report_at = 10.0
        while heap and heap[0][0] <= until:
            when, _, fn, args = heapq.heappop(heap)
            self.now = when
            fn(*args)
            self.events += 1
            if done():
                return
            if progress is not None and when >= report_at:
                progress(when)
                report_at += 10.0


@dataclass(frozen=True, slots=True)
class Reply:
    """Where an answer goes: ``fn(value)``, called ``hop_s`` after the server sends it."""

    fn: Callable[[Any], None]
    hop_s: float

    def send(self, sim: Sim, at: float, value: Any) -> None:
        sim.at(at + self.hop_s, self.fn, value)


class Window:
    """The measured interval, and what servers did inside it."""

    def __init__(self, start: float, end: float) -> None:
        self.start, self.end = start, end

    @property
    def length(self) -> float:
        return self.end - self.start

    def overlap(self, start: float, end: float) -> float:
        return max(0.0, min(end, self.end) - max(start, self.start))

    def holds(self, t: float) -> bool:
        return self.start <= t < self.end


class Server:
    """One thread serving jobs in arrival order. A job runs at its start time and returns its
    cost in seconds; the next job starts when that cost has elapsed."""

    def __init__(self, sim: Sim, window: Window) -> None:
        self._sim = sim
        self._window = window
        self._queue: deque[tuple[float, Callable[[], float]]] = deque()
        self._running = False
        self.busy_s = 0.0  # inside the window
        self.max_backlog = 0  # the most jobs waiting at once, inside the window
        self.waited_s = 0.0  # time jobs started in the window spent queued
        self.started = 0  # jobs started in the window

    def submit(self, job: Callable[[], float]) -> None:
        self._queue.append((self._sim.now, job))
        if not self._running:
            self._next()
        elif len(self._queue) > self.max_backlog and self._window.holds(self._sim.now):
            self.max_backlog = len(self._queue)

    def _next(self) -> None:
        submitted, job = self._queue.popleft()
        self._running = True
        now = self._sim.now
        if self._window.holds(now):
            self.waited_s += now - submitted
            self.started += 1
        cost = job()
        self.busy_s += self._window.overlap(now, now + cost)
        self._sim.at(now + cost, self._finished)

    def _finished(self) -> None:
        self._running = False
        if self._queue:
            self._next()


class CoreTimer:
    """The CPU time the real core takes, or a fixed figure when the run asks for one."""

    def __init__(self, sim: Sim, window: Window, fixed: float | None) -> None:
        self._sim = sim
        self._window = window
        self._fixed = fixed
        self._started = 0.0
        self.in_window_s = 0.0
        self.by_what: defaultdict[str, float] = defaultdict(float)  # core s in the window, by job
        self.count: Counter[str] = Counter()

    def start(self) -> None:
        self._started = time.thread_time()

    def stop(self, what: str = "") -> float:
        """The core time since :meth:`start`, counted against ``what`` (a method, say)."""
        spent = time.thread_time() - self._started
        if self._fixed is not None:
            spent = self._fixed
        if self._window.holds(self._sim.now):
            self.in_window_s += spent
            self.by_what[what] += spent
            self.count[what] += 1
        return spent


class Board:
    """Recalls waiting for their holders, as ``RecallBoard``: one open watch per holder."""

    def __init__(self) -> None:
        self._watchers: dict[str, tuple[int, Reply]] = {}
        self._posted: dict[str, set[str]] = {}
        self._ids = itertools.count()

    def wait(self, holder: str, reply: Reply) -> tuple[list[str] | None, list[tuple[Reply, list[str]]],
                                                       int]:
        """Register a watch: (an answer now or None, watchers to answer [] now, watch id)."""
        if holder in self._posted:
            return sorted(self._posted.pop(holder)), [], -1
        replaced = self._watchers.pop(holder, None)
        watch_id = next(self._ids)
        self._watchers[holder] = (watch_id, reply)
        return None, [(replaced[1], [])] if replaced else [], watch_id

    def post(self, holder: str, token_ids: Iterable[str]) -> list[tuple[Reply, list[str]]]:
        """Tell ``holder`` these tokens are recalled; returns the watch to answer, if open."""
        watcher = self._watchers.pop(holder, None)
        if watcher is not None:
            return [(watcher[1], sorted(token_ids))]
        self._posted.setdefault(holder, set()).update(token_ids)
        return []

    def expire(self, holder: str, watch_id: int) -> Reply | None:
        """The watch timed out; its reply, if it is still open."""
        watcher = self._watchers.get(holder)
        if watcher is None or watcher[0] != watch_id:
            return None
        del self._watchers[holder]
        return watcher[1]


# ------------------------------------------------------------------------------ statistics


@dataclass(slots=True)
class Stats:
    """What one run records: calls, reservations, and samples for the safety checks."""

    window: Window
    calls: Counter[str] = field(default_factory=Counter)  # executor calls in the window
    broker_calls: Counter[str] = field(default_factory=Counter)
    ticks: int = 0
    # One row per reservation: tenant, asked at, admitted at, amount, used, path.
    tenant: list[int] = field(default_factory=list)
    asked: list[float] = field(default_factory=list)
    admitted: list[float] = field(default_factory=list)
    amount: list[int] = field(default_factory=list)
    used: list[int] = field(default_factory=list)
    path: list[int] = field(default_factory=list)  # LOCAL, NODE or EXECUTOR
    net_out: list[tuple[float, float]] = field(default_factory=list)  # (time, units out)
    waiters: list[int] = field(default_factory=list)  # requests queued at the core, sampled
    held_over_leased: int = 0  # samples where holders held more than the executor leased
    tasks: int = 0
    lease_restarts: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # calls answered with an error

    def executor_call(self, method: str, now: float) -> None:
        if self.window.holds(now):
            self.calls[method] += 1

    def broker_call(self, method: str, now: float) -> None:
        if self.window.holds(now):
            self.broker_calls[method] += 1

    def reservation(self, tenant: int, asked: float, admitted: float, amount: int,
                    path: int) -> int:
        self.tenant.append(tenant)
        self.asked.append(asked)
        self.admitted.append(admitted)
        self.amount.append(amount)
        self.used.append(-1)  # until committed
        self.path.append(path)
        return len(self.used) - 1


LOCAL, NODE, EXECUTOR = 0, 1, 2  # where a reservation was served: process, broker, executor
PATHS = ("local", "node", "executor")


# ------------------------------------------------------------------------------ the executor


class LeaseService(Protocol):
    """The lease calls a process makes: to the executor directly, or to its node's broker."""

    hop_s: float

    def acquire(self, reply: Reply, token_id: str, generation: int, claimant: str, key: str,
                amount: int, prefetch: int) -> None: ...

    def settle(self, reports: list[Report]) -> None: ...

    def renew(self, reply: Reply, holder: str, reports: list[Report], observed: bool) -> None: ...

    def watch(self, reply: Reply, holder: str) -> None: ...

    def merge_back(self, reply: Reply, token_id: str, generation: int, claimant: str,
                   parent_id: str, reports: list[Report]) -> None: ...


class Actor:
    """What the executor and a broker share: one thread (a :class:`Server`), a core timer, a
    recall board for the watches of those below, and answers that leave when a job ends."""

    def __init__(self, sim: Sim, params: Params, stats: Stats, *, hop_s: float,
                 call_s: float) -> None:
        self._sim = sim
        self._params = params
        self._stats = stats
        self.server = Server(sim, stats.window)
        self.timer = CoreTimer(sim, stats.window, params.core_time_s)
        self._board = Board()
        self._outbox: list[tuple[float, Callable[..., None], tuple[Any, ...]]] = []
        self.hop_s = hop_s  # from a caller to this actor, one way
        self._call_s = call_s

    def watch(self, reply: Reply, holder: str) -> None:
        """The long poll: answered by a recall, or with [] after the watch timeout."""
        self._count("watch")
        self.server.submit(functools.partial(self._watch_job, reply, holder))

    def _count(self, method: str) -> None:
        raise NotImplementedError

    def _watch_job(self, reply: Reply, holder: str) -> float:
        answer, woken, watch_id = self._board.wait(holder, reply)
        if answer is None:
            self._sim.after(WATCH_TIMEOUT_S, self._watch_timeout, holder, watch_id)
        return self._answer(self._call_s, reply, answer, woken)

    def _watch_timeout(self, holder: str, watch_id: int) -> None:
        reply = self._board.expire(holder, watch_id)
        if reply is not None:
            self.server.submit(lambda: self._answer(self._params.reply_s, reply, [], []))

    def _send(self, hop_s: float, call: Callable[..., None], *args: Any) -> None:
        """A call to another actor: it leaves when the current job ends."""
        self._outbox.append((hop_s, call, args))

    def _answer(self, cost: float, reply: Reply | None, result: Any,
                woken: list[tuple[Reply, list[str]]]) -> float:
        """Send the job's answer (None: no answer yet), the watches it woke (each adds a reply
        cost) and its calls when it ends; returns the job's cost."""
        cost += len(woken) * self._params.reply_s
        end = self._sim.now + cost
        if reply is not None and result is not None:
            reply.send(self._sim, end, result)
        for watcher, token_ids in woken:
            watcher.send(self._sim, end, token_ids)
        for hop_s, call, args in self._outbox:
            self._sim.at(end + hop_s, call, *args)
        self._outbox.clear()
        return cost


class ExecutorModel(Actor):
    """The executor actor around the real :class:`ExecutorService`: same calls, same drains.

    Only the shell is modelled here (a :class:`Server` for its thread, replies for its futures,
    a :class:`Board` for its recall watches); every decision is the service's.
    """

    def __init__(self, sim: Sim, spec: ResourceSpec, params: Params, stats: Stats) -> None:
        super().__init__(sim, params, stats, hop_s=params.cluster_hop_s,
                         call_s=params.executor_call_s)
        ids = itertools.count()
        self.service = ExecutorService({spec.name: spec}, clock=sim, policy=Policy(),
                                       new_id=lambda: f"t{next(ids)}")
        self.sched = self.service.scheduler  # for reading only: status, expiries, the pool
        self.pool = self.sched.pool(spec.name)
        self._parked: dict[int, Reply] = {}  # waiting callers, by ticket
        self._woken: list[tuple[Reply, list[str]]] = []  # watches the last drains answered
        self._tick_at = math.inf
        self._tick_generation = 0
        self._schedule_tick(0.0)
        self._deliver()  # the actor writes the initial state as it starts

    # ---------------------------------------------------------------------------- calls

    def open_token(self, resource: str, expected_use: int, claimant: str) -> TokenInfo:
        """Tenants' tokens, opened before the run starts (not timed)."""
        self._stats.executor_call("open_token", self._sim.now)
        info = self.service.open_token(resource, expected_use, claimant, None)
        assert isinstance(info, TokenInfo), info
        self._deliver()
        return info

    def acquire(self, reply: Reply, token_id: str, generation: int, claimant: str, key: str,
                amount: int, prefetch: int) -> None:
        def work() -> Any:
            ticket = self.service.acquire(token_id, generation, claimant, key, amount,
                                          prefetch, None)
            if isinstance(ticket, QuotaError):
                return ticket
            if ticket.outcome is None:
                self._parked[ticket.id] = reply
                self._schedule_tick(self._sim.now)  # the actor kicks its ticker
                return None
            return ticket.outcome

        self._call("acquire", reply, work)

    def settle(self, reports: list[Report]) -> None:
        self._call("settle", None, lambda: self.service.settle(reports))

    def renew(self, reply: Reply, holder: str, reports: list[Report], observed: bool) -> None:
        self._call("renew", reply, lambda: self.service.renew(holder, reports))

    def split(self, reply: Reply, token_id: str, generation: int, claimant: str,
              child_expected_use: int) -> None:
        def work() -> Any:
            answer = self.service.split(token_id, generation, claimant, child_expected_use)
            return answer if isinstance(answer, QuotaError) else answer[0]  # the child

        self._call("split", reply, work)

    def merge_back(self, reply: Reply, token_id: str, generation: int, claimant: str,
                   parent_id: str, reports: list[Report]) -> None:
        self._call("merge_back", reply, lambda: self.service.merge_back(
            token_id, generation, claimant, parent_id, reports))

    # ------------------------------------------------------------------------------ jobs

    def _count(self, method: str) -> None:
        self._stats.executor_call(method, self._sim.now)

    def _call(self, method: str, reply: Reply | None, work: Callable[[], Any]) -> None:
        """A call arrives: it waits its turn, runs ``work`` on the service, delivers what the
        call set in motion, as the actor does, and answers unless it parked (``work``
        returned None)."""
        self._count(method)

        def job() -> float:
            self.timer.start()
            result = work()
            self._deliver()
            cost = self._params.executor_call_s + self.timer.stop(method)
            return self._answer(cost, reply, result, self._take_woken())

        self.server.submit(job)

    def _take_woken(self) -> list[tuple[Reply, list[str]]]:
        woken, self._woken = self._woken, []
        return woken

    def _deliver(self) -> None:
        """As the actor's: the changes would be written first (their cost is in the fixed call
        overhead); then a resolved ticket resumes its call, as a job of its own (the actor's
        coroutine looks again when it wakes), and recalls go to open watches."""
        outbox = self.service.drain()
        for resolved in outbox.resolved:
            reply = self._parked.pop(resolved.ticket, None)
            if reply is not None:
                self._sim.at(self._sim.now, self.server.submit,
                             functools.partial(self._resume_job, reply, resolved.outcome))
        for recall in outbox.recalls:
            self._woken.extend(self._board.post(recall.holder, recall.token_ids))
        self._sample()

    def _resume_job(self, reply: Reply, outcome: Any) -> float:
        self.timer.start()
        self.service.tick()
        self._deliver()
        cost = self._params.reply_s + self.timer.stop("acquire resumed")
        return self._answer(cost, reply, outcome, self._take_woken())

    # ---------------------------------------------------------------------------- ticker

    def _schedule_tick(self, when: float) -> None:
        if when < self._tick_at:
            self._tick_at = when
            self._tick_generation += 1
            self._sim.at(when, self._tick_due, self._tick_generation)

    def _tick_due(self, generation: int) -> None:
        if generation == self._tick_generation:
            self._tick_at = math.inf
            self.server.submit(self._tick_job)

    def _tick_job(self) -> float:
        """The actor's ticker: a tick for refills, deadlines and expiries, then sleep until the
        service's next wake-up."""
        self._stats.ticks += self._stats.window.holds(self._sim.now)
        self.timer.start()
        self.service.tick()
        self._deliver()
        wake = self.service.next_wakeup()
        cost = self._answer(self._params.tick_s + self.timer.stop("ticker"), None, None,
                            self._take_woken())
        self._schedule_tick(wake + cost)
        return cost

    # ------------------------------------------------------------------------- inspection

    def net_out(self) -> float:
        """Units out of the bucket: granted and not given back (used ones never come back)."""
        assert isinstance(self.pool, RatePool)
        return float(self.pool._granted)  # the pool's own ledger (private), read only

    def _sample(self) -> None:
        samples = self._stats.net_out
        if not samples or self._sim.now - samples[-1][0] >= 0.05:
            samples.append((self._sim.now, self.net_out()))


# -------------------------------------------------------------------------------- a broker


@dataclass(slots=True)
class Forwarded:
    """A process's request that the broker passed on to the executor."""

    reply: Reply
    token_id: str
    key: str
    amount: int
    prefetch: int
    claim: tuple[int, str]
    sent_at: float
    up_key: str  # the broker's own lease key the request went under


class BrokerModel(Actor):
    """One node's broker actor around the real :class:`BrokerCore`."""

    def __init__(self, sim: Sim, name: str, executor: ExecutorModel, params: Params,
                 stats: Stats) -> None:
        super().__init__(sim, params, stats, hop_s=params.node_hop_s,
                         call_s=params.broker_call_s)
        self.name = name
        self._executor = executor
        self.core = BrokerCore(holder=name, ttl_s=executor.sched.policy.lease_ttl_s)
        self._observed = False  # processes' metrics waiting to ride on the next renewal
        self._started = False
        self._max_prefetch = prefetch_cap(executor.sched.specs()[RESOURCE])

    # ---------------------------------------------------------------------- lease calls

    def acquire(self, reply: Reply, token_id: str, generation: int, claimant: str, key: str,
                amount: int, prefetch: int) -> None:
        def work() -> Any:
            claim = (generation, claimant)
            try:
                answer = self.core.acquire(token_id, Kind.RATE, key, amount, prefetch=prefetch,
                                           max_prefetch=self._max_prefetch, now=self._sim.now,
                                           claim=claim)
            except KeyError:
                return (_ended(), NODE)
            if isinstance(answer, Grant):
                return (answer, NODE)
            assert isinstance(answer, Forward)
            ask = Forwarded(reply, token_id, key, amount, prefetch, claim, self._sim.now,
                            answer.key)
            up = Reply(functools.partial(self._forward_answered, ask), self._executor.hop_s)
            self._up(self._executor.acquire, up, token_id, generation, claimant, answer.key,
                       answer.amount, answer.prefetch)
            return None

        self._call("acquire", reply, work)

    def _forward_answered(self, ask: Forwarded, outcome: Any) -> None:
        def work() -> Any:
            now = self._sim.now
            if isinstance(outcome, QuotaError):
                self.core.refused(ask.token_id, ask.key, now)
                if isinstance(outcome, LeaseEndedError):
                    self.core.lost(ask.token_id, ask.up_key)
                return (outcome, EXECUTOR)
            try:
                return (self.core.granted(ask.token_id, ask.key, ask.amount, ask.prefetch,
                                          outcome, sent_at=ask.sent_at, now=now,
                                          claim=ask.claim), EXECUTOR)
            except KeyError:
                return (_ended(), EXECUTOR)

        self.server.submit(lambda: self._run(work, ask.reply, self._params.reply_s))

    def settle(self, reports: list[Report]) -> None:
        def work() -> None:
            if self.core.settle(reports, self._sim.now):
                self._send_now({report[0] for report in reports})

        self._call("settle", None, work)

    def renew(self, reply: Reply, holder: str, reports: list[Report], observed: bool) -> None:
        def work() -> Renewed:
            now = self._sim.now
            self._observed |= observed
            urgent = self.core.settle(reports, now)
            alive = self.core.renew(reports, now)
            if urgent:
                self._send_now({report[0] for report in reports})
            if not self._params.batch_renewals:
                self._renew_upstream()  # the counterfactual: no batching at all
            return alive

        self._call("renew", reply, work)

    def merge_back(self, reply: Reply, token_id: str, generation: int, claimant: str,
                   parent_id: str, reports: list[Report]) -> None:
        """As the actor's ``_ending``: apply the final totals, settle the broker's leases of
        the token as final, and make the call with them."""
        def work() -> None:
            self.core.settle(reports, self._sim.now)
            upstream = self.core.release(token_id)
            back = Reply(functools.partial(self._relay, reply), self._executor.hop_s)
            self._up(self._executor.merge_back, back, token_id, generation, claimant,
                       parent_id, upstream)

        self._call("merge_back", None, work)

    def _relay(self, reply: Reply, answer: Any) -> None:
        self.server.submit(lambda: self._answer(self._params.reply_s, reply, answer, []))

    # ----------------------------------------------------------------------------- loops

    def _start(self) -> None:
        """On the first call, as the actor's ``_ready``: the renewal and watch loops begin."""
        if not self._started:
            self._started = True
            if self._params.batch_renewals:
                self._sim.after(RENEW_INTERVAL_S, self._renew_due)
            self._watch_upstream()

    def _renew_due(self) -> None:
        self.server.submit(lambda: self._run(self._renew_upstream_loop, None,
                                             self._params.reply_s))

    def _renew_upstream_loop(self) -> None:
        if not self._renew_upstream():
            self._sim.after(RENEW_INTERVAL_S, self._renew_due)

    def _renew_upstream(self) -> bool:
        """Expire silent sub-leases and renew every upstream lease in one executor call.
        Returns whether a call went out (its answer schedules the next turn)."""
        now = self._sim.now
        self.core.expire(now)
        reports = self.core.upstream_reports(now)
        if not reports and not self._observed:
            return False
        self._observed = False
        back = Reply(functools.partial(self._renewed_upstream, now, reports),
                     self._executor.hop_s)
        self._up(self._executor.renew, back, self.name, reports, True)
        return True

    def _renewed_upstream(self, sent_at: float, reports: list[Report],
                          alive: Renewed) -> None:
        def work() -> None:
            self.core.upstream_renewed(reports, alive, sent_at)
            if self._params.batch_renewals:
                self._sim.after(RENEW_INTERVAL_S, self._renew_due)

        self.server.submit(lambda: self._run(work, None, self._params.reply_s))

    def _watch_upstream(self) -> None:
        self._up(self._executor.watch, Reply(self._recalled, self._executor.hop_s), self.name)

    def _recalled(self, token_ids: list[str]) -> None:
        """The node's one watch answered: give spare back and tell the processes."""
        def job() -> float:
            woken: list[tuple[Reply, list[str]]] = []
            self.timer.start()
            if token_ids:
                reports, tell = self.core.recall(token_ids)
                if reports:
                    self._up(self._executor.settle, reports)
                for holder, ids in tell.items():
                    woken.extend(self._board.post(holder, ids))
            cost = self._params.reply_s + self.timer.stop()
            self._watch_upstream()
            return self._answer(cost, None, None, woken)

        self.server.submit(job)

    def _send_now(self, token_ids: set[str]) -> None:
        """Overuse, or spare given back under contention: tell the executor at once (the
        actor's ``_send_now``)."""
        reports = [report for token_id in token_ids for report in self.core.report_of(token_id)]
        if reports:
            self._up(self._executor.settle, reports)

    def _up(self, call: Callable[..., None], *args: Any) -> None:
        """A call to the executor: it leaves when the current job ends."""
        self._send(self._executor.hop_s, call, *args)

    # ------------------------------------------------------------------------------ jobs

    def _count(self, method: str) -> None:
        self._stats.broker_call(method, self._sim.now)
        self._start()

    def _call(self, method: str, reply: Reply | None, work: Callable[[], Any]) -> None:
        self._count(method)
        self.server.submit(lambda: self._run(work, reply, self._params.broker_call_s))

    def _run(self, work: Callable[[], Any], reply: Reply | None, overhead: float) -> float:
        self.timer.start()
        result = work()
        return self._answer(overhead + self.timer.stop(), reply, result, [])


def _ended() -> LeaseEndedError:
    return LeaseEndedError("this lease ended at the node's broker; ask under a new lease key")


# ------------------------------------------------------------------------------- a process

GENERATION = 1  # a task takes its token up once, as an unpickled token does (generation 0 + 1)


class SimulationError(RuntimeError):
    """The model reached a state the real client would not handle quietly."""


class Process:
    """One worker process: tasks one after another, each with a token split from its tenant's.

    As ``QuotaToken`` and the client do: reservations come from the local lease when it can
    serve them, else from the lease service (the executor, or the node's broker); a renewal
    goes out every interval after the last one returned; one recall watch is always open.
    """

    def __init__(self, sim: Sim, name: str, tenant: int, parent: TokenInfo, owner: str,
                 executor: ExecutorModel, service: LeaseService, params: Params, stats: Stats,
                 rng: random.Random) -> None:
        self._sim = sim
        self.name = name
        self.tenant = tenant
        self._parent = parent
        self._owner = owner  # the tenant's driver, which splits the task tokens
        self._executor = executor
        self._service = service
        self._params = params
        self._stats = stats
        self.rng = rng  # this process's own stream: the same draws in either mode
        self._keys = itertools.count()
        self._max_prefetch = max(1, int(parent.spec.ceiling * PREFETCH_FRACTION))
        self.token_id: str | None = None
        self.lease: LocalLease | None = None
        self._open: LocalLease | None = None  # the lease of the open reservation, if any
        self._left = 0  # reservations left in this task
        self._observed = False  # reservations since the last renewal (metrics ride along)
        self._stopping = False
        self.done = False
        self.on_done: Callable[[], None] = lambda: None

    def start(self, delay: float) -> None:
        self._sim.after(delay, self._begin_task)
        self._sim.after(delay + self.rng.uniform(0.0, RENEW_INTERVAL_S), self._flush)
        self._sim.after(delay, self._watch)

    def stop(self) -> None:
        """Finish the reservation in hand, close the token, and stop."""
        self._stopping = True

    @property
    def held(self) -> int:
        """Units held in the current lease (a lease the process was told ended is not counted:
        the executor charged what it held)."""
        lease = self.lease
        return lease.held if lease is not None and lease.active and not lease.final else 0

    # ----------------------------------------------------------------------------- tasks

    def _begin_task(self) -> None:
        if self._stopping:
            self._finish()
            return
        weight = self._params.weights[self.tenant] * self._params.weight_unit
        reply = Reply(self._task_started, self._executor.hop_s)
        self._sim.after(self._executor.hop_s, self._executor.split, reply, self._parent.id, 0,
                        self._owner, weight)

    def _task_started(self, info: TokenInfo | QuotaError) -> None:
        if isinstance(info, QuotaError):
            raise SimulationError(f"{self.name}: split refused: {info!r}")
        self._stats.tasks += self._stats.window.holds(self._sim.now)
        self.token_id = info.id
        self.lease = self._new_lease()
        self._left = self.rng.randint(*self._params.reservations_per_task)
        if self._stopping:
            self._end_task()
        else:
            self._reserve()

    def _reserve(self) -> None:
        amount = self.rng.randint(*self._params.amount)
        lease = self._lease()
        if lease.take(amount, self._sim.now):
            self._admitted(lease, amount, self._sim.now, LOCAL)
        else:
            self._ask(amount, self._sim.now)

    def _ask(self, amount: int, asked: float) -> None:
        lease = self._lease()
        assert self.token_id is not None
        reply = Reply(functools.partial(self._answered, lease, amount, asked, self._sim.now),
                      self._service.hop_s)
        self._sim.after(self._service.hop_s, self._service.acquire, reply, self.token_id,
                        GENERATION, self.name, lease.key, amount, lease.prefetch())

    def _answered(self, lease: LocalLease, amount: int, asked: float, sent_at: float,
                  answer: Any) -> None:
        outcome, path = answer if isinstance(answer, tuple) else (answer, EXECUTOR)
        if isinstance(outcome, LeaseEndedError):
            self._stats.lease_restarts += 1
            if self.lease is lease:  # carry on under a new lease, as QuotaToken.reserve does
                self.lease = self._new_lease()
            self._ask(amount, asked)
            return
        if not isinstance(outcome, Grant):  # the token is gone: the task fails, the next one
            self._stats.errors[type(outcome).__name__] += 1  # starts, as the user's code would
            self._end_task()
            return
        lease.granted(amount, units=outcome.units, sent_at=sent_at, ttl_s=outcome.ttl_s,
                      contended=outcome.contended, waited_s=outcome.waited_s)
        lease.via = outcome.via
        self._admitted(lease, amount, asked, path)

    def _admitted(self, lease: LocalLease, amount: int, asked: float, path: int) -> None:
        index = self._stats.reservation(self.tenant, asked, self._sim.now, amount, path)
        self._observed = True
        self._open = lease
        think = self.rng.uniform(*self._params.think_s)
        self._sim.after(think, self._commit, lease, amount, index)

    def _commit(self, lease: LocalLease, amount: int, index: int) -> None:
        """The LLM call returned: commit what it used; under contention spare goes back now."""
        used = int(amount * self.rng.uniform(*self._params.used_fraction))
        self._stats.used[index] = used
        self._open = None
        urgent = lease.settle(amount, used)
        urgent |= lease.contended and lease.recall()
        if urgent:
            self._send_settle(lease)
        self._left -= 1
        if self._left > 0 and not self._stopping:
            self._reserve()
        else:
            self._end_task()

    def _end_task(self) -> None:
        """``return_to_parent``: final totals go with the merge back."""
        lease = self._lease()
        lease.release_all()
        reports = [self._report(lease, final=True)] if lease.active else []
        token_id, self.token_id, self.lease = self.token_id, None, None
        assert token_id is not None
        reply = Reply(self._task_ended, self._service.hop_s)
        self._sim.after(self._service.hop_s, self._service.merge_back, reply, token_id,
                        GENERATION, self.name, self._parent.id, reports)

    def _task_ended(self, answer: Any) -> None:
        if isinstance(answer, QuotaError):
            self._stats.errors[type(answer).__name__] += 1
        self._begin_task()

    def _finish(self) -> None:
        self.done = True
        self.on_done()

    # ------------------------------------------------------------------- renewals, recalls

    def _flush(self) -> None:
        """The renewer: report the lease's totals and renew it."""
        if self.done:
            return
        lease = self.lease
        reports = []
        if lease is not None and lease.active and not lease.final:
            lease.report(self._sim.now, keep_spare=True)
            reports.append(self._report(lease, final=False))
        observed, self._observed = self._observed, False
        if not reports and not observed:
            self._sim.after(RENEW_INTERVAL_S, self._flush)
            return
        reply = Reply(functools.partial(self._renewed, self.token_id, lease, self._sim.now),
                      self._service.hop_s)
        self._sim.after(self._service.hop_s, self._service.renew, reply, self.name, reports,
                        observed)

    def _renewed(self, token_id: str | None, lease: LocalLease | None, sent_at: float,
                 alive: Renewed) -> None:
        if lease is not None and lease is self.lease and lease.active:
            answer = alive.get((token_id or "", lease.key))
            if answer is None:  # the lease expired: start afresh
                self._stats.lease_restarts += 1
                self.lease = self._new_lease()
            else:
                lease.renewed(contended=answer[0], sent_at=sent_at, ttl_s=answer[1])
        self._sim.after(RENEW_INTERVAL_S, self._flush)

    def _watch(self) -> None:
        if not self.done:
            reply = Reply(self._recalled, self._service.hop_s)
            self._sim.after(self._service.hop_s, self._service.watch, reply, self.name)

    def _recalled(self, token_ids: list[str]) -> None:
        lease = self.lease
        if token_ids and lease is not None and self.token_id in token_ids and lease.recall():
            self._send_settle(lease)
        self._watch()

    # ------------------------------------------------------------------------- internals

    def _lease(self) -> LocalLease:
        if self.lease is None:
            raise SimulationError(f"{self.name}: no token in hand")
        return self.lease

    def _new_lease(self) -> LocalLease:
        return LocalLease(Kind.RATE, key=f"{self.name}:{next(self._keys)}",
                          max_prefetch=self._max_prefetch)

    def _report(self, lease: LocalLease, *, final: bool) -> Report:
        lease.final = lease.final or final
        totals = lease.totals()
        assert self.token_id is not None
        return Report(self.token_id, lease.key, totals.returned, totals.used, totals.debt, final)

    def _send_settle(self, lease: LocalLease) -> None:
        report = self._report(lease, final=False)
        self._sim.after(self._service.hop_s, self._service.settle, [report])


# ------------------------------------------------------------------------------------ a run


class Cluster:
    """The executor, the brokers (if on) and every process of one run."""

    def __init__(self, params: Params, *, brokers: bool) -> None:
        self.params = params
        self.spec = params.spec()
        self.sim = Sim()
        self.stats = Stats(Window(params.warmup_s, params.warmup_s + params.seconds))
        self.executor = ExecutorModel(self.sim, self.spec, params, self.stats)
        self.brokers = [BrokerModel(self.sim, f"broker{n}", self.executor, params, self.stats)
                        for n in range(params.nodes)] if brokers else []
        self.processes = self._processes()
        self.finished = 0
        self.finished_at = math.inf
        self._started = time.perf_counter()

    def _processes(self) -> list[Process]:
        """Processes are dealt to tenants in turn; each tenant's driver opens one token from
        which its tasks' tokens are split."""
        params, tenants = self.params, len(self.params.weights)
        counts = [len(range(t, params.processes, tenants)) for t in range(tenants)]
        parents = [self.executor.open_token(RESOURCE, weight * params.weight_unit * (count + 1),
                                            f"tenant{t}")
                   for t, (weight, count) in enumerate(zip(params.weights, counts))]
        processes = []
        for index in range(params.processes):
            node, tenant = index // params.procs, index % tenants
            service: LeaseService = self.brokers[node] if self.brokers else self.executor
            rng = random.Random(f"{params.seed}:{index}")
            process = Process(self.sim, f"n{node}p{index}", tenant, parents[tenant],
                              f"tenant{tenant}", self.executor, service, params, self.stats, rng)
            process.on_done = self._one_finished
            processes.append(process)
        return processes

    def _one_finished(self) -> None:
        self.finished += 1
        if self.finished == len(self.processes):
            self.finished_at = self.sim.now

    def run(self) -> None:
        sim, window = self.sim, self.stats.window
        for process in self.processes:
            process.start(process.rng.uniform(0.0, self.params.ramp_s))
        sim.at(window.end, self._stop)
        sim.at(0.25, self._check_safety)
        # After the last process ends: last settles and renewals land, and a lease nobody
        # renews any more expires (the executor charges it), so the ledger is final.
        settle_s = Policy().lease_ttl_s + 1.0
        gc.disable()  # so that collection pauses do not land inside a timed core call
        try:
            sim.run(window.end + self.params.drain_s,
                    lambda: sim.now >= self.finished_at + settle_s, self._progress)
        finally:
            gc.enable()

    def _progress(self, now: float) -> None:
        if self.params.verbose:
            mode = "brokers" if self.brokers else "direct"
            print(f"  [{mode}, overload {self.params.overload:g}] {now:.0f} s simulated, "
                  f"{time.perf_counter() - self._started:.0f} s wall, "
                  f"{self.finished}/{len(self.processes)} processes finished",
                  file=sys.stderr, flush=True)

    def _stop(self) -> None:
        for process in self.processes:
            process.stop()

    def _check_safety(self) -> None:
        """The executor's holders (processes, or brokers) hold no more than it leased out."""
        if self.brokers:
            held = 0
            for node, broker in enumerate(self.brokers):
                procs = self.processes[node * self.params.procs:(node + 1) * self.params.procs]
                tokens = {p.token_id for p in procs if p.token_id is not None}
                held += sum(broker.core.held(token_id) for token_id in tokens)
        else:
            held = sum(process.held for process in self.processes)
        status = self.executor.sched.status()[0]
        if held > status.leased_units:
            self.stats.held_over_leased += 1
        if self.stats.window.holds(self.sim.now):
            self.stats.waiters.append(status.waiters)
        if self.finished < len(self.processes):
            self.sim.after(0.5, self._check_safety)


def run(params: Params, *, brokers: bool) -> dict[str, Any]:
    """Run one mode of the model and summarise it (see :func:`summarise`)."""
    started = time.perf_counter()
    cluster = Cluster(params, brokers=brokers)
    cluster.run()
    return summarise(cluster, wall_s=time.perf_counter() - started)


# -------------------------------------------------------------------------------- summaries


def summarise(cluster: Cluster, *, wall_s: float) -> dict[str, Any]:
    """Calls, latency, fairness, admission and accounting of one run, as plain JSON values."""
    stats, window, spec = cluster.stats, cluster.stats.window, cluster.spec
    executor = cluster.executor
    calls = {method: count / window.length for method, count in sorted(stats.calls.items())}
    calls["total"] = sum(stats.calls.values()) / window.length
    return {
        "mode": "brokers" if cluster.brokers else "direct",
        "processes": cluster.params.processes,
        "nodes": cluster.params.nodes,
        "limit_per_minute": spec.value,
        "burst": spec.burst,
        "executor": {
            "calls_per_s": calls,
            "ticks_per_s": stats.ticks / window.length,
            "utilisation": executor.server.busy_s / window.length,
            "core_share": executor.timer.in_window_s / max(executor.server.busy_s, 1e-12),
            "core_ms_per_call": {what: 1e3 * spent / executor.timer.count[what]
                                 for what, spent in sorted(executor.timer.by_what.items())},
            "max_backlog": executor.server.max_backlog,
            "mean_queue_wait_ms": 1e3 * executor.server.waited_s
                                  / max(executor.server.started, 1),
            "mean_waiters": float(np.mean(stats.waiters)) if stats.waiters else 0.0,
            "calls_per_reservation": sum(stats.calls.values())
                                     / max(int(_in_window(stats).sum()), 1),
        },
        "brokers": _broker_summary(cluster),
        "latency_ms": _latency(stats),
        "reservations": _paths(stats),
        "tenants": _fairness(cluster),
        "admission": admission(stats, spec),
        "held_over_leased": stats.held_over_leased,  # samples; see Cluster._check_safety
        "accounting": _accounting(cluster),
        "tasks_per_s": stats.tasks / window.length,
        "lease_restarts": stats.lease_restarts,
        "errors": dict(stats.errors),
        "simulated_s": cluster.sim.now,
        "events": cluster.sim.events,
        "wall_s": wall_s,
    }


def _in_window(stats: Stats) -> np.ndarray:
    admitted = np.asarray(stats.admitted)
    return (admitted >= stats.window.start) & (admitted < stats.window.end)


def _latency(stats: Stats) -> dict[str, dict[str, float]]:
    """Reserve latency (asked to admitted) of reservations admitted in the window, in ms."""
    inside = _in_window(stats)
    latency = (np.asarray(stats.admitted) - np.asarray(stats.asked)) * 1e3
    path = np.asarray(stats.path)
    groups = {"all": inside, "left_process": inside & (path != LOCAL),
              "reached_executor": inside & (path == EXECUTOR)}
    summary = {}
    for name, mask in groups.items():
        values = sorted(latency[mask].tolist())
        summary[name] = {"p50": check.percentile(values, 50), "p99": check.percentile(values, 99),
                         "count": len(values)}
    return summary


def _paths(stats: Stats) -> dict[str, int]:
    path = np.asarray(stats.path)[_in_window(stats)]
    return {name: int((path == code).sum()) for code, name in enumerate(PATHS)}


def _fairness(cluster: Cluster) -> dict[str, Any]:
    """Units used per tenant in the window, against each tenant's share of expected use."""
    params, stats = cluster.params, cluster.stats
    inside = _in_window(stats)
    tenant = np.asarray(stats.tenant)[inside]
    used = np.maximum(np.asarray(stats.used)[inside], 0)
    tenants = len(params.weights)
    per_tenant = [int(used[tenant == t].sum()) for t in range(tenants)]
    counts = [len(range(t, params.processes, tenants)) for t in range(tenants)]
    weight = [w * n for w, n in zip(params.weights, counts)]
    targets = [w / sum(weight) for w in weight]
    total = sum(per_tenant)
    shares = [u / total if total else 0.0 for u in per_tenant]
    ratios = [s / t for s, t in zip(shares, targets)]
    rate = cluster.spec.refill_per_s
    return {
        "used": per_tenant,
        "shares": shares,
        "targets": targets,
        "share_error": max(abs(r - 1.0) for r in ratios),
        "jain": check.jain(ratios),
        "limit_use": total / (rate * stats.window.length),
    }


def admission(stats: Stats, spec: ResourceSpec) -> dict[str, float]:
    """The rate check, from the processes' own records.

    Units used by reservations admitted in any window [t1, t2] must be at most
    ``burst + rate x (t2 - t1)`` plus what was out of the bucket at t1 and not yet consumed
    (spare in leases, unused parts of open reservations, grants on their way): the bucket's
    own ledger of units out, minus units consumed by admissions before t1. Windows start at
    the executor's samples (at least every 50 ms while it works) and end at any admission.
    ``excess`` above 0 is over-admission; ``plain_excess`` leaves the leases out, to show how
    much they matter.
    """
    admitted = np.asarray(stats.admitted)
    used = np.asarray(stats.used, dtype=float)
    used = np.where(used < 0, np.asarray(stats.amount, dtype=float), used)  # never committed
    order = np.argsort(admitted, kind="stable")
    times, consumed = admitted[order], np.cumsum(used[order])
    rate, burst = spec.refill_per_s, float(spec.burst)
    if not len(times) or not stats.net_out:
        return {"excess": 0.0, "plain_excess": 0.0, "windows": 0}
    ends = consumed - rate * times
    best_end = np.maximum.accumulate(ends[::-1])[::-1]
    samples = np.asarray(stats.net_out)
    starts, out = samples[:, 0], samples[:, 1]
    first = np.searchsorted(times, starts, side="left")
    keep = first < len(times)
    starts, out, first = starts[keep], out[keep], first[keep]
    before = np.where(first > 0, consumed[np.maximum(first - 1, 0)], 0.0)
    inside = best_end[first] - before + rate * starts
    outstanding = np.maximum(out - before, 0.0)
    return {"excess": float((inside - outstanding - burst).max()),
            "plain_excess": float((inside - burst).max()),
            "windows": len(starts)}


def _accounting(cluster: Cluster) -> dict[str, Any]:
    """After the drain: nothing leased, no lease expired, and the bucket's ledger of units out
    equals what the processes used."""
    executor, stats = cluster.executor, cluster.stats
    status = executor.sched.status()[0]
    used = int(sum(u for u in stats.used if u > 0))
    net_out = executor.net_out()
    drained = cluster.finished == len(cluster.processes)
    expiries = executor.sched.lease_expiries + sum(b.core.expiries for b in cluster.brokers)
    upstream = sum(b.core.upstream_leases() + b.core.sub_leases() for b in cluster.brokers)
    return {
        "drained": drained,
        "leased_at_end": status.leased_units,
        "live_tokens_at_end": status.tokens,
        "broker_leases_at_end": upstream,
        "units_out": net_out,
        "units_used": used,
        "lease_expiries": expiries,
        "exact": bool(drained and status.leased_units == 0 and upstream == 0 and expiries == 0
                   and abs(net_out - used) < 0.5
                   and status.tokens == len(cluster.params.weights)),
    }


def _broker_summary(cluster: Cluster) -> dict[str, Any] | None:
    if not cluster.brokers:
        return None
    window = cluster.stats.window
    per_broker = sum(cluster.stats.broker_calls.values()) / window.length / len(cluster.brokers)
    return {
        "calls_per_s_each": per_broker,
        "calls_per_s_by_method": {m: c / window.length for m, c in
                                  sorted(cluster.stats.broker_calls.items())},
        "utilisation_max": max(b.server.busy_s for b in cluster.brokers) / window.length,
        "local_grants": sum(b.core.local_grants for b in cluster.brokers),
        "forwarded": sum(b.core.forwarded for b in cluster.brokers),
    }


# ------------------------------------------------------------------------ variants and checks

MODES = ("direct", "brokers")
VARIANTS = {"contended": None, "uncontended": 0.5}  # overload; None keeps the run's own


def variant_params(params: Params, variant: str) -> Params:
    """``uncontended`` sets the limit at twice the demand; ``contended`` keeps ``params``."""
    overload = VARIANTS[variant]
    return params if overload is None else replace(params, overload=overload)


def _run_one(job: tuple[Params, str, str]) -> tuple[str, str, dict[str, Any]]:
    params, variant, mode = job
    return variant, mode, run(variant_params(params, variant), brokers=mode == "brokers")


def run_all(params: Params, variants: Sequence[str], *, jobs: int = 1
            ) -> dict[str, dict[str, dict[str, Any]]]:
    """Both modes of every variant, with the same seed; ``jobs`` runs at a time."""
    work = [(params, variant, mode) for variant in variants for mode in MODES]
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            done = list(pool.map(_run_one, work))
    else:
        done = [_run_one(job) for job in work]
    runs: dict[str, dict[str, dict[str, Any]]] = {variant: {} for variant in variants}
    for variant, mode, result in done:
        runs[variant][mode] = result
    return runs


def sweep(params: Params, nodes: Sequence[int], variants: Sequence[str], *, seconds: float,
          jobs: int = 1) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """The same model at other node counts, each measured for ``seconds``: where each mode
    saturates the executor."""
    return {str(count): run_all(replace(params, nodes=count, seconds=seconds), variants,
                                jobs=jobs)
            for count in nodes}


def check_runs(runs: dict[str, dict[str, Any]], *, fairness: bool = True) -> list[str]:
    """What must hold in the model, for one variant's two runs; returns the failures.

    Brokers on: the executor's renewals scale with nodes (at most 1.2 per node per second);
    brokers off: with processes (at least 0.8 per process per second). In both modes: no
    over-admission, no holder holds units nobody leased, every tenant within 10% of its share
    (contended runs), and after the drain nothing is left leased, every process finished and
    the bucket charged at least every unit used.
    """
    failures = []
    direct, brokers = runs["direct"], runs["brokers"]
    renew_on = brokers["executor"]["calls_per_s"].get("renew", 0.0)
    renew_off = direct["executor"]["calls_per_s"].get("renew", 0.0)
    if renew_on > 1.2 * brokers["nodes"]:
        failures.append(f"brokers on: {renew_on:.1f} executor renewals/s for "
                        f"{brokers['nodes']} nodes (> 1.2 per node)")
    if renew_off < 0.8 * direct["processes"]:
        failures.append(f"brokers off: {renew_off:.1f} executor renewals/s for "
                        f"{direct['processes']} processes (< 0.8 per process)")
    for mode, result in runs.items():
        failures.extend(f"{mode}: {failure}" for failure in _check_run(result, fairness))
    return failures


def _check_run(result: dict[str, Any], fairness: bool) -> list[str]:
    failures = []
    admission, accounting = result["admission"], result["accounting"]
    if admission["excess"] > 1.0:
        failures.append(f"over-admission: {admission['excess']:.0f} units beyond burst + "
                        f"rate x window + units outstanding")
    if result["held_over_leased"]:
        failures.append(f"holders held more than the executor leased out, at "
                        f"{result['held_over_leased']} samples")
    if fairness and result["tenants"]["share_error"] > 0.10:
        failures.append(f"share error {result['tenants']['share_error']:.1%} > 10%")
    if not accounting["drained"]:
        failures.append("not every process finished within the drain time")
    if accounting["leased_at_end"] or accounting["broker_leases_at_end"]:
        failures.append(f"left leased at the end: {accounting['leased_at_end']} units at the "
                        f"executor, {accounting['broker_leases_at_end']} broker leases")
    if accounting["units_out"] < accounting["units_used"]:
        failures.append(f"used {accounting['units_used']} units but the bucket charged only "
                        f"{accounting['units_out']:.0f}")
    return failures


# ---------------------------------------------------------------------------------- outputs


def _fmt(value: float, digits: int = 1) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def table_rows(result: dict[str, Any], *, contended: bool) -> dict[str, str]:
    """One column of the results table; shares are only judged in a contended run."""
    executor, tenants = result["executor"], result["tenants"]
    calls, latency = executor["calls_per_s"], result["latency_ms"]
    core = executor["core_ms_per_call"]
    paths = result["reservations"]
    served = sum(paths.values()) or 1
    brokers = result["brokers"]
    rows = {"executor calls/s (total)": _fmt(calls["total"])}
    for method in ("acquire", "renew", "watch", "settle", "split", "merge_back"):
        rows[f"  {method}"] = _fmt(calls.get(method, 0.0))
    rows.update({
        "executor calls per reservation": _fmt(executor["calls_per_reservation"], 2),
        "executor utilisation": f"{executor['utilisation']:.0%}",
        "  of which core time": f"{executor['core_share']:.0%}",
        "core ms per acquire / renew / settle": " / ".join(
            _fmt(core.get(m, math.nan), 2) for m in ("acquire", "renew", "settle")),
        "requests waiting in the core (mean)": _fmt(executor["mean_waiters"], 0),
        "executor queue: mean wait (ms) / max calls":
            f"{_fmt(executor['mean_queue_wait_ms'])} / {executor['max_backlog']}",
        "broker calls/s, each": _fmt(brokers["calls_per_s_each"]) if brokers else "-",
        "broker utilisation, busiest": f"{brokers['utilisation_max']:.1%}" if brokers else "-",
        "reservations: process / node / executor":
            " / ".join(f"{paths[p] / served:.0%}" for p in PATHS),
        "reserve p50 / p99, all (ms)":
            f"{_fmt(latency['all']['p50'])} / {_fmt(latency['all']['p99'])}",
        "reserve p50 / p99, left the process (ms)":
            f"{_fmt(latency['left_process']['p50'])} / {_fmt(latency['left_process']['p99'])}",
        "units used / limit": f"{tenants['limit_use']:.2f}",
        "tenant shares (target)": " / ".join(
            f"{s:.3f} ({t:.3f})" for s, t in zip(tenants["shares"], tenants["targets"])),
        "share error / Jain": (f"{tenants['share_error']:.1%} / {tenants['jain']:.4f}"
                               if contended else "n/a: nobody waits for long"),
        "over-admission (units over the bound)": _fmt(max(0.0, result["admission"]["excess"]),
                                                      0),
        "lease restarts / lease expiries": f"{result['lease_restarts']} / "
                                           f"{result['accounting']['lease_expiries']}",
        "units charged, not used": _fmt(result["accounting"]["units_out"]
                                        - result["accounting"]["units_used"], 0),
        "all processes finished (drain)": "yes" if result["accounting"]["drained"] else "no",
        "wall time (s)": _fmt(result["wall_s"]),
    })
    return rows


def markdown(report: dict[str, Any]) -> str:
    """The results table, the model's assumptions, and the command that produced them."""
    runs = report["runs"]
    columns = [(variant, mode) for variant in runs for mode in MODES]
    tables = [table_rows(runs[v][m], contended=VARIANTS[v] is None) for v, m in columns]
    rows = {key: [table[key] for table in tables] for key in tables[0]}
    params = report["params"]
    lines = [
        "# Scale model: the executor with and without node brokers",
        "",
        (f"`{report['command']}` - {params['nodes']} nodes x {params['procs']} processes, "
         f"{params['seconds']:.0f} s measured after {params['warmup_s']:.0f} s of warm-up. "
         f"Wall time on {os.cpu_count()} cores, {report['jobs']} runs at a time: "
         f"{report['main_wall_s']:.0f} s for the runs in this table"
         + (f", {report['wall_s']:.0f} s with the sweep below." if report.get("sweep")
            else ".")),
        "",
        "| | " + " | ".join(f"{v}, {m}" for v, m in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    lines += [f"| {key} | " + " | ".join(values) + " |" for key, values in rows.items()]
    limits = ", ".join(f"{v}: {runs[v]['direct']['limit_per_minute']:,} tokens/min "
                       f"(burst {runs[v]['direct']['burst']:,})" for v in runs)
    lines += ["", f"Limits: {limits}.", ""]
    if report.get("sweep"):
        lines += sweep_markdown(report) + [""]
    lines += [_assumptions(params), ""]
    if report["checks"]:
        lines += ["Checks (tests/test_scale_model.py asserts them on `--quick`):", ""]
        lines += [f"- {variant}: " + ("all hold" if not failures else "; ".join(failures))
                  for variant, failures in report["checks"].items()]
    return "\n".join(lines) + "\n"


SWEEP_COLUMNS = ("processes", "variant", "brokers", "executor calls/s", "busy",
                 "calls per reservation", "queue wait (ms)",
                 "reserve p50 / p99, left the process (ms)", "share error", "lease restarts")


def sweep_markdown(report: dict[str, Any]) -> list[str]:
    """A table row per size, variant and mode: the sweep's sizes, then the full run."""
    lines = [
        (f"Other sizes (`--sweep`, {report['sweep_seconds']:g} s measured each; the last "
         f"rows are the run above):"),
        "",
        "| " + " | ".join(SWEEP_COLUMNS) + " |",
        "|" + "---|" * len(SWEEP_COLUMNS),
    ]
    for runs in [*report["sweep"].values(), report["runs"]]:
        for variant, pair in runs.items():
            for mode in MODES:
                cells = _sweep_row(pair[mode], variant)
                lines.append("| " + " | ".join(cells) + " |")
    return lines


def _sweep_row(result: dict[str, Any], variant: str) -> list[str]:
    executor, latency = result["executor"], result["latency_ms"]["left_process"]
    contended = VARIANTS[variant] is None
    return [
        f"{result['processes']:,}", variant, "on" if result["mode"] == "brokers" else "off",
        _fmt(executor["calls_per_s"]["total"], 0), f"{executor['utilisation']:.0%}",
        _fmt(executor["calls_per_reservation"], 2), _fmt(executor["mean_queue_wait_ms"]),
        f"{_fmt(latency['p50'])} / {_fmt(latency['p99'])}",
        f"{result['tenants']['share_error']:.1%}" if contended else "n/a",
        str(result["lease_restarts"]),
    ]


def _assumptions(params: dict[str, Any]) -> str:
    """The model's assumptions, in five sentences."""
    ms = {key: params[key] * 1e3 for key in ("executor_call_s", "broker_call_s", "reply_s",
                                             "tick_s", "node_hop_s", "cluster_hop_s")}
    low, high = params["reservations_per_task"]
    return (
        "The model drives the real `ExecutorService`, `BrokerCore` and `LocalLease` on a "
        "simulated clock with the calls the executor actor, broker actor and client make: per "
        "process "
        "a renewal 1 s after the last one returned, one recall watch (answered after 2 s at "
        "the latest), and `acquire`/`settle`/`split`/`merge_back` as the workload needs them; "
        "with brokers, processes call their node's broker, which renews and watches once per "
        "node. "
        f"The executor and every broker serve calls one at a time in arrival order, each call "
        f"costing {ms['executor_call_s']:.2f} ms at the executor "
        f"({ms['broker_call_s']:.2f} ms at a broker) plus the CPU time the real core took for "
        f"it here (`time.thread_time`); answering a parked call costs "
        f"{ms['reply_s']:.2f} ms, a ticker turn {ms['tick_s']:.2f} ms plus core time, and a "
        f"hop {ms['node_hop_s']:.1f} ms on a node or {ms['cluster_hop_s']:.1f} ms to the "
        f"executor. "
        f"Processes start over the first {params['ramp_s']:g} s, are dealt in turn to tenants "
        f"weighing {':'.join(map(str, params['weights']))}, and run tasks back to back, each "
        f"with a token split from its tenant's (expected use {params['weight_unit']} x "
        f"weight, merged back at the end) making {low}-{high} reservations of "
        f"{params['amount'][0]}-{params['amount'][1]} tokens, each held through an LLM call of "
        f"{params['think_s'][0]}-{params['think_s'][1]} s and committed at "
        f"{params['used_fraction'][0]:.0%}-{params['used_fraction'][1]:.0%} of its size. "
        f"The contended limit is what the processes would reserve if they never waited, "
        f"divided by {params['overload']:g}; the uncontended limit is twice it. "
        f"Ray's serialisation, the SQLite write and the network are in the fixed costs only, "
        f"and the measured core time moves a little from run to run with the machine."
    )


METHODS = ("acquire", "renew", "watch", "settle", "split", "merge_back")


def chart(report: dict[str, Any], path: Path) -> None:
    """Executor calls/s by method in each variant, reserve latency and tenant shares; with a
    sweep, the executor's busy fraction and the reserve latency against the cluster's size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    rows = 3 if report.get("sweep") else 2
    fig, axes = plt.subplots(rows, 2, figsize=(13, 4.5 * rows))
    for ax, variant in zip(axes[0], list(runs)[:2]):
        _calls_panel(ax, variant, runs[variant])
    _latency_panel(axes[1][0], runs)
    _shares_panel(axes[1][1], report)
    if rows == 3:
        _sweep_panels(axes[2][0], axes[2][1], report)
    fig.suptitle(f"ray_quota scale model: {report['params']['nodes']} nodes x "
                 f"{report['params']['procs']} processes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label(mode: str) -> str:
    return f"brokers {'on' if mode == 'brokers' else 'off'}"


def _calls_panel(ax: Any, variant: str, pair: dict[str, Any]) -> None:
    for offset, mode in ((-0.2, "direct"), (0.2, "brokers")):
        executor = pair[mode]["executor"]
        heights = [max(executor["calls_per_s"].get(m, 0.0), 0.1) for m in METHODS]
        ax.bar([i + offset for i in range(len(METHODS))], heights, width=0.4,
               label=f"{_label(mode)} (executor busy {executor['utilisation']:.0%})")
    ax.set_xticks(range(len(METHODS)), METHODS)
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.1)
    ax.set_ylabel("executor calls / s")
    ax.set_title(f"{variant}: executor calls by method")
    ax.legend()


def _latency_panel(ax: Any, runs: dict[str, Any]) -> None:
    labels, p50, p99 = [], [], []
    for variant, pair in runs.items():
        for mode in MODES:
            latency = pair[mode]["latency_ms"]["left_process"]
            labels.append(f"{variant}\n{_label(mode)}")
            p50.append(0.0 if math.isnan(latency["p50"]) else latency["p50"])
            p99.append(0.0 if math.isnan(latency["p99"]) else latency["p99"])
    ax.bar([i - 0.2 for i in range(len(labels))], p50, width=0.4, label="p50")
    ax.bar([i + 0.2 for i in range(len(labels))], p99, width=0.4, label="p99")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yscale("log")
    ax.set_ylabel("ms")
    ax.set_title("reserve latency, reservations that left the process")
    ax.legend()


def _shares_panel(ax: Any, report: dict[str, Any]) -> None:
    variant = next(iter(report["runs"]))
    pair = report["runs"][variant]
    weights = report["params"]["weights"]
    for offset, mode in ((-0.25, "direct"), (0.0, "brokers")):
        ax.bar([i + offset for i in range(len(weights))], pair[mode]["tenants"]["shares"],
               width=0.25, label=_label(mode))
    ax.bar([i + 0.25 for i in range(len(weights))], pair["direct"]["tenants"]["targets"],
           width=0.25, label="target", color="grey")
    ax.set_xticks(range(len(weights)), [f"weight {w}" for w in weights])
    ax.set_ylabel("share of units used")
    ax.set_title(f"{variant}: tenant shares")
    ax.legend()


def _sweep_panels(busy: Any, latency: Any, report: dict[str, Any]) -> None:
    sizes = [*report["sweep"].values(), report["runs"]]
    for variant in report["runs"]:
        for mode in MODES:
            points = [runs[variant][mode] for runs in sizes if variant in runs]
            procs = [point["processes"] for point in points]
            style = {"color": "C1" if mode == "brokers" else "C0", "marker": "o",
                     "linestyle": "-" if VARIANTS[variant] is None else ":",
                     "label": f"{variant}, {_label(mode)}"}
            busy.plot(procs, [point["executor"]["utilisation"] for point in points], **style)
            latency.plot(procs, [point["latency_ms"]["left_process"]["p50"] for point in points],
                         **style)
    counts = sorted({runs[variant]["direct"]["processes"] for runs in sizes
                     for variant in runs})
    for ax in (busy, latency):
        ax.set_xscale("log")
        ax.set_xticks(counts, [f"{count:,}" for count in counts])
        ax.minorticks_off()
        ax.set_xlabel("processes")
        ax.legend(fontsize=8)
    busy.set_ylim(0.0, 1.05)
    busy.set_ylabel("executor busy fraction")
    busy.set_title("executor utilisation against cluster size")
    latency.set_yscale("log")
    latency.set_ylabel("ms")
    latency.set_title("reserve p50, reservations that left the process")


# ------------------------------------------------------------------------------ command line


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.scale_model",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="4 nodes x 8 processes, 150 measured seconds (a few s of wall)")
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--procs", type=int, help="processes per node")
    parser.add_argument("--seconds", type=float, help="measured simulated seconds")
    parser.add_argument("--warmup", type=float, help="simulated seconds before measuring")
    parser.add_argument("--overload", type=float, help="demand / limit, contended variant")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--variants", default="contended,uncontended",
                        help="comma-separated: contended, uncontended")
    parser.add_argument("--sweep", default="",
                        help="comma-separated node counts to run as well, e.g. 2,5,10,20")
    parser.add_argument("--sweep-seconds", type=float, default=30.0,
                        help="measured simulated seconds at each sweep size (default 30)")
    parser.add_argument("--drain", type=float, help="simulated seconds allowed for the drain")
    parser.add_argument("--executor-call-us", type=float,
                        help="the executor's fixed cost per call (default 300)")
    parser.add_argument("--core-time-us", type=float,
                        help="a fixed core time per call instead of the measured one")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs at a time (default: 2, or 1 on one core)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--render", type=Path,
                        help="redraw the table and chart from a scale_results.json, no run")
    parser.add_argument("--out", type=Path,
                        help="where to write scale_results.json, scale_model.md and "
                             "scale_model.png (default: bench/, or nowhere with --quick)")
    return parser.parse_args(argv)


def params_from(args: argparse.Namespace) -> Params:
    params = quick(Params()) if args.quick else Params()
    changes = {"nodes": args.nodes, "procs": args.procs, "seconds": args.seconds,
               "warmup_s": args.warmup, "drain_s": args.drain, "overload": args.overload,
               "seed": args.seed,
               "executor_call_s": None if args.executor_call_us is None
               else args.executor_call_us * 1e-6,
               "core_time_s": None if args.core_time_us is None else args.core_time_us * 1e-6}
    params = replace(params, **{k: v for k, v in changes.items() if v is not None})
    return replace(params, verbose=not args.quiet)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the model, print the table, and write the results, chart and table."""
    args = parse(argv)
    if args.render is not None:
        report = json.loads(args.render.read_text())
        write(report, args.out or args.render.parent, results=False)
        return 0
    params = params_from(args)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        print(f"unknown variants: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    sizes = [int(n) for n in args.sweep.split(",") if n.strip()]
    started = time.perf_counter()
    swept = sweep(params, sizes, variants, seconds=args.sweep_seconds, jobs=args.jobs)
    main_started = time.perf_counter()
    runs = run_all(params, variants, jobs=args.jobs)
    main_wall_s = time.perf_counter() - main_started
    checks = {variant: check_runs(runs[variant], fairness=VARIANTS[variant] is None)
              for variant in variants}
    command = "python -m bench.scale_model" + ("" if argv is None and len(sys.argv) <= 1
                                               else " " + " ".join(argv or sys.argv[1:]))
    report = {"command": command, "params": asdict(params), "jobs": args.jobs, "runs": runs,
              "checks": checks,
              "sweep": swept, "sweep_seconds": args.sweep_seconds, "main_wall_s": main_wall_s,
              "wall_s": time.perf_counter() - started}
    out = args.out if args.out is not None else (None if args.quick else OUT_DIR)
    if out is None:
        print(markdown(report))
    else:
        write(report, out, results=True)
    return 0


def write(report: dict[str, Any], out: Path, *, results: bool) -> None:
    """Print the table and write it, the chart and (if ``results``) the JSON into ``out``."""
    text = markdown(report)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    if results:
        (out / "scale_results.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "scale_model.md").write_text(text)
    chart(report, out / "scale_model.png")


if __name__ == "__main__":
    sys.exit(main())
