"""The executor: a plain async class that hosts the scheduler; one factory makes it a Ray actor.

Every method answers with a value or with a :class:`QuotaError` *returned*, not raised, so errors
cross Ray as themselves and the client raises them (see ``_client.call``). Waiting happens on
futures inside the actor: a blocked reservation never delays commits, renewals or other callers.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import Any

from ray_quota._errors import IncompatibleTokensError, ManifestError, QuotaError
from ray_quota._manifest import Manifest, load_manifest
from ray_quota._scheduler import Grant, Policy, ResourceStatus, Scheduler, TokenInfo
from ray_quota._spec import Environment, ResourceSpec

NAMESPACE = "ray_quota"
EXECUTOR_NAME = "ray_quota_executor"
_IDLE_TICK_S = 0.5  # how often the loop looks for expired leases when nothing is due sooner

Report = tuple[str, int, int, int]  # token id, units given back, units used, debt


@dataclass(frozen=True, slots=True)
class ExecutorInfo:
    """Who the running executor is and what it enforces."""

    cluster_id: str
    environment: str
    resources: dict[str, ResourceSpec]
    lease_ttl_s: float


class Executor:
    """Hosts one environment's :class:`Scheduler`; methods are coroutines run on the actor's loop."""

    def __init__(self, manifest: dict[str, Any], environment: str, policy: Policy = Policy(),
                 cluster_id: str | None = None) -> None:
        self._manifest = load_manifest(manifest)
        self._environment = environment
        resources = self._manifest.environment(environment).resources
        self._sched = Scheduler(resources, clock=time.monotonic, policy=policy)
        self._cluster_id = cluster_id or secrets.token_hex(8)
        self._futures: dict[int, asyncio.Future[Grant | QuotaError]] = {}
        self._kick: asyncio.Event | None = None
        self._watchers: dict[str, asyncio.Future[list[str]]] = {}
        self._recalls: dict[str, set[str]] = {}
        self.calls = 0  # executor calls served, for tests and benchmarks of the local path

    # ---------------------------------------------------------------------------- identity

    async def info(self) -> ExecutorInfo:
        return ExecutorInfo(self._cluster_id, self._environment, self._sched.specs(),
                            self._sched.policy.lease_ttl_s)

    async def manifest(self) -> tuple[dict[str, Any], str]:
        return self._manifest.to_dict(), self._environment

    # ------------------------------------------------------------------------------ tokens

    async def open_token(self, resource: str, expected_use: int, claimant: str,
                         label: str | None) -> TokenInfo | QuotaError:
        return self._guard(self._sched.open_token, resource, expected_use, claimant=claimant,
                           label=label)

    async def split(self, token_id: str, generation: int, claimant: str,
                    child_expected_use: int) -> tuple[TokenInfo, int] | QuotaError:
        """Split a child off; also answers the parent's expected use left."""
        child = self._guard(self._sched.split, token_id, generation, claimant,
                            child_expected_use)
        if isinstance(child, QuotaError):
            return child
        return child, self._sched.describe(token_id, generation, claimant)[0]

    async def merge(self, token_id: str, generation: int, claimant: str, holder: str,
                    other_id: str, other_generation: int,
                    reports: list[Report]) -> None | QuotaError:
        if other_id == token_id:
            return IncompatibleTokensError("a token cannot be merged with itself")
        self._settle(holder, reports)
        return self._guard(self._sched.merge, token_id, generation, claimant, other_id,
                           other_generation)

    async def merge_back(self, token_id: str, generation: int, claimant: str, holder: str,
                         parent_id: str, reports: list[Report]) -> bool | QuotaError:
        self._settle(holder, reports)
        return self._guard(self._sched.merge_back, token_id, generation, claimant, parent_id)

    async def describe(self, token_id: str, generation: int,
                       claimant: str) -> tuple[int, float] | QuotaError:
        return self._guard(self._sched.describe, token_id, generation, claimant)

    async def close(self, token_id: str, generation: int, claimant: str, holder: str,
                    reports: list[Report]) -> None | QuotaError:
        self._settle(holder, reports)
        return self._guard(self._sched.close_token, token_id, generation, claimant)

    # ------------------------------------------------------------------------------ leases

    async def acquire(self, token_id: str, generation: int, claimant: str, holder: str,
                      amount: int, prefetch: int, timeout: float | None) -> Grant | QuotaError:
        """Grant ``amount`` (plus prefetch) into ``holder``'s lease, waiting as the resource says."""
        self.calls += 1
        self._ensure_ticker()
        try:
            ticket = self._sched.acquire(token_id, generation, claimant, holder, amount,
                                         prefetch=prefetch, timeout=timeout)
        except QuotaError as exc:
            return exc
        outcome = ticket.outcome
        if outcome is None:
            future = asyncio.get_running_loop().create_future()
            self._futures[ticket.id] = future
            assert self._kick is not None
            self._kick.set()  # the next wake-up may now be sooner
            try:
                outcome = await future
            except asyncio.CancelledError:
                self._sched.cancel(ticket)
                raise
        self._pump()
        return outcome

    async def settle(self, holder: str, reports: list[Report]) -> None:
        """Settle a holder's reports without renewing (a handle that moved or was dropped)."""
        self._settle(holder, reports)

    async def renew(self, holder: str, reports: list[Report]) -> dict[str, bool]:
        """Settle the holder's reports, extend its leases, say which tokens are contended."""
        self.calls += 1
        self._ensure_ticker()
        self._settle(holder, reports)
        return self._sched.renew(holder)

    async def watch(self, holder: str, timeout_s: float) -> list[str]:
        """Wait until others queue on a resource the holder leases; return those token ids.

        Each process keeps one of these calls open, so a recall reaches it at once instead of at
        its next renewal. Returns an empty list after ``timeout_s``.
        """
        if holder in self._recalls:
            return sorted(self._recalls.pop(holder))
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

    # ------------------------------------------------------------------------------ limits

    async def status(self) -> list[ResourceStatus]:
        return self._sched.status()

    async def set_limit(self, spec: ResourceSpec) -> None | QuotaError:
        result = self._guard(self._sched.set_limit, spec)
        self._pump()
        return result

    async def apply(self, manifest: dict[str, Any], environment: str) -> list[str] | QuotaError:
        """Apply a changed manifest: changed limits take effect, the resource set must not change."""
        try:
            new = load_manifest(manifest).environment(environment).resources
        except ManifestError as exc:
            return exc
        old = self._sched.specs()
        if set(new) != set(old):
            return ManifestError(
                f"apply cannot add or remove resources (running: {sorted(old)}, "
                f"new: {sorted(new)}); restart the executor for that")
        changes = [f"{name}: {old[name]} -> {spec}" for name, spec in new.items()
                   if spec != old[name]]
        for name, spec in new.items():
            if spec != old[name]:
                error = self._guard(self._sched.set_limit, spec)
                if isinstance(error, QuotaError):
                    return error
        self._manifest = _with_environment(self._manifest, environment, new)
        self._pump()
        return changes

    async def calls_served(self) -> int:
        return self.calls

    # ---------------------------------------------------------------------------- internals

    def _guard(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except QuotaError as exc:
            return exc
        finally:
            self._pump()

    def _settle(self, holder: str, reports: list[Report]) -> None:
        for token_id, give_back, used, debt in reports:
            self._sched.give_back(token_id, holder, give_back, used=used, debt=debt)
        self._pump()

    def _pump(self) -> None:
        """Hand every resolved ticket to its caller, and every recall to its holder's watcher."""
        for ticket in self._sched.poll():
            future = self._futures.pop(ticket.id, None)
            if future is not None and not future.done() and ticket.outcome is not None:
                future.set_result(ticket.outcome)
        for holder, token_ids in self._sched.take_recalls().items():
            watcher = self._watchers.pop(holder, None)
            if watcher is not None and not watcher.done():
                watcher.set_result(sorted(token_ids))
            else:
                self._recalls.setdefault(holder, set()).update(token_ids)

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
            delay = _IDLE_TICK_S if wake is None else min(_IDLE_TICK_S,
                                                          max(0.0, wake - time.monotonic()))
            try:
                await asyncio.wait_for(self._kick.wait(), timeout=delay)
            except TimeoutError:
                pass
            self._kick.clear()
            self._pump()


def _with_environment(manifest: Manifest, environment: str,
                      resources: dict[str, ResourceSpec]) -> Manifest:
    envs = dict(manifest.environments)
    envs[environment] = Environment(environment, dict(resources))
    return Manifest(envs, manifest.source)
