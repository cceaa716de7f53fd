"""A worker process in the model: tasks one after another, each with a token split from its
tenant's, reserving through its lease, renewing it and watching for recalls."""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Callable
from typing import Any

from bench.scale_model.actor import LeaseService
from bench.scale_model.executor import ExecutorModel, model_holder
from bench.scale_model.params import EXECUTOR, LOCAL, Params, Stats
from bench.scale_model.sim import Reply, Sim
from ray_quota._core.credentials import claim_value, make_claim
from ray_quota._core.holder import LeaseSet, LocalLease
from ray_quota._core.protocol import (
    RENEW_INTERVAL_S,
    Grant,
    Renewed,
    Report,
    TokenInfo,
    prefetch_cap,
)
from ray_quota._errors import LeaseEndedError, QuotaError

GENERATION = 1  # a task takes its token up once, as an unpickled token does (generation 0 + 1)


class SimulationError(RuntimeError):
    """The model reached a state the real client would not handle quietly."""


class Process:
    """One worker process: tasks one after another, each with a token split from its tenant's.

    As ``QuotaToken`` and the renewer do, on the real :class:`LeaseSet`: reservations come from
    the current lease when it can serve them, else from the lease service (the executor, or the
    node's broker); a renewal goes out every interval after the last one returned; one recall
    watch is always open.
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
        keys = itertools.count()
        self.holder = model_holder(name)
        self._new_key = lambda: f"{self.holder}:{next(keys)}"  # unique over the tasks
        self.leases: LeaseSet | None = None  # the task token's leases, while a task runs
        self._left = 0  # reservations left in this task
        self._claim = ""  # the task's claim on its token
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
    def token_id(self) -> str | None:
        """The task token's id, while a task runs."""
        return None if self.leases is None else self.leases.token_id

    @property
    def held(self) -> int:
        """Units held in the current lease (a lease the process was told ended is not counted:
        the executor charged what it held)."""
        lease = None if self.leases is None else self.leases.current
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
        # The task takes its token up with the proof its pickled bytes would carry.
        self._claim = make_claim(self.name, self.name, [claim_value(self._owner, info.id, 0)])
        self.leases = LeaseSet(info.id, info.spec.kind, max_prefetch=prefetch_cap(info.spec),
                               new_key=self._new_key)
        self._left = self.rng.randint(*self._params.reservations_per_task)
        if self._stopping:
            self._end_task()
        else:
            self._reserve()

    def _reserve(self) -> None:
        amount = self.rng.randint(*self._params.amount)
        lease = self._leases().take(amount, self._sim.now)
        if lease is not None:
            self._admitted(lease, amount, self._sim.now, LOCAL)
        else:
            self._ask(amount, self._sim.now)

    def _ask(self, amount: int, asked: float) -> None:
        leases = self._leases()
        lease = leases.current
        reply = Reply(functools.partial(self._answered, leases, lease, amount, asked,
                                        self._sim.now), self._service.hop_s)
        self._sim.after(self._service.hop_s, self._service.acquire, reply, leases.token_id,
                        GENERATION, self._claim, lease.key, amount, lease.prefetch())

    def _answered(self, leases: LeaseSet, lease: LocalLease, amount: int, asked: float,
                  sent_at: float, answer: Any) -> None:
        outcome, path = answer if isinstance(answer, tuple) else (answer, EXECUTOR)
        if isinstance(outcome, LeaseEndedError):
            self._stats.lease_restarts += 1
            leases.ended(lease)  # carry on under a new lease, as QuotaToken.reserve does
            self._ask(amount, asked)
            return
        if not isinstance(outcome, Grant):  # the token is gone: the task fails, the next one
            self._stats.errors[type(outcome).__name__] += 1  # starts, as the user's code would
            self._end_task()
            return
        if not leases.granted(lease, amount, outcome, sent_at=sent_at):
            raise SimulationError(f"{self.name}: granted into a lease settled as final")
        self._admitted(lease, amount, asked, path)

    def _admitted(self, lease: LocalLease, amount: int, asked: float, path: int) -> None:
        index = self._stats.reservation(self.tenant, asked, self._sim.now, amount, path)
        self._observed = True
        think = self.rng.uniform(*self._params.think_s)
        self._sim.after(think, self._commit, lease, amount, index)

    def _commit(self, lease: LocalLease, amount: int, index: int) -> None:
        """The LLM call returned: commit what it used; under contention spare goes back now."""
        used = int(amount * self.rng.uniform(*self._params.used_fraction))
        self._stats.used[index] = used
        report = self._leases().settle(lease, amount, used)
        if report is not None:
            self._send_settle(report)
        self._left -= 1
        if self._left > 0 and not self._stopping:
            self._reserve()
        else:
            self._end_task()

    def _end_task(self) -> None:
        """``return_to_parent``: final totals go with the merge back."""
        leases, self.leases = self._leases(), None
        reply = Reply(self._task_ended, self._service.hop_s)
        self._sim.after(self._service.hop_s, self._service.merge_back, reply, leases.token_id,
                        GENERATION, self._claim, self._parent.id, leases.final_reports())

    def _task_ended(self, answer: Any) -> None:
        if isinstance(answer, QuotaError):
            self._stats.errors[type(answer).__name__] += 1
        self._begin_task()

    def _finish(self) -> None:
        self.done = True
        self.on_done()

    # ------------------------------------------------------------------- renewals, recalls

    def _flush(self) -> None:
        """The renewer: report the leases' totals and renew them."""
        if self.done:
            return
        leases = self.leases
        reports = [] if leases is None else leases.reports(self._sim.now, live=True)
        observed, self._observed = self._observed, False
        if not reports and not observed:
            self._sim.after(RENEW_INTERVAL_S, self._flush)
            return
        reply = Reply(functools.partial(self._renewed, leases, self._sim.now),
                      self._service.hop_s)
        self._sim.after(self._service.hop_s, self._service.renew, reply, self.holder, reports,
                        observed)

    def _renewed(self, leases: LeaseSet | None, sent_at: float, alive: Renewed) -> None:
        if leases is not None and leases is self.leases:  # else the task ended meanwhile
            current = leases.current
            leases.renewed(alive, sent_at)
            if leases.current is not current:  # the lease expired: a new one starts
                self._stats.lease_restarts += 1
        self._sim.after(RENEW_INTERVAL_S, self._flush)

    def _watch(self) -> None:
        if not self.done:
            reply = Reply(self._recalled, self._service.hop_s)
            self._sim.after(self._service.hop_s, self._service.watch, reply, self.holder)

    def _recalled(self, token_ids: list[str]) -> None:
        leases = self.leases
        if leases is not None and leases.token_id in token_ids:
            report = leases.recall()
            if report is not None:
                self._send_settle(report)
        self._watch()

    # ------------------------------------------------------------------------- internals

    def _leases(self) -> LeaseSet:
        if self.leases is None:
            raise SimulationError(f"{self.name}: no token in hand")
        return self.leases

    def _send_settle(self, report: Report) -> None:
        self._sim.after(self._service.hop_s, self._service.settle, [report])
