"""The executor actor: asyncio, the store and metrics around :class:`ExecutorService`.

A plain async class; one factory (``_api.init``) makes it a named Ray actor. Every decision is the
service's: this shell routes each call to it, then does what the call set in motion, in order:
write the changes to the store, resolve the futures of waiting acquires, post recalls to the
holders' watches. Nothing is acknowledged before it is on disk.

Every method answers with a value or with a :class:`QuotaError` *returned*, not raised, so errors
cross Ray as themselves and the client raises them (see ``_runtime.rpc.ask``). Waiting happens on
futures inside the actor: a blocked reservation never delays commits, renewals or other callers.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from typing import Any

from ray_quota._actors.recall_board import RecallBoard
from ray_quota._core.protocol import (
    Adoption,
    ExecutorInfo,
    Grant,
    Renewed,
    Report,
    TokenInfo,
)
from ray_quota._core.scheduler import Changes, Policy, ResourceStatus
from ray_quota._core.service import ExecutorService
from ray_quota._errors import ManifestError, QuotaError
from ray_quota._manifest import load_manifest
from ray_quota._observability.observe import Batch
from ray_quota._spec import ResourceSpec
from ray_quota._store import StateStore


class ExecutorActor:
    """Hosts one environment's :class:`ExecutorService`; methods are coroutines run on the
    actor's loop, one at a time between awaits."""

    def __init__(self, manifest: dict[str, Any], environment: str, policy: Policy = Policy(),
                 cluster_id: str | None = None, state_path: str | None = None,
                 metrics_port: int | None = None, brokers: bool = False) -> None:
        self._brokers = brokers
        self._manifest = load_manifest(manifest)
        self._environment = environment
        resources = self._manifest.environment(environment).resources
        self._service = ExecutorService(resources, clock=time.monotonic, policy=policy)
        self._state_is_default = state_path is None
        self._store = StateStore(state_path or default_state_path())
        saved = self._store.load()
        if saved is not None and saved.environment == environment:
            # Restarted by Ray (or started again on the same state): carry on where it stopped.
            self._cluster_id = saved.cluster_id
            specs = self._service.restore(saved.resources, saved.tokens, saved.leases,
                                          elapsed_s=time.time() - saved.saved_at,
                                          ended=saved.ended)
            self._manifest = self._manifest.with_environment(environment, specs)
        else:
            self._cluster_id = cluster_id or secrets.token_hex(8)
            self._store.start(self._cluster_id, environment)
        self._futures: dict[int, asyncio.Future[Grant | QuotaError]] = {}
        self._kick: asyncio.Event | None = None
        self._board = RecallBoard()
        if not self._deliver():
            # Nothing changed (a restore): the write still records when the state was last good.
            self._store.write(Changes([], [], [], [], []))
        from ray_quota._observability.metrics import (
            ExecutorMetrics,  # here: only the actor needs it
        )

        self._metrics = ExecutorMetrics(lambda: self._service.scheduler, environment,
                                        self._cluster_id, metrics_port,
                                        calls=lambda: self._service.counts)

    @property
    def calls(self) -> int:
        """Grants, renewals and adoptions served, for tests of the local path."""
        return self._service.calls

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
        ticket = self._service.acquire(token_id, generation, claimant, key, amount,
                                       prefetch, timeout, secret)
        if isinstance(ticket, QuotaError):
            return self._answer(ticket)
        waited = ticket.outcome is None
        if ticket.outcome is None:
            future = asyncio.get_running_loop().create_future()
            self._futures[ticket.id] = future
            assert self._kick is not None
            self._kick.set()  # the next wake-up may now be sooner
            self._deliver()  # which may already resolve it
            try:
                outcome = await future
            except asyncio.CancelledError:
                self._futures.pop(ticket.id, None)
                self._service.cancel(ticket.id)
                raise
            self._service.tick()  # woken: look again, as a call does
        else:
            outcome = ticket.outcome
        self._deliver()
        self._metrics.acquired(token_id, outcome, time.monotonic() - arrived, waited)
        return outcome

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
        return self._answer(self._service.set_limit(spec))

    async def apply(self, manifest: dict[str, Any], environment: str) -> list[str] | QuotaError:
        """Apply a changed manifest: changed limits take effect, the resource set must not change."""
        if environment != self._environment:
            return ManifestError(f"the executor runs environment {self._environment!r}, "
                                 f"not {environment!r}")
        try:
            new = load_manifest(manifest).environment(environment).resources
        except ManifestError as exc:
            return exc
        changes = self._answer(self._service.apply(new))
        if not isinstance(changes, QuotaError):
            self._manifest = self._manifest.with_environment(environment, new)
        return changes

    async def calls_served(self) -> int:
        return self._service.calls

    async def call_counts(self) -> dict[str, int]:
        """Token and lease calls served since the executor started, by method."""
        return dict(self._service.counts)

    async def forget_state(self) -> None:
        """Before a deliberate stop: delete the state file if it is the session's default one."""
        self._store.close(delete=self._state_is_default)

    # ---------------------------------------------------------------------------- internals

    def _answer(self, answer: Any) -> Any:
        """A call's answer, once what the call set in motion is done."""
        self._deliver()
        return answer

    def _deliver(self) -> bool:
        """Write what changed, then hand every resolved ticket to its caller and every recall to
        its holder's watcher: nothing is acknowledged before it is on disk. Returns whether
        anything was written."""
        outbox = self._service.drain()
        for changes in outbox.changes:
            self._store.write(changes)
        for resolved in outbox.resolved:
            future = self._futures.pop(resolved.ticket, None)
            if future is not None and not future.done():
                future.set_result(resolved.outcome)
        for recall in outbox.recalls:
            self._board.post(recall.holder, recall.token_ids)
        return bool(outbox.changes)

    def _ensure_ticker(self) -> None:
        # Started from the first call: Ray runs __init__ outside the actor's event loop.
        if self._kick is None:
            self._kick = asyncio.Event()
            self._ticker_task = asyncio.get_running_loop().create_task(self._ticker())

    async def _ticker(self) -> None:
        """Wake for refills, wait limits and lease expiries, which no call announces."""
        assert self._kick is not None
        while True:
            delay = max(0.0, self._service.next_wakeup() - time.monotonic())
            try:
                await asyncio.wait_for(self._kick.wait(), timeout=delay)
            except TimeoutError:
                pass
            self._kick.clear()
            self._service.tick()
            self._deliver()


def default_state_path() -> str:
    """The state file of this Ray session: a new cluster starts with a clean slate."""
    import tempfile

    try:
        import ray

        node = ray._private.worker._global_node  # noqa: SLF001 - no public accessor
        session_dir = node.get_session_dir_path()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - not in a Ray worker: a local file will do
        session_dir = os.path.join(tempfile.gettempdir(), "ray_quota")
    return os.path.join(session_dir, "ray_quota_state.sqlite")
