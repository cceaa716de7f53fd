"""A node's broker actor in the model: a shell around the real :class:`BrokerCore`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.scale_model.actor import Actor
from bench.scale_model.executor import ExecutorModel, model_holder
from bench.scale_model.params import EXECUTOR, NODE, RESOURCE, Params, Stats
from bench.scale_model.sim import Reply, Sim
from ray_quota._core.broker import BrokerCore, Forward
from ray_quota._core.protocol import (
    RENEW_INTERVAL_S,
    Grant,
    Renewed,
    Report,
    prefetch_cap,
)
from ray_quota._errors import LeaseEndedError, QuotaError
from ray_quota._spec import Kind


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
        self.holder = model_holder(name)
        self.core = BrokerCore(holder=self.holder, ttl_s=executor.sched.policy.lease_ttl_s)
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
        self._up(self._executor.renew, back, self.holder, reports, True)
        return True

    def _renewed_upstream(self, sent_at: float, reports: list[Report],
                          alive: Renewed) -> None:
        def work() -> None:
            self.core.upstream_renewed(reports, alive, sent_at)
            if self._params.batch_renewals:
                self._sim.after(RENEW_INTERVAL_S, self._renew_due)

        self.server.submit(lambda: self._run(work, None, self._params.reply_s))

    def _watch_upstream(self) -> None:
        self._up(self._executor.watch, Reply(self._recalled, self._executor.hop_s), self.holder)

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
                    answer = self._watches.post(holder, ids, self._sim.now)
                    if answer is not None:
                        woken.append(answer)
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
