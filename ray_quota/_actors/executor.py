"""The executor: a plain async class that hosts the scheduler; one factory makes it a Ray actor.

Every method answers with a value or with a :class:`QuotaError` *returned*, not raised, so errors
cross Ray as themselves and the client raises them (see ``_runtime.rpc.ask``). Waiting happens on
futures inside the actor: a blocked reservation never delays commits, renewals or other callers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import time
from collections import Counter
from typing import Any

from ray_quota._errors import IncompatibleTokensError, ManifestError, QuotaError
from ray_quota._manifest import Manifest, load_manifest
from ray_quota._observability.observe import Batch
from ray_quota._core.protocol import (
    ExecutorInfo,
    IDLE_TICK_S,
    Adoption,
    Grant,
    LeaseAnswer,
    Renewed,
    Report,
    TokenInfo,
    holder_of,
)
from ray_quota._core.scheduler import Policy, ResourceStatus, Scheduler
from ray_quota._spec import Environment, ResourceSpec
from ray_quota._store import StateStore



class Executor:
    """Hosts one environment's :class:`Scheduler`; methods are coroutines run on the actor's loop."""

    def __init__(self, manifest: dict[str, Any], environment: str, policy: Policy = Policy(),
                 cluster_id: str | None = None, state_path: str | None = None,
                 metrics_port: int | None = None, brokers: bool = False) -> None:
        self._brokers = brokers
        self._manifest = load_manifest(manifest)
        self._environment = environment
        resources = self._manifest.environment(environment).resources
        self._sched = Scheduler(resources, clock=time.monotonic, policy=policy)
        self._state_is_default = state_path is None
        self._store = StateStore(state_path or default_state_path())
        saved = self._store.load()
        if saved is not None and saved.environment == environment:
            # Restarted by Ray (or started again on the same state): carry on where it stopped.
            self._cluster_id = saved.cluster_id
            self._sched.restore(saved.resources, saved.tokens, saved.leases,
                                elapsed_s=time.time() - saved.saved_at)
            self._manifest = _with_environment(self._manifest, environment, self._sched.specs())
        else:
            self._cluster_id = cluster_id or secrets.token_hex(8)
            self._store.start(self._cluster_id, environment)
        self._store.write(self._sched.drain_changes())
        self._futures: dict[int, asyncio.Future[tuple[Grant | QuotaError, float]]] = {}
        self._kick: asyncio.Event | None = None
        self._board = RecallBoard()
        self.calls = 0  # grants, renewals and adoptions served, for tests of the local path
        self.counts: Counter[str] = Counter()  # every token and lease call, by method
        from ray_quota._observability.metrics import ExecutorMetrics  # here: only the actor needs it

        self._metrics = ExecutorMetrics(lambda: self._sched, environment, self._cluster_id,
                                        metrics_port, calls=lambda: self.counts)

    # ---------------------------------------------------------------------------- identity

    async def info(self) -> ExecutorInfo:
        return ExecutorInfo(self._cluster_id, self._environment, self._sched.specs(),
                            self._sched.policy.lease_ttl_s, self._metrics.address, self._brokers)

    async def manifest(self) -> tuple[dict[str, Any], str]:
        return self._manifest.to_dict(), self._environment

    # ------------------------------------------------------------------------------ tokens

    async def open_token(self, resource: str, expected_use: int, claimant: str,
                         label: str | None) -> TokenInfo | QuotaError:
        self.counts["open_token"] += 1
        return self._guard(self._sched.open_token, resource, expected_use, claimant=claimant,
                           label=label)

    async def split(self, token_id: str, generation: int, claimant: str,
                    child_expected_use: int) -> tuple[TokenInfo, int] | QuotaError:
        """Split a child off; also answers the parent's expected use left."""
        self.counts["split"] += 1
        child = self._guard(self._sched.split, token_id, generation, claimant,
                            child_expected_use)
        if isinstance(child, QuotaError):
            return child
        return child, self._sched.describe(token_id, generation, claimant)[0]

    async def merge(self, token_id: str, generation: int, claimant: str, other_id: str,
                    other_generation: int, reports: list[Report]) -> None | QuotaError:
        self.counts["merge"] += 1
        if other_id == token_id:
            return IncompatibleTokensError("a token cannot be merged with itself")
        self._settle(reports)
        return self._guard(self._sched.merge, token_id, generation, claimant, other_id,
                           other_generation)

    async def merge_back(self, token_id: str, generation: int, claimant: str, parent_id: str,
                         reports: list[Report]) -> bool | QuotaError:
        self.counts["merge_back"] += 1
        self._settle(reports)
        return self._guard(self._sched.merge_back, token_id, generation, claimant, parent_id)

    async def describe(self, token_id: str, generation: int,
                       claimant: str) -> tuple[int, float] | QuotaError:
        self.counts["describe"] += 1
        return self._guard(self._sched.describe, token_id, generation, claimant)

    async def close(self, token_id: str, generation: int, claimant: str,
                    reports: list[Report]) -> None | QuotaError:
        self.counts["close"] += 1
        self._settle(reports)
        return self._guard(self._sched.close_token, token_id, generation, claimant)

    # ------------------------------------------------------------------------------ leases

    async def acquire(self, token_id: str, generation: int, claimant: str, holder: str,
                      amount: int, prefetch: int, timeout: float | None) -> Grant | QuotaError:
        """Grant ``amount`` (plus prefetch) into ``holder``'s lease, waiting as the resource says."""
        self.counts["acquire"] += 1
        self.calls += 1
        self._ensure_ticker()
        arrived = time.monotonic()
        try:
            ticket = self._sched.acquire(token_id, generation, claimant, holder, amount,
                                         prefetch=prefetch, timeout=timeout)
        except QuotaError as exc:
            return exc
        outcome = ticket.outcome
        waited = outcome is None
        if outcome is None:
            future = asyncio.get_running_loop().create_future()
            self._futures[ticket.id] = future
            assert self._kick is not None
            self._kick.set()  # the next wake-up may now be sooner
            try:
                outcome, resolved_at = await future
            except asyncio.CancelledError:
                self._sched.cancel(ticket)
                raise
            if isinstance(outcome, Grant):
                outcome = dataclasses.replace(outcome, waited_s=resolved_at - arrived)
        self._pump()
        self._metrics.acquired(token_id, outcome, time.monotonic() - arrived, waited)
        return outcome

    async def settle(self, reports: list[Report]) -> None:
        """Apply lease totals without renewing (overuse, recalls, handles that went away)."""
        self.counts["settle"] += 1
        self._settle(reports)

    async def renew(self, holder: str, reports: list[Report],
                    observed: Batch | None = None) -> Renewed:
        """Apply a holder's lease totals and extend its leases.

        Returns, per live lease (token id, key), whether others wait and for how long it may be
        trusted; a lease missing from the answer has expired and its holder must start a new
        one. ``observed`` is what the holder's reservations observed since its last renewal,
        for the metrics.
        """
        self.counts["renew"] += 1
        self.calls += 1
        self._ensure_ticker()
        self._metrics.renewed(observed)
        self._settle(reports)
        alive = {}
        ttl = self._sched.policy.lease_ttl_s
        for report in reports:
            if report.final:
                continue
            if (contended := self._sched.renew_lease(report.token_id, report.key)) is not None:
                alive[(report.token_id, report.key)] = LeaseAnswer(contended, ttl)
        return alive

    async def adopt(self, entries: list[Adoption]) -> list[tuple[str, str]] | QuotaError:
        """Processes whose broker failed take over the units it re-leased to them: each entry
        moves a process's share of the broker's lease into a lease of its own (see
        :meth:`Scheduler.adopt`). Returns the (token id, key) of the leases now held directly."""
        self.counts["adopt"] += 1
        self.calls += 1
        adopted = []
        for token_id, from_key, to_key, units, returned, used, debt in entries:
            ok = self._guard(self._sched.adopt, token_id, from_key, to_key, units, returned, used,
                             debt)
            if ok is True:
                adopted.append((token_id, to_key))
        return adopted

    async def watch(self, holder: str, timeout_s: float) -> list[str]:
        """Wait until others queue on a resource the holder leases; return those token ids.

        Each process keeps one of these calls open, so a recall reaches it at once instead of at
        its next renewal. Returns an empty list after ``timeout_s``.
        """
        self.counts["watch"] += 1
        return await self._board.wait(holder, timeout_s)

    # ------------------------------------------------------------------------------ limits

    async def status(self) -> list[ResourceStatus]:
        return self._sched.status()

    async def set_limit(self, spec: ResourceSpec) -> None | QuotaError:
        result = self._guard(self._sched.set_limit, spec)
        self._pump()
        return result

    async def apply(self, manifest: dict[str, Any], environment: str) -> list[str] | QuotaError:
        """Apply a changed manifest: changed limits take effect, the resource set must not change."""
        if environment != self._environment:
            return ManifestError(f"the executor runs environment {self._environment!r}, "
                                 f"not {environment!r}")
        try:
            new = load_manifest(manifest).environment(environment).resources
        except ManifestError as exc:
            return exc
        old = self._sched.specs()
        if set(new) != set(old):
            return ManifestError(
                f"apply cannot add or remove resources (running: {sorted(old)}, "
                f"new: {sorted(new)}); restart the executor for that")
        changed = {name: spec for name, spec in new.items() if spec != old[name]}
        for name, spec in changed.items():  # all checked before any is applied
            if spec.kind is not old[name].kind:
                return ManifestError(f"{name}: cannot change a {old[name].kind.value} resource "
                                     f"into {spec.kind.value}")
        changes = [_describe_change(old[name], spec) for name, spec in changed.items()]
        for spec in changed.values():
            self._sched.set_limit(spec)
        self._manifest = _with_environment(self._manifest, environment, new)
        self._pump()
        return changes

    async def calls_served(self) -> int:
        return self.calls

    async def call_counts(self) -> dict[str, int]:
        """Token and lease calls served since the executor started, by method."""
        return dict(self.counts)

    async def forget_state(self) -> None:
        """Before a deliberate stop: delete the state file if it is the session's default one."""
        self._store.close(delete=self._state_is_default)

    # ---------------------------------------------------------------------------- internals

    def _guard(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except QuotaError as exc:
            return exc
        finally:
            self._pump()

    def _settle(self, reports: list[Report]) -> None:
        for token_id, key, returned, used, debt, final in reports:
            self._sched.settle(token_id, key, returned, used, debt, final=final)
        self._pump()

    def _pump(self) -> None:
        """Save what changed, then hand every resolved ticket to its caller and every recall to
        its holder's watcher: nothing is acknowledged before it is on disk."""
        tickets = self._sched.poll()
        changes = self._sched.drain_changes()
        if changes:
            self._store.write(changes)
        for ticket in tickets:
            future = self._futures.pop(ticket.id, None)
            if future is not None and not future.done() and ticket.outcome is not None:
                future.set_result((ticket.outcome, time.monotonic()))
        for key, token_ids in self._sched.take_recalls().items():
            self._board.post(holder_of(key), token_ids)

    def _ensure_ticker(self) -> None:
        # Started from the first call: Ray runs __init__ outside the actor's event loop.
        if self._kick is None:
            self._kick = asyncio.Event()
            self._ticker_task = asyncio.get_running_loop().create_task(self._ticker())

    async def _ticker(self) -> None:
        """Wake for refills, wait limits and lease expiries, which no call announces."""
        assert self._kick is not None
        while True:
            wake = self._sched.next_wakeup()
            delay = IDLE_TICK_S if wake is None else min(IDLE_TICK_S,
                                                          max(0.0, wake - time.monotonic()))
            try:
                await asyncio.wait_for(self._kick.wait(), timeout=delay)
            except TimeoutError:
                pass
            self._kick.clear()
            self._pump()


class RecallBoard:
    """Recalls waiting for their holders: each holder keeps one ``wait`` call open."""

    def __init__(self) -> None:
        self._watchers: dict[str, asyncio.Future[list[str]]] = {}
        self._posted: dict[str, set[str]] = {}

    def post(self, holder: str, token_ids: set[str]) -> None:
        """Tell ``holder`` that others wait for these tokens' resources."""
        watcher = self._watchers.pop(holder, None)
        if watcher is not None and not watcher.done():
            watcher.set_result(sorted(token_ids))
        else:
            self._posted.setdefault(holder, set()).update(token_ids)

    async def wait(self, holder: str, timeout_s: float) -> list[str]:
        """The token ids recalled from ``holder``, at once if any are posted, else when one is;
        an empty list after ``timeout_s``."""
        if holder in self._posted:
            return sorted(self._posted.pop(holder))
        previous = self._watchers.pop(holder, None)
        if previous is not None and not previous.done():
            previous.set_result([])
        future = asyncio.get_running_loop().create_future()
        self._watchers[holder] = future
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            return []
        finally:
            if self._watchers.get(holder) is future:
                del self._watchers[holder]


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


def _describe_change(old: ResourceSpec, new: ResourceSpec) -> str:
    """``llm-tokens: value 60000 -> 30000, burst 2000 -> 1000``: only the fields that changed."""
    fields = [f"{field} {_plain(getattr(old, field))} -> {_plain(getattr(new, field))}"
              for field in ResourceSpec.__dataclass_fields__
              if getattr(old, field) != getattr(new, field)]
    return f"{new.name}: " + ", ".join(fields)


def _plain(value: object) -> object:
    return getattr(value, "value", value)  # enums by their manifest word


def _with_environment(manifest: Manifest, environment: str,
                      resources: dict[str, ResourceSpec]) -> Manifest:
    envs = dict(manifest.environments)
    envs[environment] = Environment(environment, dict(resources))
    return Manifest(envs, manifest.source)
