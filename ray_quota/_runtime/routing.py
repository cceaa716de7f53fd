"""Where this process's lease calls go: to its node's broker while brokers are on, else to the
executor; and, when the broker fails, taking this process's leases over from the executor.

The lease calls are ``acquire``, ``settle``, ``renew``, ``watch``, and the token calls that carry
lease totals: ``close``, ``merge``, ``merge_back``. Each carries this process's secret as its last
argument, which proves that the holder and lease keys it names are ours (to the broker as to the
executor; a broker proves its own to the executor with its own secret).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import ray

from ray_quota._core.protocol import NAMESPACE
from ray_quota._errors import ExecutorUnavailableError
from ray_quota._runtime import identity, rpc
from ray_quota._runtime.steps import Blocking, Sleep, Steps, run, run_async

BROKER = "this node's ray_quota broker"


class _Routing:
    broker: Any = None  # this node's broker, while this process leases through it
    direct_for: str | None = None  # the cluster whose broker failed us: lease directly there
    adopt: Callable[[], None] | None = None  # takes this process's brokered leases over
    lock = threading.Lock()
    failover = threading.Lock()


def _forget_broker() -> None:
    _Routing.broker = None


rpc.on_reset(_forget_broker)  # a new executor: find (or start) the node's broker afresh


def broker() -> Any:
    """This node's broker, started if it is not running yet; None to lease from the executor.

    A process leases through its node's broker when the executor says brokers are on, until
    that broker fails it; then it takes its leases over directly (see :func:`_broker_failed`)
    and stays direct while this executor runs. Later processes on the node start a new broker.
    """
    return run(finding_broker())


def finding_broker() -> Steps[Any]:
    """:func:`broker` as steps: async code awaits the executor's settings, and starts (or
    finds) the broker in a thread, as Ray's actor lookup blocks."""
    handle = _Routing.broker
    if handle is not None or identity.is_broker():
        return handle
    settings = yield from rpc.informing()
    if not settings.brokers or _Routing.direct_for == settings.cluster_id:
        return None
    return (yield Blocking(_start_broker))


def _start_broker() -> Any:
    """Start this node's broker, or find the one another process started."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ray_quota._actors.broker import BrokerActor, broker_name

    node = ray.get_runtime_context().get_node_id()
    with _Routing.lock:
        if _Routing.broker is None:
            # Pinned to this node (soft=False): when the node goes, the broker goes with it.
            _Routing.broker = ray.remote(BrokerActor).options(
                name=broker_name(node), namespace=NAMESPACE, lifetime="detached",
                get_if_exists=True, max_restarts=0, max_concurrency=10_000, num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            ).remote(node)
        return _Routing.broker


def when_broker_fails(adopt: Callable[[], None]) -> None:
    """Have a broker's failure call ``adopt``, which takes this process's leases over."""
    _Routing.adopt = adopt


def leasing(method: str, *args: Any, resource: str | None = None) -> Steps[Any]:
    """A lease call, to this node's broker or to the executor; see :func:`lease_call`."""
    args = (*args, identity.SECRET)
    handle = yield from finding_broker()
    if handle is None:
        return (yield from rpc.calling(method, *args, retry=method != "acquire"))
    extra = (resource,) if method == "acquire" else ()
    rpc.calls_begin()
    try:
        return (yield from _asking_broker(handle, method, (*extra, *args)))
    except ExecutorUnavailableError as error:
        if not rpc.dead(error):
            raise
        yield Blocking(_broker_failed, (handle,))
        if method == "acquire":
            raise
    return (yield from rpc.calling(method, *args))


def _asking_broker(handle: Any, method: str, args: tuple[Any, ...]) -> Steps[Any]:
    """Ask the broker, again while it is only out of reach (every lease call but ``acquire``
    is safe to repeat). Only a broker that died may be taken over: one that lives on keeps
    the process's sub-leases, and when they expire there gives their units back upstream
    although the process holds them."""
    delays = rpc.retry_delays()
    while True:
        try:
            return (yield from rpc.ask(handle, method, args, who=BROKER))
        except ExecutorUnavailableError as error:
            if rpc.dead(error) or not rpc.died(error) or method == "acquire":
                raise
            delay = next(delays, None)
            if delay is None:
                raise
        yield Sleep(delay)


def lease_call(method: str, *args: Any, resource: str | None = None) -> Any:
    """A lease call: to this node's broker, or to the executor. ``resource`` names the token's
    resource, which the broker needs for ``acquire``.

    If the broker dies, this process takes its leases over directly; the call is then made
    to the executor, except ``acquire``, whose outcome is unknown: it raises
    :class:`ExecutorUnavailableError` and the caller retries under a new lease.
    """
    return run(leasing(method, *args, resource=resource))


async def lease_call_async(method: str, *args: Any, resource: str | None = None) -> Any:
    """The asyncio twin of :func:`lease_call`."""
    return await run_async(leasing(method, *args, resource=resource))


def _lease_service() -> Any:
    return broker() or rpc.executor()


def send(method: str, *args: Any) -> None:
    """Make a lease call without waiting (settling and closing are safe to lose)."""
    rpc.send(method, *args, identity.SECRET, to=_lease_service)


def _broker_failed(handle: Any) -> None:
    """The broker died: take over, from the executor, the units it re-leased to this process.

    Each lease moves its share of the broker's lease into a lease of its own at the executor,
    with the same key and running totals, so open reservations and spare units carry on and
    nothing is granted twice. A lease the executor no longer has (the broker's expired first)
    is dropped at the next renewal, as any expired lease is.
    """
    with _Routing.failover:
        if _Routing.broker is not handle:
            return  # another thread did it
        _Routing.direct_for = rpc.info().cluster_id
        _Routing.broker = None
        if _Routing.adopt is not None:
            _Routing.adopt()
