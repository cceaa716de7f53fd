"""Calls to the executor: its handle, found once per process, and the one path every call takes.

That path (:func:`ask`) is the one place where Ray's errors become ours; :func:`calling` adds the
retries that carry a call over an executor restart. Both are written once, as steps (see
:mod:`ray_quota._runtime.steps`), which :func:`call` and :func:`call_async` drive.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import ray
import ray.exceptions

from ray_quota._core.protocol import EXECUTOR_NAME, NAMESPACE, ExecutorInfo
from ray_quota._errors import ExecutorUnavailableError, NotInitializedError, QuotaError
from ray_quota._runtime.packed import PACKED_METHOD, Carried, pack, unpack_answer
from ray_quota._runtime.steps import Blocking, Remote, Sleep, Steps, run, run_async

EXECUTOR = "the ray_quota executor"
RESTART_WINDOW_S = 60.0  # how long calls keep trying while Ray restarts the executor


class _Executor:
    handle: Any = None
    info: ExecutorInfo | None = None
    lock = threading.Lock()


# What other modules cached about the executor (the node's broker), forgotten with it.
_ON_RESET: list[Callable[[], None]] = []


def reset() -> None:
    """Forget the cached executor (after shutdown, or when it was replaced)."""
    with _Executor.lock:
        _Executor.handle = None
        _Executor.info = None
        for forget in _ON_RESET:
            forget()


def on_reset(forget: Callable[[], None]) -> None:
    """Have :func:`reset` call ``forget`` too (under its lock)."""
    _ON_RESET.append(forget)


class _Before:
    """What goes before any call this process makes (queued give-backs, see giveback.py)."""

    send: Callable[[], None] | None = None  # sends them now, without waiting
    take: Callable[[], Carried] | None = None  # takes them, to carry in an executor call


def before_calls(send: Callable[[], None], take: Callable[[], Carried]) -> None:
    """Have every call first ``send`` (to a broker) or ``take`` (into an executor call, which
    applies them first) what must reach the actor before it; neither may wait."""
    _Before.send, _Before.take = send, take


def calls_begin() -> None:
    """Send what must go before a call (see :func:`before_calls`)."""
    if _Before.send is not None:
        _Before.send()


def executor() -> Any:
    """The executor actor's handle, found once per process."""
    handle = _Executor.handle
    if handle is not None:
        return handle
    if not ray.is_initialized():
        raise NotInitializedError("Ray is not initialised: call ray_quota.init() first")
    try:
        handle = ray.get_actor(EXECUTOR_NAME, namespace=NAMESPACE)
    except ValueError:
        raise NotInitializedError(
            "no ray_quota executor is running: call ray_quota.init(manifest=...) first") from None
    _Executor.handle = handle
    return handle


def info() -> ExecutorInfo:
    """The running executor's identity and resources, fetched once per process."""
    return run(informing())


def informing() -> Steps[ExecutorInfo]:
    """:func:`info` as steps, so that async code awaits the first fetch instead of blocking."""
    if _Executor.info is None:
        _Executor.info = yield from calling("info")
    return _Executor.info


# ------------------------------------------------------------------------------ the one path


def ask(handle: Any, method: str, args: tuple[Any, ...], *, who: str,
        carried: Carried | None = None) -> Steps[Any]:
    """Call ``handle.method(*args)`` once and return its answer; unless ``carried`` is None
    (the executor), as one packed argument and answer, carrying those give-backs (see
    :mod:`ray_quota._runtime.packed`).

    An answer that is a :class:`QuotaError` is raised. A Ray error becomes an
    :class:`ExecutorUnavailableError` caused by it (see :func:`died`): the one place Ray's
    errors become ours.
    """
    if not ray.is_initialized():
        # A handle kept from before ray.shutdown(): calling it would start a new local Ray.
        raise NotInitializedError(f"Ray was shut down: {who} cannot answer {method}")
    try:
        answer = yield (Remote(getattr(handle, method), args) if carried is None else
                        Remote(getattr(handle, PACKED_METHOD), (pack(method, args, carried),),
                               unpack_answer))
    except ray.exceptions.RayError as exc:
        raise ExecutorUnavailableError(f"{who} did not answer {method}: {exc}") from exc
    if isinstance(answer, QuotaError):
        raise answer
    return answer


def died(error: ExecutorUnavailableError) -> bool:
    """Whether the actor that ``error`` says did not answer died (and Ray may restart it), or
    is out of reach for the moment: either way, worth finding afresh and asking again."""
    return isinstance(error.__cause__, ray.exceptions.RayActorError)


def dead(error: ExecutorUnavailableError) -> bool:
    """Whether the actor that ``error`` says did not answer is dead for sure. Ray's
    ``ActorUnavailableError`` (out of reach for the moment) is a ``RayActorError`` too, but
    the actor may live on, and whatever it holds with it."""
    return isinstance(error.__cause__, ray.exceptions.ActorDiedError)


def retry_delays() -> Iterator[float]:
    """Growing pauses between tries, for as long as an executor restart may take."""
    waited, delay = 0.0, 0.05
    while waited < RESTART_WINDOW_S:
        yield delay
        waited += delay
        delay = min(1.0, delay * 2)


def calling(method: str, *args: Any, retry: bool = True) -> Steps[Any]:
    """Call the executor; see :func:`call`."""
    carried = _Before.take() if _Before.take is not None else []
    delays = retry_delays()
    while True:
        try:
            # Finding the executor asks Ray's control store and blocks: in a thread under asyncio.
            handle = _Executor.handle or (yield Blocking(executor))
            return (yield from ask(handle, method, args, who=EXECUTOR, carried=carried))
        except ExecutorUnavailableError as error:
            if not died(error):
                raise
            carried = []  # went with the first try, or were lost with it, as a send would be
            reset()  # find the restarted executor afresh
            delay = next(delays, None) if retry else None
            if delay is None:
                raise
        yield Sleep(delay)


def call(method: str, *args: Any, retry: bool = True) -> Any:
    """Call the executor and wait; a returned QuotaError is raised here.

    With ``retry`` (for calls that are safe to repeat), a call that failed because the executor
    died is made again, to the executor found afresh, while Ray restarts it.

    Raises:
        ExecutorUnavailableError: the executor did not answer (and did not come back).
    """
    return run(calling(method, *args, retry=retry))


async def call_async(method: str, *args: Any, retry: bool = True) -> Any:
    """The asyncio twin of :func:`call`."""
    return await run_async(calling(method, *args, retry=retry))


def send(method: str, *args: Any, to: Callable[[], Any] = executor) -> None:
    """Call a method of the executor (or of the actor ``to()`` finds) without waiting: for
    settling and closing, which are safe to lose."""
    if not ray.is_initialized():
        return  # shut down: nobody to tell, and a call would start a new local Ray
    try:
        handle = to()
        if handle is _Executor.handle:
            getattr(handle, PACKED_METHOD).remote(pack(method, args))
        else:
            getattr(handle, method).remote(*args)
    except Exception:  # noqa: BLE001 - at interpreter exit or after shutdown there is nobody to tell
        pass
