"""The broker actor: one per node, between the node's processes and the executor.

Processes call it with the executor's lease methods (``acquire``, ``settle``, ``renew``,
``watch``, and the token calls that carry lease totals: ``close``, ``merge``, ``merge_back``);
it answers from its :class:`BrokerCore` and, once a second, renews everything of its node with
the executor in one call. So the executor serves one renewal and one recall watch per node,
not per process, and requests the broker can serve from its spare never leave the node.

Like the executor, methods return a :class:`QuotaError` rather than raise it, and check every
message before anything changes (the checks of :mod:`ray_quota._core.protocol`): any process of
the cluster can call a broker. Like the executor, the broker checks that each call's secret (its
last argument) proves the holder and lease keys it names; upstream it proves its own with its own
secret. Processes never learn its lease keys: a grant names the broker's lease only by an adoption
secret (see :class:`BrokerCore`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ray_quota._runtime import identity, rpc
from ray_quota._observability import observe as _observe
from ray_quota._core.broker import BrokerCore, Forward, Terms
from ray_quota._core.credentials import check_holder, check_keys
from ray_quota._errors import (
    ExecutorUnavailableError,
    LeaseEndedError,
    ProtocolError,
    QuotaError,
    UnknownResourceError,
)
from ray_quota._actors.recall_board import RecallBoard
from ray_quota._observability.observe import Batch
from ray_quota._core.protocol import (
    RENEW_INTERVAL_S,
    WATCH_TIMEOUT_S,
    ExecutorInfo,
    Grant,
    Renewed,
    Report,
    check_acquire,
    check_generation,
    check_id,
    check_reports,
    check_timeout,
    check_token_call,
    prefetch_cap,
)

BROKER_PREFIX = "ray_quota_broker:"


def broker_name(node_id: str) -> str:
    return BROKER_PREFIX + node_id


class BrokerActor:
    """Re-leases the executor's units to the processes of one node; see :mod:`ray_quota._core.broker`."""

    def __init__(self, node_id: str) -> None:
        identity.become_broker()  # this process is the broker: its own calls go upstream
        self._node_id = node_id
        self._core: BrokerCore | None = None
        self._info: ExecutorInfo | None = None
        self._board = RecallBoard()
        self._started: asyncio.Lock | None = None
        self._push: set[str] = set()  # tokens whose totals should reach the executor soon
        self.counts: dict[str, int] = {}

    # -------------------------------------------------------------------------- lease calls

    async def acquire(self, resource: str, token_id: str, generation: int, claimant: str,
                      key: str, amount: int, prefetch: int, timeout: float | None,
                      secret: str | None = None) -> Grant | QuotaError:
        core, info = await self._ready("acquire")
        try:
            timeout = check_acquire(token_id, generation, claimant, key, amount, prefetch,
                                    timeout)
            check_id("resource", resource)
        except QuotaError as exc:
            return exc
        if (refused := _refused([], secret, keys=(key,))) is not None:
            return refused
        spec = info.resources.get(resource)
        if spec is None:
            return UnknownResourceError(f"no resource named {resource!r}")
        cap = prefetch_cap(spec)
        claim = (generation, claimant)
        try:
            answer = core.acquire(token_id, spec.kind, key, amount, prefetch=prefetch,
                                  max_prefetch=cap, now=time.monotonic(), claim=claim,
                                  resource=resource)
        except KeyError:
            return _ended()
        except ProtocolError as exc:  # not the token's resource: nothing changed
            return exc
        if not isinstance(answer, Forward):
            return answer
        sent_at = time.monotonic()
        try:
            grant = await rpc.call_async("acquire", token_id, generation, claimant,
                                         answer.key, answer.amount, answer.prefetch, timeout,
                                         identity.SECRET, retry=False)
        except QuotaError as exc:
            core.refused(token_id, key, time.monotonic())
            if isinstance(exc, (LeaseEndedError, ExecutorUnavailableError)):
                # The lease ended, or the answer was lost with whatever it granted: either way
                # the broker's totals for it can no longer be trusted. Retire it; once its
                # processes let go, its final settlement gives back what the executor counts.
                core.lost(token_id, answer.key, claim)
            return exc
        except asyncio.CancelledError:
            # The caller gave up (a cancelled reserve_async: Ray cancels this call, and the
            # call upstream with it, which withdraws the request). It may have been granted
            # first, its answer lost here: as with any lost answer, the request is no longer
            # out, and the broker's totals of its lease can no longer be trusted.
            core.refused(token_id, key, time.monotonic())
            core.lost(token_id, answer.key, claim)
            raise
        try:
            return core.granted(token_id, key, amount, prefetch, grant, sent_at=sent_at,
                                now=time.monotonic(), claim=claim, resource=resource,
                                terms=_terms(info, grant.resource))
        except KeyError:
            return _ended()
        except ProtocolError as exc:
            return exc

    async def settle(self, reports: list[Report], secret: str | None = None) -> None | QuotaError:
        core, _ = await self._ready("settle")
        try:
            reports = check_reports(reports)
        except QuotaError as exc:
            return exc
        if (refused := _refused(reports, secret)) is not None:
            return refused
        if core.settle(reports, time.monotonic()):
            self._send_now({report.token_id for report in reports})
        return None

    async def renew(self, holder: str, reports: list[Report], observed: Batch | None = None,
                    secret: str | None = None) -> Renewed | QuotaError:
        core, _ = await self._ready("renew")
        try:
            check_id("holder", holder)
            reports = check_reports(reports)
        except QuotaError as exc:
            return exc
        if (refused := _refused(reports, secret, holder)) is not None:
            return refused
        # Goes on with the broker's own renewal, its malformed entries dropped here.
        _observe.ACCUMULATOR.restore(_observe.clean(observed)[0])
        now = time.monotonic()
        urgent = core.settle(reports, now)
        alive = core.renew(reports, now)
        if urgent:
            self._send_now({report.token_id for report in reports})
        return alive

    async def watch(self, holder: str, timeout_s: float,
                    secret: str | None = None) -> list[str] | QuotaError:
        await self._ready("watch")
        try:
            check_id("holder", holder)
            timeout = check_timeout("timeout_s", timeout_s)
        except QuotaError as exc:
            return exc
        if (refused := _refused([], secret, holder)) is not None:
            return refused  # recalls are answered to their own holder only
        return await self._board.wait(holder, timeout or 0.0)

    # ---------------------------------------------------------- token calls with lease totals

    async def close(self, token_id: str, generation: int, claimant: str,
                    reports: list[Report], secret: str | None = None) -> Any:
        return await self._ending("close", token_id, reports, secret,
                                  (token_id, generation, claimant))

    async def merge(self, token_id: str, generation: int, claimant: str, other_id: str,
                    other_generation: int, reports: list[Report],
                    secret: str | None = None) -> Any:
        return await self._ending("merge", other_id, reports, secret,
                                  (token_id, generation, claimant, other_id, other_generation))

    async def merge_back(self, token_id: str, generation: int, claimant: str, parent_id: str,
                         reports: list[Report], secret: str | None = None) -> Any:
        return await self._ending("merge_back", token_id, reports, secret,
                                  (token_id, generation, claimant, parent_id))

    async def _ending(self, method: str, ending: str, reports: list[Report], secret: str | None,
                      args: tuple[Any, ...]) -> Any:
        """A token's leases end with the call: make it with the broker's totals of the token's
        leases as the process's final totals leave them; once the executor accepted it, apply
        those, settle the broker's leases of the token as final and report them.

        The executor checks the caller's claim on the token: a call it refuses changes nothing
        here either (any process may name any token). One whose answer was lost applies only
        the caller's own final totals: the token's leases here end once a renewal shows that
        the executor ended them."""
        core, _ = await self._ready(method)
        try:
            reports = _checked_ending(method, args, reports)
        except QuotaError as exc:
            return exc
        if (refused := _refused(reports, secret)) is not None:
            return refused
        upstream = core.ending_totals(ending, reports)
        try:
            answer = await rpc.call_async(method, *args, upstream, identity.SECRET)
        except ExecutorUnavailableError as exc:
            # The answer was lost: the call may have ended the token, or been refused (any
            # process may name any token). Only the caller's own final totals apply; the
            # token's leases end here once a renewal shows the executor ended them.
            if core.settle(reports, time.monotonic()):
                self._send_now({ending})
            return exc
        except QuotaError as exc:
            return exc
        core.settle(reports, time.monotonic())
        after = [report for report in core.release(ending) if report not in upstream]
        if after:
            rpc.send("settle", after, identity.SECRET)
        return answer

    # --------------------------------------------------------------------------- inspection

    async def stats(self) -> dict[str, int]:
        """Calls served, requests served on the node or passed on, and leases, for tests."""
        core = self._core
        counts = dict(self.counts)
        if core is not None:
            counts.update(local_grants=core.local_grants, forwarded=core.forwarded,
                          expiries=core.expiries, sub_leases=core.sub_leases(),
                          upstream_leases=core.upstream_leases())
        return counts

    async def node_id(self) -> str:
        return self._node_id

    # ---------------------------------------------------------------------------- internals

    async def _ready(self, method: str) -> tuple[BrokerCore, ExecutorInfo]:
        """Count the call; on the first, learn the executor's settings and start the loops.
        (Ray runs ``__init__`` outside the actor's event loop.)"""
        self.counts[method] = self.counts.get(method, 0) + 1
        if self._core is None or self._info is None:
            if self._started is None:
                self._started = asyncio.Lock()
            async with self._started:
                if self._core is None:
                    self._info = await rpc.call_async("info")
                    self._core = BrokerCore(holder=identity.HOLDER,
                                            ttl_s=self._info.lease_ttl_s)
                    loop = asyncio.get_running_loop()
                    self._tasks = [loop.create_task(self._renew_loop()),
                                   loop.create_task(self._watch_loop())]
        assert self._core is not None and self._info is not None
        return self._core, self._info

    def _send_now(self, token_ids: set[str]) -> None:
        """Overuse or spare given back under contention: tell the executor without waiting."""
        assert self._core is not None
        reports = [report for token_id in token_ids for report in self._core.report_of(token_id)]
        if reports:
            rpc.send("settle", reports, identity.SECRET)

    async def _renew_loop(self) -> None:
        """Once per interval: expire silent sub-leases, then renew the node's leases upstream."""
        assert self._core is not None
        core = self._core
        while True:
            await asyncio.sleep(RENEW_INTERVAL_S)
            now = time.monotonic()
            core.expire(now)
            reports = core.upstream_reports(now)
            observed = _observe.ACCUMULATOR.drain()
            if not reports and observed is None:
                continue
            sent_at = time.monotonic()
            try:
                alive = await rpc.call_async("renew", identity.HOLDER, reports, observed,
                                             identity.SECRET)
            except Exception:  # noqa: BLE001 - a missed renewal only shortens trust
                _observe.ACCUMULATOR.restore(observed)
                continue
            core.upstream_renewed(reports, alive, sent_at)

    async def _watch_loop(self) -> None:
        """Keep one recall watch open at the executor for the whole node, and pass recalls on."""
        assert self._core is not None
        core = self._core
        while True:
            try:
                recalled = await rpc.call_async("watch", identity.HOLDER, WATCH_TIMEOUT_S,
                                                identity.SECRET)
            except Exception:  # noqa: BLE001 - no executor right now; renewals still shrink
                await asyncio.sleep(RENEW_INTERVAL_S)
                continue
            if recalled:
                reports, tell = core.recall(recalled)
                if reports:
                    rpc.send("settle", reports, identity.SECRET)
                for holder, token_ids in tell.items():
                    self._board.post(holder, token_ids)


def _refused(reports: object, secret: object, *holders: object,
             keys: tuple[object, ...] = ()) -> QuotaError | None:
    """The error to answer, before anything changes, if a process's call names a holder, lease
    ``keys`` or reports of leases that ``secret`` does not prove (or names them wrongly)."""
    try:
        for holder in holders:
            check_holder(check_id("holder", holder), secret)
        named = [check_id("key", key) for key in keys]
        check_keys(named + [report.key for report in check_reports(reports)], secret)
    except QuotaError as exc:
        return exc
    return None
def _checked_ending(method: str, args: tuple[Any, ...], reports: object) -> list[Report]:
    """The fields of a token call that ends the token's leases (close, merge, merge_back),
    checked before the broker applies its reports."""
    check_token_call(*args[:3])
    if method == "merge":
        check_id("other_id", args[3])
        check_generation(args[4])
    elif method == "merge_back":
        check_id("parent_id", args[3])
    return check_reports(reports)


def _terms(info: ExecutorInfo, resource: str | None) -> Terms | None:
    """How the executor's ``resource`` (named in its grant) is leased, if the broker knows it."""
    spec = info.resources.get(resource) if resource is not None else None
    if spec is None:
        return None
    return Terms(spec.name, spec.kind, prefetch_cap(spec), spec.overuse_cap)


def _ended() -> LeaseEndedError:
    return LeaseEndedError("this lease ended at the node's broker; ask under a new lease key")
