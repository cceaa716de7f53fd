"""The executor actor: asyncio, the store and metrics around :class:`ExecutorService`.

A plain async class; one factory (``_api.init``) makes it a named Ray actor. Every decision is the
service's: this shell routes each call to it, then does what the call set in motion, in order:
write the changes to the store, resolve the futures of waiting acquires, post recalls to the
holders' watches. Nothing is acknowledged before it is on disk.

Write first, then change memory: the service decides in memory, but nothing it decided is seen
before the write commits. If the write fails (disk full, database locked), the shell goes back to
the last committed state exactly as a restart would (:meth:`ExecutorActor._recover`): the call
that made the changes, and every acquire still waiting in memory, is answered
:class:`StateWriteError`, and nothing changed. Waiters are failed rather than queued again: their
place in the queue was in the lost memory, and they may ask again at once.

Every method answers with a value or with a :class:`QuotaError` *returned*, not raised, so errors
cross Ray as themselves and the client raises them (see ``_runtime.rpc.ask``). Waiting happens on
futures inside the actor: a blocked reservation never delays commits, renewals or other callers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from typing import Any

import ray

from ray_quota._actors.durable import Marker, Markers, check_expected, default_state_path
from ray_quota._actors.recall_board import RecallBoard
from ray_quota._core.protocol import (
    Adoption,
    ExecutorInfo,
    Grant,
    ProviderSignal,
    Renewed,
    Report,
    TokenInfo,
)
from ray_quota._core.scheduler import Policy, ResourceStatus
from ray_quota._core.service import ExecutorService
from ray_quota._errors import (
    ManifestError,
    ProtocolError,
    QuotaError,
    StateMissingError,
    StateWriteError,
)
from ray_quota._manifest import load_manifest
from ray_quota._observability.observe import Batch
from ray_quota._runtime.packed import BATCHED, check_carried, pack_answer, unpack_call
from ray_quota._spec import ResourceSpec
from ray_quota._store import SavedState, StateStore

logger = logging.getLogger(__name__)
TICKER_PAUSE_S = 0.5  # after a tick failed: a failure that repeats is not retried in a busy loop


class ExecutorActor:
    """Hosts one environment's :class:`ExecutorService`; methods are coroutines run on the
    actor's loop, one at a time between awaits."""

    def __init__(self, manifest: dict[str, Any], environment: str, policy: Policy = Policy(),
                 cluster_id: str | None = None, state_path: str | None = None,
                 metrics_port: int | None = None, brokers: bool = False,
                 ray_metrics: bool | None = None) -> None:
        self._brokers = brokers
        self._manifest = load_manifest(manifest)
        self._environment = environment
        self._policy = policy
        resources = self._manifest.environment(environment).resources
        self._service = ExecutorService(resources, clock=time.monotonic, policy=policy)
        path = state_path or default_state_path(environment)
        self._store = StateStore(path)  # an unreadable file: StateMissingError, nothing starts
        saved = self._store.load()
        markers = Markers()
        marker = markers.get(path)
        check_expected(path, marker, None if saved is None else saved.cluster_id)
        if saved is not None and saved.environment == environment:
            self._cluster_id = saved.cluster_id
            self._service = self._restored(saved)
            if marker is None:
                # A deliberate start (not a Ray restart): the manifest's limits apply, as
                # `apply` would apply them; what was spent stays spent.
                self._service.apply(resources)
                self._manifest = self._manifest.with_environment(environment, resources)
        else:
            self._cluster_id = cluster_id or secrets.token_hex(8)
            self._store.start(self._cluster_id, environment)
        self._futures: dict[int, asyncio.Future[Grant | QuotaError]] = {}
        self._kick: asyncio.Event | None = None
        self._board = RecallBoard()
        # Also when nothing changed (a restore): the write records when the state was last good.
        self._store.write(*self._service.drain().changes)
        markers.put(path, Marker(self._cluster_id, environment))
        from ray_quota._observability.metrics import (
            ExecutorMetrics,  # here: only the actor needs it
        )

        self._metrics = ExecutorMetrics(lambda: self._service.scheduler, environment,
                                        self._cluster_id, metrics_port,
                                        calls=lambda: self._service.counts)
        if ray_metrics is not False:
            from ray_quota._observability.ray_export import RayExport

            RayExport(self._metrics.metrics.registry, only_if_agent=ray_metrics is None).start()

    @property
    def calls(self) -> int:
        """Grants, renewals and adoptions served, for tests of the local path."""
        return self._service.calls

    async def call(self, packed: bytes) -> bytes:
        """Any call below, packed into one argument and answered packed (see
        :mod:`ray_quota._runtime.packed`): how this process's clients call, for speed."""
        try:
            method, args, carried = unpack_call(packed)
        except Exception as exc:  # noqa: BLE001 - a bad call is answered, never raised
            return pack_answer(ProtocolError(f"not a packed executor call: {exc}"))
        if carried:  # queued give-backs of the caller, before its call, as a batch would be
            self._give_back(carried)
        if method not in _CALLS:
            return pack_answer(ProtocolError(f"the executor has no call {method!r}"))
        try:
            answer = await getattr(self, method)(*args)
        except TypeError as exc:  # the wrong arguments (Ray checked them on a direct call)
            answer = ProtocolError(f"bad arguments to the executor's {method}: {exc}")
        return pack_answer(answer)

    # ---------------------------------------------------------------------------- identity

    async def info(self) -> ExecutorInfo:
        return ExecutorInfo(self._cluster_id, self._environment, self._service.specs(),
                            self._service.policy.lease_ttl_s, self._metrics.address,
                            self._brokers)

    async def manifest(self) -> tuple[dict[str, Any], str]:
        return self._manifest.to_dict(), self._environment

    # ------------------------------------------------------------------------------ tokens

    async def open_token(self, resource: str, expected_use: int, claimant: str,
                         label: str | None) -> TokenInfo | QuotaError:
        return self._answer(self._service.open_token(resource, expected_use, claimant, label))

    async def split(self, token_id: str, generation: int, claimant: str,
                    child_expected_use: int) -> tuple[TokenInfo, int] | QuotaError:
        """Split a child off; also answers the parent's expected use left."""
        return self._answer(self._service.split(token_id, generation, claimant,
                                                child_expected_use))

    async def merge(self, token_id: str, generation: int, claimant: str, other_id: str,
                    other_generation: int, reports: list[Report],
                    secret: str | None = None) -> None | QuotaError:
        return self._answer(self._service.merge(token_id, generation, claimant, other_id,
                                                other_generation, reports, secret))

    async def merge_back(self, token_id: str, generation: int, claimant: str, parent_id: str,
                         reports: list[Report], secret: str | None = None) -> bool | QuotaError:
        return self._answer(self._service.merge_back(token_id, generation, claimant, parent_id,
                                                     reports, secret))

    async def describe(self, token_id: str, generation: int,
                       claimant: str) -> tuple[int, float] | QuotaError:
        return self._answer(self._service.describe(token_id, generation, claimant))

    async def close(self, token_id: str, generation: int, claimant: str,
                    reports: list[Report], secret: str | None = None) -> None | QuotaError:
        return self._answer(self._service.close(token_id, generation, claimant, reports,
                                                secret))

    # ------------------------------------------------------------------------------ leases

    async def acquire(self, token_id: str, generation: int, claimant: str, key: str,
                      amount: int, prefetch: int, timeout: float | None,
                      secret: str | None = None) -> Grant | QuotaError:
        """Grant ``amount`` (plus prefetch) into the lease ``key``, waiting as the resource
        says; ``secret`` proves the key's holder."""
        self._ensure_ticker()
        arrived = time.monotonic()
        service = self._service
        ticket = service.acquire(token_id, generation, claimant, key, amount, prefetch,
                                 timeout, secret)
        if isinstance(ticket, QuotaError):
            return self._answer(ticket)
        waited = ticket.outcome is None
        if ticket.outcome is None:
            future = asyncio.get_running_loop().create_future()
            self._futures[ticket.id] = future
            assert self._kick is not None
            self._kick.set()  # the next wake-up may now be sooner
            self._deliver()  # which may already resolve it (or fail it, with the write)
            try:
                outcome = await future
            except asyncio.CancelledError:
                self._futures.pop(ticket.id, None)
                if self._service is service:  # else the ticket went with the state it was in
                    service.cancel(ticket.id)
                raise
            self._service.tick()  # woken: look again, as a call does
            self._deliver()  # others' changes: a failure here is theirs, not this grant's
        else:
            outcome = self._deliver() or ticket.outcome
        self._metrics.acquired(token_id, outcome, time.monotonic() - arrived, waited)
        return outcome

    async def give_back(self, calls: list[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        """Queued give-backs (``close``, ``merge_back``, ``settle``, each with its arguments as
        its own method takes them), applied in order, written once; see
        :mod:`ray_quota._runtime.giveback`. Their senders do not wait: a refusal is logged here,
        and answered too, one per call."""
        self._service.counts["give_back"] += 1  # one call, serving len(calls) operations
        try:
            check_carried(calls)
        except TypeError as exc:  # nothing applied: a bad batch is refused whole
            return [ProtocolError(f"bad give-backs: {exc}")]
        return self._give_back(calls)

    def _give_back(self, calls: list[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        answers: list[Any] = []
        self._service.counts[BATCHED] += len(calls)  # (each counted by method as it runs)
        for method, args in calls:  # (checked by check_carried)
            try:
                answer = getattr(self._service, method)(*args)
            except TypeError as exc:
                answer = ProtocolError(f"bad give-back {method!r}: {exc}")
            if isinstance(answer, QuotaError):
                logger.warning("ray_quota executor: a queued %s was refused: %s", method, answer)
            answers.append(answer)
        failed = self._deliver()
        return answers if failed is None else [failed] * len(calls)

    async def feedback(self, token_id: str, generation: int, claimant: str, key: str,
                       signal: ProviderSignal, secret: str | None = None) -> None | QuotaError:
        """What the provider said of a request reserved under ``key`` (DESIGN 8)."""
        return self._answer(self._service.feedback(token_id, generation, claimant, key, signal,
                                                   secret))

    async def settle(self, reports: list[Report],
                     secret: str | None = None) -> None | QuotaError:
        """Apply lease totals without renewing (overuse, recalls, handles that went away)."""
        return self._answer(self._service.settle(reports, secret))

    async def renew(self, holder: str, reports: list[Report], observed: Batch | None = None,
                    secret: str | None = None) -> Renewed | QuotaError:
        """Apply a holder's lease totals and extend its leases.

        Returns, per live lease (token id, key), whether others wait and for how long it may be
        trusted; a lease missing from the answer has expired and its holder must start a new
        one. ``observed`` is what the holder's reservations observed since its last renewal,
        for the metrics.
        """
        self._ensure_ticker()
        answer = self._service.renew(holder, reports, secret)
        if not isinstance(answer, QuotaError):
            self._metrics.renewed(observed)
        return self._answer(answer)

    async def adopt(self, entries: list[Adoption],
                    secret: str | None = None) -> list[tuple[str, str]] | QuotaError:
        """Processes whose broker failed take over the units it re-leased to them (see
        :meth:`ExecutorService.adopt`). Returns the (token id, key) of the leases now held
        directly."""
        return self._answer(self._service.adopt(entries, secret))

    async def watch(self, holder: str, timeout_s: float,
                    secret: str | None = None) -> list[str] | QuotaError:
        """Wait until others queue on a resource the holder leases; return those token ids.

        Each process keeps one of these calls open, so a recall reaches it at once instead of at
        its next renewal. Returns an empty list after ``timeout_s``. Only the holder itself
        (``secret``) may watch: a recall answered to anyone else would be lost to it.
        """
        refused = self._service.watch(holder, timeout_s, secret)
        if refused is not None:
            return refused
        return await self._board.wait(holder, timeout_s)

    # ------------------------------------------------------------------------------ limits

    async def status(self) -> list[ResourceStatus]:
        return self._service.status()

    async def set_limit(self, spec: ResourceSpec) -> None | QuotaError:
        """Replace one resource's whole definition (see :meth:`change_limit` for its value)."""
        return self._limits_changed(self._answer(self._service.set_limit(spec)))

    async def change_limit(self, resource: str, value: int) -> None | QuotaError:
        """Change only one resource's limit value, on its definition as it is now."""
        return self._limits_changed(self._answer(self._service.change_limit(resource, value)))

    async def reset(self, resources: list[str] | None) -> list[str] | QuotaError:
        """Refill ``resources`` (None: all of them); one line per resource says how much."""
        names = list(self._service.specs()) if resources is None else resources
        return self._answer(self._service.reset(names))

    async def apply(self, manifest: dict[str, Any], environment: str) -> list[str] | QuotaError:
        """Apply a changed manifest: changed limits take effect, the resource set must not change."""
        if environment != self._environment:
            return ManifestError(f"the executor runs environment {self._environment!r}, "
                                 f"not {environment!r}")
        try:
            new = load_manifest(manifest).environment(environment).resources
        except ManifestError as exc:
            return exc
        return self._limits_changed(self._answer(self._service.apply(new)))

    async def calls_served(self) -> int:
        return self._service.calls

    async def call_counts(self) -> dict[str, int]:
        """Token and lease calls served since the executor started, by method."""
        return dict(self._service.counts)

    async def close_state(self) -> None:
        """Before a deliberate stop: close the state file, which keeps every spent budget."""
        self._store.close()

    # ---------------------------------------------------------------------------- internals

    def _answer(self, answer: Any) -> Any:
        """A call's answer, once what the call set in motion is on disk; or the failed write's
        error, and then the call changed nothing."""
        return self._deliver() or answer

    def _limits_changed(self, answer: Any) -> Any:
        """After a limit call: the manifest that :meth:`manifest` answers follows the limits."""
        if not isinstance(answer, QuotaError):
            self._manifest = self._manifest.with_environment(self._environment,
                                                             self._service.specs())
        return answer

    def _deliver(self) -> StateWriteError | None:
        """Write what changed, then hand every resolved ticket to its caller and every recall to
        its holder's watcher: nothing is acknowledged before it is on disk. Returns the error
        if the write failed (then nothing is acknowledged, and memory is as on disk)."""
        outbox = self._service.drain()
        try:
            if outbox.changes:
                self._store.write(*outbox.changes)
        except StateWriteError as exc:
            self._recover(exc)
            return exc
        for resolved in outbox.resolved:
            future = self._futures.pop(resolved.ticket, None)
            if future is not None and not future.done():
                future.set_result(resolved.outcome)
        for recall in outbox.recalls:
            self._board.post(recall.holder, recall.token_ids)
        return None

    def _recover(self, failure: StateWriteError) -> None:
        """A write failed: go back to the last committed state as a restart would, and answer
        every waiting acquire (their tickets lived in the memory given up) with the failure."""
        logger.error("ray_quota executor: %s; back to the last saved state", failure)
        try:
            saved = self._store.load()
        except StateMissingError as exc:
            self._give_up(exc)
            raise
        assert saved is not None  # written when the executor started
        calls, counts = self._service.calls, self._service.counts
        self._service = self._restored(saved)
        self._service.calls, self._service.counts = calls, counts
        self._service.drain()  # the restored state is the one on disk
        dropped = StateWriteError(f"{failure}; this waiting request was dropped, nothing was "
                                  "granted: ask again")
        futures, self._futures = self._futures, {}
        for future in futures.values():
            if not future.done():
                future.set_result(dropped)

    def _give_up(self, failure: StateMissingError) -> None:
        """The file cannot be read back after a failed write: memory holds changes that are not
        on disk, and serving on would let the two part ways. Serve nothing more; inside Ray, end
        the process, so that Ray restarts the executor from the file (or it refuses to start,
        loudly, if the file stays unreadable)."""
        logger.critical("ray_quota executor: %s; stopping so that a restart reads the file",
                        failure)
        self._service = _Stopped(failure)  # type: ignore[assignment]
        if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
            os._exit(70)  # EX_SOFTWARE; Ray restarts the actor (max_restarts=-1)

    def _restored(self, saved: SavedState) -> ExecutorService:
        """A service on this executor's resources that takes up ``saved``; a resource whose
        kind changed since starts afresh (its saved pool, tokens and leases mean nothing now)."""
        resources = self._manifest.environment(self._environment).resources
        service = ExecutorService(resources, clock=time.monotonic, policy=self._policy)
        kept = {r.spec.name for r in saved.resources
                if r.spec.name in resources and r.spec.kind is resources[r.spec.name].kind}
        specs = service.restore([r for r in saved.resources if r.spec.name in kept],
                                [t for t in saved.tokens if t.resource in kept],
                                [lease for lease in saved.leases if lease.resource in kept],
                                elapsed_s=time.time() - saved.saved_at, ended=saved.ended)
        self._manifest = self._manifest.with_environment(self._environment, specs)
        return service

    def _ensure_ticker(self) -> None:
        # Started from the first call: Ray runs __init__ outside the actor's event loop.
        if self._kick is None:
            self._kick = asyncio.Event()
            self._ticker_task = asyncio.get_running_loop().create_task(self._ticker())

    async def _ticker(self) -> None:
        """Wake for refills, wait limits and lease expiries, which no call announces.

        Runs for the executor's life: a tick that fails is logged and the next one comes.
        """
        assert self._kick is not None
        while True:
            try:
                await self._tick_once(self._kick)
            except Exception:  # noqa: BLE001 - the ticker must outlive any one tick
                logger.exception("ray_quota executor: a tick failed; ticking on")
                await asyncio.sleep(TICKER_PAUSE_S)

    async def _tick_once(self, kick: asyncio.Event) -> None:
        delay = max(0.0, self._service.next_wakeup() - time.monotonic())
        try:
            await asyncio.wait_for(kick.wait(), timeout=delay)
        except TimeoutError:
            pass
        kick.clear()
        self._service.tick()
        self._deliver()


# What a packed call may name: the public coroutine methods (not ``call`` itself).
_CALLS = frozenset(name for name, member in vars(ExecutorActor).items()
                   if not name.startswith("_") and name != "call"
                   and asyncio.iscoroutinefunction(member))


class _Stopped:
    """Stands in for the service of an executor that gave up (see
    :meth:`ExecutorActor._give_up`): every call raises why."""

    __slots__ = ("_failure",)

    def __init__(self, failure: StateMissingError) -> None:
        self._failure = failure

    def __getattr__(self, name: str) -> Any:
        raise StateMissingError(f"the executor stopped serving: {self._failure}")
