"""A worker process in the model: tasks one after another, each with a token split from its
tenant's, reserving through its lease, renewing it and watching for recalls."""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Callable
from typing import Any

from bench.scale_model.actor import LeaseService
from bench.scale_model.executor import ExecutorModel
from bench.scale_model.params import EXECUTOR, LOCAL, Params, Stats
from bench.scale_model.sim import Reply, Sim
from ray_quota._core.holder import LocalLease
from ray_quota._core.protocol import (
    PREFETCH_FRACTION,
    RENEW_INTERVAL_S,
    Grant,
    Renewed,
    Report,
    TokenInfo,
)
from ray_quota._errors import LeaseEndedError, QuotaError
from ray_quota._spec import Kind

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
