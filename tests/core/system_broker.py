"""A node's broker in the whole-system model: a real ``BrokerCore`` driven as the broker actor
(``_actors/broker.py``) drives it, between the node's processes and the model's executor.

Calls are delivered at once, as in ``system_world``. The broker's own renewal runs once a
second; it can be paused (its upstream renewals fail, as while Ray restarts the executor) and
the broker can die, after which its processes take their leases over at the executor, as
``_runtime/routing.py`` has them do (``adopt``, naming the broker's leases by the adoption
secret their grants carried, ``via``).

As the actor, the broker checks that each process's call carries the secret that proves the
holder and lease keys it names, and proves its own to the executor with its own secret.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ray_quota._core.broker import BrokerCore, Forward
from ray_quota._core.credentials import check_holder, check_keys, holder_id
from ray_quota._core.protocol import Grant, Renewed, Report, prefetch_cap
from ray_quota._errors import ExecutorUnavailableError, LeaseEndedError, QuotaError

if TYPE_CHECKING:
    from system_world import World

Answer = Callable[[Grant | QuotaError], None]


class Node:
    """One node's broker. ``dead`` once it died: its processes adopt their leases at their
    next call to it; a new broker serves processes that start on the node later."""

    def __init__(self, name: str, world: World) -> None:
        self.name = name
        self.world = world
        # A secret of its own and the holder id it proves, as a process's (deterministic
        # here, as are the adoption secrets of its leases).
        self.secret = f"broker-{name}-{next(world.incarnations)}"
        self.holder = holder_id(self.secret, self.secret)
        adoptions = itertools.count()
        self.core = BrokerCore(holder=self.holder, ttl_s=world.policy.lease_ttl_s,
                               new_secret=lambda: f"{self.secret}-adopt-{next(adoptions)}")
        self.dead = False
        self.paused_until = -math.inf  # upstream renewals fail until then
        self._pending: dict[int, Answer] = {}  # requests forwarded and not answered
        self._ids = itertools.count()

    # ------------------------------------------------------------------------ lease calls

    def acquire(self, resource: str, token_id: str, generation: int, claimant: str, key: str,
                amount: int, prefetch: int, secret: str, answer: Answer) -> None:
        """A process's request; ``answer`` gets its outcome, now or once the executor's
        comes (as the actor's ``acquire``)."""
        try:
            check_keys([key], secret)
        except QuotaError as exc:
            answer(exc)
            return
        world = self.world
        spec = world.specs[resource]
        claim = (generation, claimant)
        try:
            ask = self.core.acquire(token_id, spec.kind, key, amount, prefetch=prefetch,
                                    max_prefetch=prefetch_cap(spec), now=world.clock.now,
                                    claim=claim)
        except KeyError:
            answer(_ended())
            return
        if not isinstance(ask, Forward):
            answer(ask)
            return
        sent_at = world.clock.now
        pending = next(self._ids)
        self._pending[pending] = answer

        def upstream(outcome: Grant | QuotaError) -> None:
            if self.dead or self._pending.pop(pending, None) is None:
                return  # the process was told the broker died
            now = world.clock.now
            if isinstance(outcome, Grant):
                try:
                    answer(self.core.granted(token_id, key, amount, prefetch, outcome,
                                             sent_at=sent_at, now=now, claim=claim))
                except KeyError:
                    answer(_ended())
                return
            self.core.refused(token_id, key, now)
            if isinstance(outcome, (LeaseEndedError, ExecutorUnavailableError)):
                self.core.lost(token_id, ask.key, claim)
            answer(outcome)

        world.executor_acquire(upstream, self.secret, token_id, generation, claimant, ask.key,
                               ask.amount, ask.prefetch)

    def settle(self, reports: list[Report], secret: str) -> None:
        """A settle nobody waits for: dropped if ``secret`` does not prove its reports."""
        try:
            check_keys([report.key for report in reports], secret)
        except QuotaError:
            return
        if self.core.settle(reports, self.world.clock.now):
            self.send_now({report.token_id for report in reports})

    def renew(self, holder: str, reports: list[Report], secret: str) -> Renewed:
        """A process's renewal; raises :class:`AccessDeniedError` if ``secret`` does not
        prove ``holder`` and its reports."""
        check_holder(holder, secret)
        check_keys([report.key for report in reports], secret)
        now = self.world.clock.now
        urgent = self.core.settle(reports, now)
        alive = self.core.renew(reports, now)
        if urgent:
            self.send_now({report.token_id for report in reports})
        return alive

    def ending(self, method: str, ending: str, reports: list[Report], secret: str,
               *args: Any) -> Any:
        """close, merge, merge_back, as the actor makes them: the call first, with the
        totals the broker's leases of the ending token will have once the process's final
        totals (which ``secret`` must prove) are applied, and the broker's own secret; only
        once the executor accepted it, apply those totals and release the token here (a
        refused call changes nothing), sending what the release adds."""
        check_keys([report.key for report in reports], secret)
        upstream = self.core.ending_totals(ending, reports)
        answer = self.world.token_call(method, *args, upstream, self.secret)
        self.core.settle(reports, self.world.clock.now)
        after = [report for report in self.core.release(ending) if report not in upstream]
        if after:
            self.world.send("settle", after, self.secret)
        return answer

    # -------------------------------------------------------------------------- its loops

    def renew_upstream(self) -> None:
        """The broker's renewal: expire silent sub-leases, renew the node's leases. While
        paused the call fails after the reports were made, as the actor's loop loses them."""
        now = self.world.clock.now
        self.core.expire(now)
        reports = self.core.upstream_reports(now)
        if not reports or now < self.paused_until:
            return
        try:
            alive = self.world.executor.call("renew", self.holder, reports, self.secret)
        except Exception:  # noqa: BLE001 - as the actor: a missed renewal only shortens trust
            return
        self.core.upstream_renewed(reports, alive, now)

    def recalled(self, token_ids: frozenset[str]) -> None:
        reports, tell = self.core.recall(token_ids)
        if reports:
            self.world.send("settle", reports, self.secret)
        for holder, ids in tell.items():
            self.world.recall_holder(holder, frozenset(ids))

    def die(self) -> None:
        """The broker's process is gone: requests it forwarded are answered as lost."""
        self.dead = True
        pending, self._pending = self._pending, {}
        for answer in pending.values():
            answer(ExecutorUnavailableError("the node's broker died"))

    def send_now(self, token_ids: set[str]) -> None:
        """Send the running totals of the tokens' leases upstream now."""
        reports = [r for token_id in token_ids for r in self.core.report_of(token_id)]
        if reports:
            self.world.send("settle", reports, self.secret)


def _ended() -> LeaseEndedError:
    return LeaseEndedError("this lease ended at the node's broker; ask under a new lease key")
