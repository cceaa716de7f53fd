"""The executor actor in the model: a shell around the real :class:`ExecutorService`."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import Any

from bench.scale_model.actor import Actor
from bench.scale_model.params import Params, Stats
from bench.scale_model.sim import Reply, Sim
from ray_quota._core.credentials import holder_id
from ray_quota._core.pools import RatePool
from ray_quota._core.protocol import (
    Report,
    TokenInfo,
)
from ray_quota._core.scheduler import Policy
from ray_quota._core.service import ExecutorService
from ray_quota._errors import QuotaError
from ray_quota._spec import ResourceSpec


# The model's holders are all honest: one secret proves every one of them, and the model's calls
# carry it, as each real process's calls carry its own.
MODEL_SECRET = "scale-model"


def model_holder(name: str) -> str:
    """The holder id of a modelled process or broker."""
    return holder_id(name, MODEL_SECRET)


class ExecutorModel(Actor):
    """The executor actor around the real :class:`ExecutorService`: same calls, same drains.

    Only the shell is modelled here (a :class:`Server` for its thread, replies for its futures,
    the real :class:`Watches` for its recall watches); every decision is the service's.
    """

    def __init__(self, sim: Sim, spec: ResourceSpec, params: Params, stats: Stats) -> None:
        super().__init__(sim, params, stats, hop_s=params.cluster_hop_s,
                         call_s=params.executor_call_s)
        ids = itertools.count()
        # The tenants' drivers, which hold their parent tokens idle for the whole run, are not
        # modelled: their renewals would name those tokens, so none is released as an orphan.
        self.service = ExecutorService({spec.name: spec}, clock=sim,
                                       policy=Policy(orphan_grace_s=math.inf),
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
                                          prefetch, None, MODEL_SECRET)
            if isinstance(ticket, QuotaError):
                return ticket
            if ticket.outcome is None:
                self._parked[ticket.id] = reply
                self._schedule_tick(self._sim.now)  # the actor kicks its ticker
                return None
            return ticket.outcome

        self._call("acquire", reply, work)

    def settle(self, reports: list[Report]) -> None:
        self._call("settle", None, lambda: self.service.settle(reports, MODEL_SECRET))

    def renew(self, reply: Reply, holder: str, reports: list[Report], observed: bool) -> None:
        self._call("renew", reply, lambda: self.service.renew(holder, reports, MODEL_SECRET))

    def split(self, reply: Reply, token_id: str, generation: int, claimant: str,
              child_expected_use: int) -> None:
        def work() -> Any:
            answer = self.service.split(token_id, generation, claimant, child_expected_use)
            return answer if isinstance(answer, QuotaError) else answer[0]  # the child

        self._call("split", reply, work)

    def merge_back(self, reply: Reply, token_id: str, generation: int, claimant: str,
                   parent_id: str, reports: list[Report]) -> None:
        self._call("merge_back", reply, lambda: self.service.merge_back(
            token_id, generation, claimant, parent_id, reports, MODEL_SECRET))

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
            woken = self._watches.post(recall.holder, recall.token_ids, self._sim.now)
            if woken is not None:
                self._woken.append(woken)
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
