"""Process-local plumbing: finding the executor, calling it, and renewing this process's leases.

This is the one place where Ray's errors become ours.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import os
import secrets
import threading
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import ray
import ray.exceptions

from ray_quota._observability import observe as _observe
from ray_quota._errors import ExecutorUnavailableError, NotInitializedError, QuotaError
from ray_quota._core.protocol import (
    EXECUTOR_NAME,
    NAMESPACE,
    RENEW_INTERVAL_S,
    WATCH_TIMEOUT_S,
    ExecutorInfo,
)

if TYPE_CHECKING:
    from ray_quota._token import QuotaToken


# One holder id per process: leases belong to processes, not to tasks.
HOLDER = f"{os.getpid()}-{secrets.token_hex(8)}"
_LEASE_KEYS = itertools.count()


def lease_key() -> str:
    """A key never used before in this cluster, under which the executor knows one lease."""
    return f"{HOLDER}:{next(_LEASE_KEYS)}"


class _State:
    handle: Any = None
    info: ExecutorInfo | None = None
    renewer: _Renewer | None = None
    broker: Any = None  # this node's broker, while this process leases through it
    direct_for: str | None = None  # the cluster whose broker failed us: lease directly there
    is_broker = False  # this process is a broker: it leases from the executor itself
    lock = threading.Lock()
    failover = threading.Lock()


def reset() -> None:
    """Forget the cached executor (after shutdown, or when it was replaced)."""
    with _State.lock:
        _State.handle = None
        _State.info = None
        _State.broker = None


def executor() -> Any:
    """The executor actor's handle, found once per process."""
    handle = _State.handle
    if handle is not None:
        return handle
    if not ray.is_initialized():
        raise NotInitializedError("Ray is not initialised: call ray_quota.init() first")
    try:
        handle = ray.get_actor(EXECUTOR_NAME, namespace=NAMESPACE)
    except ValueError:
        raise NotInitializedError(
            "no ray_quota executor is running: call ray_quota.init(manifest=...) first") from None
    _State.handle = handle
    return handle


def info() -> ExecutorInfo:
    """The running executor's identity and resources, fetched once per process."""
    if _State.info is None:
        _State.info = call("info")
    return _State.info


def _unwrap(result: Any) -> Any:
    if isinstance(result, QuotaError):
        raise result
    return result


RESTART_WINDOW_S = 60.0  # how long calls keep trying while Ray restarts the executor


def call(method: str, *args: Any, retry: bool = True) -> Any:
    """Call the executor and wait; a returned QuotaError is raised here.

    With ``retry`` (for calls that are safe to repeat), a call that failed because the executor
    died is made again, to the executor found afresh, while Ray restarts it.
    """
    delays = retry_delays()
    while True:
        try:
            return _unwrap(ray.get(getattr(executor(), method).remote(*args)))
        except ray.exceptions.RayError as exc:
            time.sleep(_failed(method, exc, delays if retry else None))


async def call_async(method: str, *args: Any, retry: bool = True) -> Any:
    """The asyncio twin of :func:`call`."""
    delays = retry_delays()
    while True:
        try:
            return _unwrap(await getattr(executor(), method).remote(*args))
        except ray.exceptions.RayError as exc:
            await asyncio.sleep(_failed(method, exc, delays if retry else None))


def retry_delays() -> Iterator[float]:
    """Growing pauses between tries, for as long as an executor restart may take."""
    waited, delay = 0.0, 0.05
    while waited < RESTART_WINDOW_S:
        yield delay
        waited += delay
        delay = min(1.0, delay * 2)


def _failed(method: str, exc: Exception, delays: Iterator[float] | None) -> float:
    """Translate a Ray error, or say how long to pause before trying a restarting executor."""
    if isinstance(exc, ray.exceptions.RayActorError):
        reset()
        if delays is not None and (delay := next(delays, None)) is not None:
            return delay
    raise ExecutorUnavailableError(
        f"the ray_quota executor did not answer {method}: {exc}") from exc


def send(method: str, *args: Any) -> None:
    """Make a lease call without waiting (settling and closing are safe to lose)."""
    try:
        getattr(broker() or executor(), method).remote(*args)
    except Exception:  # noqa: BLE001 - at interpreter exit or after shutdown there is nobody to tell
        pass


# ------------------------------------------------------------------------------ node brokers


def broker() -> Any:
    """This node's broker, started if it is not running yet; None to lease from the executor.

    A process leases through its node's broker when the executor says brokers are on, until
    that broker fails it; then it takes its leases over directly (see :func:`_broker_failed`)
    and stays direct while this executor runs. Later processes on the node start a new broker.
    """
    handle = _State.broker
    if handle is not None:
        return handle
    if _State.is_broker:
        return None
    settings = info()
    if not settings.brokers or _State.direct_for == settings.cluster_id:
        return None
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ray_quota._actors.broker import Broker, broker_name

    node = ray.get_runtime_context().get_node_id()
    with _State.lock:
        if _State.broker is None:
            # Pinned to this node (soft=False): when the node goes, the broker goes with it.
            _State.broker = ray.remote(Broker).options(
                name=broker_name(node), namespace=NAMESPACE, lifetime="detached",
                get_if_exists=True, max_restarts=0, max_concurrency=10_000, num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            ).remote(node)
        return _State.broker


def lease_directly() -> None:
    """Make every lease call of this process go to the executor (the broker's own process)."""
    _State.is_broker = True


def lease_call(method: str, *args: Any, resource: str | None = None) -> Any:
    """A lease call (acquire, settle, renew, watch, close, merge, merge_back): to this node's
    broker, or to the executor. ``resource`` names the token's resource, which the broker
    needs for ``acquire``.

    If the broker dies, this process takes its leases over directly; the call is then made
    to the executor, except ``acquire``, whose outcome is unknown: it raises
    :class:`ExecutorUnavailableError` and the caller retries under a new lease.
    """
    handle = broker()
    if handle is None:
        return call(method, *args, retry=method != "acquire")
    try:
        extra = (resource,) if method == "acquire" else ()
        return _unwrap(ray.get(getattr(handle, method).remote(*extra, *args)))
    except ray.exceptions.RayActorError as exc:
        _broker_failed(handle)
        if method == "acquire":
            raise ExecutorUnavailableError(f"this node's ray_quota broker failed: {exc}") from exc
    except ray.exceptions.RayError as exc:
        raise ExecutorUnavailableError(f"this node's ray_quota broker failed {method}: "
                                       f"{exc}") from exc
    return call(method, *args)


async def lease_call_async(method: str, *args: Any, resource: str | None = None) -> Any:
    """The asyncio twin of :func:`lease_call`."""
    handle = broker()
    if handle is None:
        return await call_async(method, *args, retry=method != "acquire")
    try:
        extra = (resource,) if method == "acquire" else ()
        return _unwrap(await getattr(handle, method).remote(*extra, *args))
    except ray.exceptions.RayActorError as exc:
        await asyncio.to_thread(_broker_failed, handle)
        if method == "acquire":
            raise ExecutorUnavailableError(f"this node's ray_quota broker failed: {exc}") from exc
    except ray.exceptions.RayError as exc:
        raise ExecutorUnavailableError(f"this node's ray_quota broker failed {method}: "
                                       f"{exc}") from exc
    return await call_async(method, *args)


def _broker_failed(handle: Any) -> None:
    """The broker died: take over, from the executor, the units it re-leased to this process.

    Each lease moves its share of the broker's lease into a lease of its own at the executor,
    with the same key and running totals, so open reservations and spare units carry on and
    nothing is granted twice. A lease the executor no longer has (the broker's expired first)
    is dropped at the next renewal, as any expired lease is.
    """
    with _State.failover:
        if _State.broker is not handle:
            return  # another thread did it
        _State.direct_for = info().cluster_id
        _State.broker = None
        renewer = _State.renewer
        if renewer is not None:
            renewer.adopt_all()


def claimant() -> str:
    """Who is using a token here: the actor, else the task (stable across Ray retries), else us."""
    if ray.is_initialized():
        ctx = ray.get_runtime_context()
        actor_id = ctx.get_actor_id()
        if actor_id:
            return f"actor:{actor_id}"
        if ctx.worker.mode == ray.WORKER_MODE:
            task_id = ctx.get_task_id()
            if task_id:
                return f"task:{task_id}"
    return f"process:{HOLDER}"


def track(token: QuotaToken) -> None:
    """Have this process's renewer settle and renew the token's lease."""
    with _State.lock:
        if _State.renewer is None:
            _State.renewer = _Renewer()
            _State.renewer.start()
            threading.Thread(target=_watch, args=(_State.renewer,), name="ray_quota-recalls",
                             daemon=True).start()
            atexit.register(flush)
            _flush_when_actor_exits()
    _State.renewer.add(token)


def flush() -> None:
    """Settle every lease of this process now (tests and clean exits); quiet if nobody listens."""
    if _State.renewer is not None:
        try:
            _State.renewer.flush()
        except QuotaError:
            pass


def _flush_when_actor_exits() -> None:
    """In an actor, flush from Ray's ``__ray_shutdown__`` hook (chained to the actor's own).

    An actor that ends normally (``exit_actor()``, or its last handle dropped) runs ``atexit``
    handlers only after Ray has disconnected, when calls to the executor can no longer go out,
    so the atexit flush alone would lose its last renewal's worth of observations and usage.
    The hook has the renewer thread send it: a call made from the hook's own thread carries no
    task context, and Ray 2.60 gives such calls of concurrently exiting actors the same task id,
    which crashes the executor's worker.
    """
    try:
        worker = ray._private.worker.global_worker  # no public way to reach the actor instance
        if worker.mode != ray.WORKER_MODE or worker.actor_id.is_nil():
            return
        actor = worker.actors.get(worker.actor_id)
        if actor is None:
            return
        own = getattr(actor, "__ray_shutdown__", None)

        def shutdown() -> None:
            renewer = _State.renewer
            if renewer is not None:
                renewer.last_flush(timeout_s=3.0)  # Ray kills a slow exit after ~5 s
            if own is not None:
                own()

        actor.__ray_shutdown__ = shutdown
    except Exception:  # noqa: BLE001 - Ray's internals moved, or the actor takes no attributes
        pass


def _actor_exiting() -> bool:
    """Whether this process is an actor on its way out (``exit_actor()``, or its handles gone).

    Background threads then stop calling the executor: Ray holds the exit until calls in flight
    return, and kills the process (no last flush) if that takes over ~5 s.
    """
    try:
        worker = ray._private.worker.global_worker
        return bool(worker.mode == ray.WORKER_MODE and not worker.actor_id.is_nil()
                    and getattr(worker, "core_worker").get_current_actor_should_exit())
    except Exception:  # noqa: BLE001 - not connected, or Ray's internals moved
        return False


def _watch(renewer: _Renewer) -> None:
    """Keep one call open at the executor that answers when our spare units should go back."""
    while not _actor_exiting():
        try:
            recalled = lease_call("watch", HOLDER, WATCH_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - no executor right now; renewals still shrink leases
            time.sleep(RENEW_INTERVAL_S)
            continue
        if recalled:
            renewer.recall(set(recalled))


class _Renewer(threading.Thread):
    """Every interval: report what each token's lease used, give back spare, renew the rest."""

    def __init__(self) -> None:
        super().__init__(name="ray_quota-renewer", daemon=True)
        self._tokens: weakref.WeakSet[QuotaToken] = weakref.WeakSet()
        self._flush_lock = threading.Lock()
        self._last = threading.Event()  # the process is ending: flush once more, then stop
        self._done = threading.Event()

    def add(self, token: QuotaToken) -> None:
        self._tokens.add(token)

    def recall(self, token_ids: set[str]) -> None:
        reports = [report for token in list(self._tokens) if token._id in token_ids
                   and (report := token._recall())]
        if reports:
            send("settle", reports)

    def adopt_all(self) -> None:
        """Take every brokered lease of this process over directly (the broker failed)."""
        tokens = list(self._tokens)
        entries = [entry for token in tokens for entry in token._adoptions()]
        adopted = set(call("adopt", entries)) if entries else set()
        for token in tokens:
            token._adopted(adopted)

    def run(self) -> None:
        while True:
            last = self._last.wait(RENEW_INTERVAL_S)
            if not last and _actor_exiting():
                continue  # the actor's __ray_shutdown__ hook asks for the last flush
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - a missed renewal only shrinks our leases
                pass
            if last:
                self._done.set()
                return

    def last_flush(self, timeout_s: float) -> None:
        """Have this thread flush once more now, and wait (at most ``timeout_s``) until it has."""
        if self.is_alive():
            self._last.set()
            self._done.wait(timeout_s)

    def flush(self) -> None:
        with self._flush_lock:
            tokens = list(self._tokens)
            observed = _observe.drain()  # metrics travel with the renewal
            if not tokens and observed is None:
                return
            sent_at = time.monotonic()
            reports = [report for token in tokens for report in token._reports(sent_at)]
            try:
                alive = lease_call("renew", HOLDER, reports, observed)
            except BaseException:
                _observe.restore(observed)  # the next renewal carries them
                raise
            for token in tokens:
                token._renewed(alive, sent_at)

