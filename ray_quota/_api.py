"""Starting, finding, changing and stopping the executor."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import ray
import ray.exceptions
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ray_quota._runtime import rpc
from ray_quota._errors import InvalidAmountError, ManifestError, UnknownResourceError
from ray_quota._actors.executor import ExecutorActor
from ray_quota._core.protocol import EXECUTOR_NAME, NAMESPACE, ExecutorInfo
from ray_quota._manifest import load_manifest
from ray_quota._core.scheduler import Policy, ResourceStatus
from ray_quota._spec import MAX_UNITS

DEFAULT_METRICS_PORT = 9464


def init(manifest: str | os.PathLike[str] | Mapping[str, Any] | None = None,
         environment: str = "local", *, apply: bool = False, policy: Policy | None = None,
         address: str | None = None, state_path: str | os.PathLike[str] | None = None,
         metrics_port: int | None = DEFAULT_METRICS_PORT,
         brokers: bool | None = None) -> ExecutorInfo:
    """Start the cluster's executor, or connect to the one already running.

    Starts a local Ray if none is running (or connects to ``address``). Calling it again with the
    same manifest is harmless; a different manifest is refused unless ``apply=True``, which
    changes the running executor's limits.

    The executor keeps its state (spent budgets, rate levels, tokens, leases) in SQLite at
    ``state_path``, by default in the Ray session's folder; if Ray restarts the executor, it
    carries on from there. An explicit path outlives the Ray cluster (and :func:`shutdown`).

    The executor serves the cluster's Prometheus metrics on ``metrics_port`` (0: any free port,
    None: no endpoint); :func:`metrics_address` says where. Both only apply when it starts.

    With ``brokers``, each node runs a broker actor that takes leases from the executor and
    re-leases them to the node's processes, so the executor's load grows with nodes, not
    processes (README, "How the executor scales"). None (the default) turns them on when the
    cluster has more than one node at start. Also only applies when the executor starts.

    Raises:
        ManifestError: the manifest is invalid, names no such environment, or differs from the
            running executor's and ``apply`` was not given.
        TypeError: ``brokers`` is not True, False or None.
    """
    if brokers is not None and not isinstance(brokers, bool):
        raise TypeError(f"brokers must be True, False or None (on with several nodes), "
                        f"not {brokers!r}")
    plain = None
    if manifest is not None:
        loaded = load_manifest(manifest)
        loaded.environment(environment)  # fail here, before any actor starts
        plain = loaded.to_dict()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    rpc.reset()
    handle: Any
    try:
        handle = ray.get_actor(EXECUTOR_NAME, namespace=NAMESPACE)
    except ValueError:
        if plain is None:
            raise ManifestError("no executor is running: pass a manifest to start one") from None
        # On this (the driver's) node by preference: usually the head, which lives longest.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        actor = ray.remote(ExecutorActor).options(
            name=EXECUTOR_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
            max_restarts=-1, max_concurrency=10_000, num_cpus=0, scheduling_strategy=here)
        if brokers is None:
            brokers = sum(1 for node in ray.nodes() if node["Alive"]) > 1
        handle = actor.remote(plain, environment, policy or Policy(), None,
                              os.fspath(state_path) if state_path is not None else None,
                              metrics_port=metrics_port, brokers=brokers)
    if plain is not None:
        running, running_env = ray.get(handle.manifest.remote())
        if (running, running_env) != (plain, environment):
            if not apply:
                raise ManifestError(
                    "an executor is already running with another manifest or environment "
                    f"({running_env!r}); pass apply=True to change its limits")
            rpc.call("apply", plain, environment)
    return rpc.info()


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
    changes: list[str] = rpc.call("apply", loaded.to_dict(), environment)
    rpc.reset()
    return changes


def shutdown() -> None:
    """Stop the executor; live tokens stop working. The session's state file is deleted; an
    explicit ``state_path`` is kept, so the next executor started on it carries on."""
    if not ray.is_initialized():
        return
    try:
        handle = ray.get_actor(EXECUTOR_NAME, namespace=NAMESPACE)
    except ValueError:
        rpc.reset()
        return
    try:
        ray.get(handle.forget_state.remote(), timeout=30)
    except ray.exceptions.RayError:
        pass  # a dead executor has nothing to forget
    ray.kill(handle, no_restart=True)
    _stop_brokers()
    rpc.reset()


def _stop_brokers() -> None:
    """Stop every node's broker: they belong to the executor that just stopped."""
    from ray_quota._actors.broker import BROKER_PREFIX

    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == NAMESPACE and entry["name"].startswith(BROKER_PREFIX):
            try:
                ray.kill(ray.get_actor(entry["name"], namespace=NAMESPACE), no_restart=True)
            except (ValueError, ray.exceptions.RayError):
                pass  # gone already


def info() -> ExecutorInfo:
    """The running executor's identity, environment and resource definitions, fetched afresh.

    Raises:
        NotInitializedError: Ray is not initialised, or no executor is running.
    """
    rpc.reset()  # limits may have changed since this process last asked
    return rpc.info()


def status() -> list[ResourceStatus]:
    """A snapshot of every resource: limit, available, in use, waiters, tokens, leases."""
    return rpc.call("status")


def set_limit(resource: str, value: int) -> None:
    """Change one resource's limit value at run time; spent budget is never refilled.

    Raises:
        UnknownResourceError: no such resource.
        InvalidAmountError: ``value`` is not a whole number from 1.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_UNITS:
        raise InvalidAmountError(f"a limit must be a whole number from 1 to {MAX_UNITS}, "
                                 f"not {value!r}")
    specs = rpc.info().resources
    if resource not in specs:
        raise UnknownResourceError(f"no resource {resource!r} (known: {', '.join(sorted(specs))})")
    spec = specs[resource]
    burst = spec.burst
    if spec.kind.value == "rate" and spec.burst == spec.value:
        burst = value  # a burst that defaulted to the value follows it
    rpc.call("set_limit", replace(spec, value=value, burst=burst))
    rpc.reset()


def metrics_address() -> str | None:
    """``host:port`` of the executor's Prometheus endpoint (``/metrics``), or None if it serves
    none; :func:`ray_quota._observability.metrics.prometheus_scrape_config` turns it into a scrape job."""
    return info().metrics_address
