"""Starting, finding, changing and stopping the executor."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import ray

from ray_quota import _client
from ray_quota._errors import InvalidAmountError, ManifestError, UnknownResourceError
from ray_quota._executor import EXECUTOR_NAME, NAMESPACE, Executor, ExecutorInfo
from ray_quota._manifest import load_manifest
from ray_quota._scheduler import MAX_UNITS, Policy, ResourceStatus


def init(manifest: str | os.PathLike[str] | Mapping[str, Any] | None = None,
         environment: str = "local", *, apply: bool = False, policy: Policy | None = None,
         address: str | None = None) -> ExecutorInfo:
    """Start the cluster's executor, or connect to the one already running.

    Starts a local Ray if none is running (or connects to ``address``). Calling it again with the
    same manifest is harmless; a different manifest is refused unless ``apply=True``, which
    changes the running executor's limits.

    Raises:
        ManifestError: the manifest is invalid, names no such environment, or differs from the
            running executor's and ``apply`` was not given.
    """
    plain = None
    if manifest is not None:
        loaded = load_manifest(manifest)
        loaded.environment(environment)  # fail here, before any actor starts
        plain = loaded.to_dict()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    _client.reset()
    try:
        handle = ray.get_actor(EXECUTOR_NAME, namespace=NAMESPACE)
    except ValueError:
        if plain is None:
            raise ManifestError("no executor is running: pass a manifest to start one") from None
        actor = ray.remote(Executor).options(
            name=EXECUTOR_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
            max_restarts=-1, max_concurrency=10_000, num_cpus=0)
        handle = actor.remote(plain, environment, policy or Policy())
    if plain is not None:
        running, running_env = ray.get(handle.manifest.remote())
        if (running, running_env) != (plain, environment):
            if not apply:
                raise ManifestError(
                    "an executor is already running with another manifest or environment "
                    f"({running_env!r}); pass apply=True to change its limits")
            _client.call("apply", plain, environment)
    return _client.info()


def apply(manifest: str | os.PathLike[str] | Mapping[str, Any],
          environment: str = "local") -> list[str]:
    """Apply a changed manifest to the running executor; returns one line per changed resource.

    Limits change for running tasks within one renewal interval; spent budget is never refilled.

    Raises:
        ManifestError: the manifest is invalid, or adds or removes resources.
        NotInitializedError: no executor is running.
    """
    loaded = load_manifest(manifest)
    loaded.environment(environment)
    changes: list[str] = _client.call("apply", loaded.to_dict(), environment)
    _client.reset()
    return changes


def shutdown() -> None:
    """Stop the executor; live tokens stop working."""
    if not ray.is_initialized():
        return
    try:
        ray.kill(ray.get_actor(EXECUTOR_NAME, namespace=NAMESPACE), no_restart=True)
    except ValueError:
        pass
    _client.reset()


def status() -> list[ResourceStatus]:
    """A snapshot of every resource: limit, available, in use, waiters, tokens, leases."""
    return _client.call("status")


def set_limit(resource: str, value: int) -> None:
    """Change one resource's limit value at run time; spent budget is never refilled.

    Raises:
        UnknownResourceError: no such resource.
        InvalidAmountError: ``value`` is not a whole number from 1.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_UNITS:
        raise InvalidAmountError(f"a limit must be a whole number from 1 to {MAX_UNITS}, "
                                 f"not {value!r}")
    specs = _client.info().resources
    if resource not in specs:
        raise UnknownResourceError(f"no resource {resource!r} (known: {', '.join(sorted(specs))})")
    spec = specs[resource]
    burst = spec.burst
    if spec.kind.value == "rate" and spec.burst == spec.value:
        burst = value  # a burst that defaulted to the value follows it
    _client.call("set_limit", replace(spec, value=value, burst=burst))
    _client.reset()
