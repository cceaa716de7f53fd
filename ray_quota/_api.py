"""Starting, finding, changing and stopping the executor."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ray
import ray.exceptions
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ray_quota._runtime import rpc
from ray_quota._errors import ExecutorUnavailableError, ManifestError, StateMissingError
from ray_quota._actors.executor import ExecutorActor
from ray_quota._core.protocol import EXECUTOR_NAME, NAMESPACE, ExecutorInfo
from ray_quota._manifest import load_manifest
from ray_quota._core.scheduler import Policy, ResourceStatus

DEFAULT_METRICS_PORT = 9464


def init(manifest: str | os.PathLike[str] | Mapping[str, Any] | None = None,
         environment: str = "local", *, apply: bool = False, policy: Policy | None = None,
         address: str | None = None, state_path: str | os.PathLike[str] | None = None,
         metrics_port: int | None = DEFAULT_METRICS_PORT,
         brokers: bool | None = None, ray_metrics: bool | None = None) -> ExecutorInfo:
    """Start the cluster's executor, or connect to the one already running.

    Starts a local Ray if none is running (or connects to ``address``). Calling it again with the
    same manifest is harmless; a different manifest is refused unless ``apply=True``, which
    changes the running executor's limits.

    The executor keeps its state (spent budgets, rate levels, tokens, leases) in SQLite at
    ``state_path``, by default in this user's state directory, one file per environment
    (``RAY_QUOTA_STATE_DIR`` moves it). The state outlives :func:`shutdown`, ``ray-quota stop``
    and the Ray cluster: the next executor on it carries on, under the manifest's limits, and
    only :func:`reset` refills. With the default path the executor is pinned to the node it
    starts on (the driver's), which holds the file; an explicit ``state_path`` lets Ray restart
    it on any node, so give one on storage every node sees.

    The executor serves the cluster's Prometheus metrics on ``metrics_port`` (0: any free port,
    None: no endpoint); :func:`metrics_address` says where. With ``ray_metrics`` it exports the
    same series through Ray's own metrics pipeline too (``ray.util.metrics``), so a Prometheus
    that scrapes the Ray cluster has them with no job of ours; None (the default) does so when
    the executor's node runs Ray's metrics agent. All three only apply when it starts.

    With ``brokers``, each node runs a broker actor that takes leases from the executor and
    re-leases them to the node's processes, so the executor's load grows with nodes, not
    processes (README, "How the executor scales"). None (the default) turns them on when the
    cluster has more than one node at start. Also only applies when the executor starts.

    Raises:
        ManifestError: the manifest is invalid, names no such environment, or differs from the
            running executor's and ``apply`` was not given.
        StateMissingError: the state file is unreadable, or Ray restarted the executor where
            its state is missing (README, "State and durability").
        TypeError: ``brokers`` or ``ray_metrics`` is not True, False or None.
    """
    if brokers is not None and not isinstance(brokers, bool):
        raise TypeError(f"brokers must be True, False or None (on with several nodes), "
                        f"not {brokers!r}")
    if ray_metrics is not None and not isinstance(ray_metrics, bool):
        raise TypeError(f"ray_metrics must be True, False or None (on where Ray's metrics "
                        f"agent runs), not {ray_metrics!r}")
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
        # On this (the driver's) node: usually the head, which lives longest. Pinned there if
        # the state file is local to it, so that Ray never restarts the executor afresh
        # elsewhere; an explicit path is taken to be one every node sees.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                              soft=state_path is not None)
        actor = ray.remote(ExecutorActor).options(
            name=EXECUTOR_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
            max_restarts=-1, max_concurrency=10_000, num_cpus=0, scheduling_strategy=here)
        if brokers is None:
            brokers = sum(1 for node in ray.nodes() if node["Alive"]) > 1
        handle = actor.remote(plain, environment, policy or Policy(), None,
                              os.fspath(state_path) if state_path is not None else None,
                              metrics_port=metrics_port, brokers=brokers,
                              ray_metrics=ray_metrics)
        _started(handle)
    if plain is not None:
        running, running_env = ray.get(handle.manifest.remote())
        if (running, running_env) != (plain, environment):
            if not apply:
                raise ManifestError(
                    "an executor is already running with another manifest or environment "
                    f"({running_env!r}); pass apply=True to change its limits")
            rpc.call("apply", plain, environment)
    return rpc.info()


def _started(handle: Any) -> None:
    """Wait for a new executor to start; if it refused to, raise its reason."""
    try:
        ray.get(handle.calls_served.remote())
    except ray.exceptions.RayActorError as exc:
        if "StateMissingError" in str(exc):
            reason = str(exc).rsplit("StateMissingError: ", 1)[-1].strip()
            raise StateMissingError(reason) from None
        raise ExecutorUnavailableError(f"the ray_quota executor did not start: {exc}") from exc


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
    """Stop the executor; live tokens stop working. Its state file is kept: the next executor
    started on it carries on with what was spent (:func:`reset` refills)."""
    if not ray.is_initialized():
        return
    from ray_quota._actors.durable import clear_markers

    try:
        handle = ray.get_actor(EXECUTOR_NAME, namespace=NAMESPACE)
    except ValueError:
        handle = None
    if handle is not None:
        try:
            ray.get(handle.close_state.remote(), timeout=30)
        except ray.exceptions.RayError:
            pass  # a dead executor has nothing to close
        ray.kill(handle, no_restart=True)
        _stop_brokers()
    clear_markers()  # stopped on purpose: the next start need not find this state
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

    Only the value changes (and a rate's burst that equals it), on the resource as the executor
    has it now: other changes made since, by :func:`apply` or another process, are kept.

    Raises:
        UnknownResourceError: no such resource.
        InvalidAmountError: ``value`` is not a whole number from 1.
    """
    rpc.call("change_limit", resource, value)
    rpc.reset()


def reset(resource: str | None = None, *, all_resources: bool = False) -> list[str]:
    """Refill a resource's spent budget (or every resource's, with ``all_resources``).

    The explicit way to give back what was spent: a capacity budget is unspent again except for
    units in live leases, a rate pool is full. Returns one line per resource saying what was
    refilled.

    Raises:
        ValueError: neither or both of ``resource`` and ``all_resources`` were given.
        UnknownResourceError: no such resource; nothing was refilled.
    """
    if (resource is None) == (not all_resources):
        raise ValueError("name one resource to reset, or pass all_resources=True (not both)")
    lines: list[str] = rpc.call("reset", None if all_resources else [resource])
    return lines


def metrics_address() -> str | None:
    """``host:port`` of the executor's Prometheus endpoint (``/metrics``), or None if it serves
    none; :func:`ray_quota._observability.metrics.prometheus_scrape_config` turns it into a scrape job."""
    return info().metrics_address
