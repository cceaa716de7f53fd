"""One run's cluster: the executor, the brokers (if on) and every process, and the safety
samples taken while it runs.
"""

from __future__ import annotations

import gc
import math
import random
import sys
import time

from bench.scale_model.actor import LeaseService
from bench.scale_model.broker import BrokerModel
from bench.scale_model.executor import ExecutorModel
from bench.scale_model.params import RESOURCE, Params, Stats
from bench.scale_model.process import Process
from bench.scale_model.sim import Sim, Window
from ray_quota._core.scheduler import Policy


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
