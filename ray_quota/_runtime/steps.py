"""Sync and async twins over one implementation.

Logic that waits is written once, as a generator that yields what to wait for (a step) and is
sent back the answer, or has the step's error thrown in at the ``yield``. :func:`run` waits for
each step by blocking, :func:`run_async` by awaiting; that is all the twins differ in.

Example:
    >>> def twice(handle, x):
    ...     first = yield Remote(handle.double, (x,))
    ...     return (yield Remote(handle.double, (first,)))
    >>> run(twice(handle, 1))                 # or: await run_async(twice(handle, 1))
    4
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import ray
import ray.exceptions

from ray_quota._errors import NotInitializedError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Remote:
    """Call an actor's method (``handle.method``) with ``args``; the answer is its result,
    passed through ``decode`` if given (for answers that travel packed)."""

    method: Any
    args: tuple[Any, ...]
    decode: Callable[[Any], Any] | None = None


@dataclass(frozen=True, slots=True)
class Sleep:
    """Pause for ``seconds``."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Blocking:
    """Call a function that blocks (in a worker thread under asyncio, so the loop goes on)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()


Step = Remote | Sleep | Blocking
Steps = Generator[Step, Any, T]


class Abandoned(Exception):
    """Thrown in at a :class:`Remote` step whose awaiting coroutine was cancelled (asyncio).

    The call itself was cancelled too (``ray.cancel``, as Ray cancels the calls of a cancelled
    task), but it may have finished first: ``late`` is its answer, which the logic may await
    to undo what it did. The logic must not wait here; :func:`run_async` re-raises the
    cancellation whatever it does.
    """

    def __init__(self, late: Any) -> None:
        super().__init__("the call's caller was cancelled")
        self.late = late


class _Decoded:
    """An awaitable of a call's answer, decoded as its step says (see :class:`Abandoned`)."""

    __slots__ = ("_ref", "_decode")

    def __init__(self, ref: Any, decode: Callable[[Any], Any]) -> None:
        self._ref, self._decode = ref, decode

    def __await__(self) -> Generator[Any, None, Any]:
        return self._decode((yield from self._ref.__await__()))


def run(steps: Steps[T]) -> T:
    """Drive ``steps`` to its result, blocking this thread on each step."""
    answer: Any = None
    error: Exception | None = None
    while True:
        try:
            step = steps.send(answer) if error is None else steps.throw(error)
        except StopIteration as stop:
            return stop.value
        answer, error = None, None
        try:
            if isinstance(step, Remote):
                answer = _call(step)
            elif isinstance(step, Sleep):
                time.sleep(step.seconds)
            else:
                answer = step.fn(*step.args)
        except Exception as exc:  # noqa: BLE001 - the logic decides; thrown in at its yield
            error = exc


class _Exit:
    """A driver on its way out: the thread ending its tokens is the last to call Ray."""

    by: threading.Thread | None = None
    calls = 0  # threads now waiting for an answer
    lock = threading.Lock()


# A driver's thread waits for an answer in slices this long, so that the exit can have it stop:
# a thread still inside Ray's wait when Ray disconnects makes the process exit with code 1.
EXIT_SLICE_S = 0.1


def stop_calls(timeout_s: float) -> None:
    """From now on only this thread calls Ray; wait (at most ``timeout_s``) until the others'
    calls under way have stopped waiting. For a driver's exit, before Ray disconnects."""
    _Exit.by = threading.current_thread()
    deadline = time.monotonic() + timeout_s
    while _Exit.calls and time.monotonic() < deadline:
        time.sleep(EXIT_SLICE_S / 4)


def exiting_elsewhere() -> bool:
    """Whether another thread is ending this process (see :func:`stop_calls`): this one must
    not call Ray now."""
    return _Exit.by is not None and _Exit.by is not threading.current_thread()


def resume_calls() -> None:
    """Any thread may call Ray again (after a ``ray.shutdown()`` that :func:`stop_calls`
    prepared, for a later ``ray.init()``)."""
    _Exit.by = None


def _call(step: Remote) -> Any:
    """Make the call and wait for its answer; in a driver, in slices, stopping at its exit."""
    if exiting_elsewhere():
        raise NotInitializedError("this process is disconnecting from Ray")
    if not ray.is_initialized():  # touching the runtime context now would end the process
        raise NotInitializedError("this process is not connected to Ray (any more)")
    ref = step.method.remote(*step.args)
    decode = step.decode or _same
    if ray._private.worker.global_worker.mode != ray.SCRIPT_MODE:
        # A worker's wait also lends its CPU to other tasks: keep it whole.
        return decode(ray.get(ref))
    with _Exit.lock:
        _Exit.calls += 1
    try:
        while True:
            try:
                return decode(ray.get(ref, timeout=EXIT_SLICE_S))
            except ray.exceptions.GetTimeoutError:
                if not ray.is_initialized():  # ray.shutdown() ran meanwhile: stop, quietly
                    raise NotInitializedError("this process disconnected from Ray") from None
                if _Exit.by is not None and _Exit.by is not threading.current_thread():
                    raise NotInitializedError("this process is disconnecting from Ray") from None
    finally:
        with _Exit.lock:
            _Exit.calls -= 1


async def run_async(steps: Steps[T]) -> T:
    """Drive ``steps`` to its result, awaiting each step: the asyncio twin of :func:`run`."""
    answer: Any = None
    error: Exception | None = None
    while True:
        try:
            step = steps.send(answer) if error is None else steps.throw(error)
        except StopIteration as stop:
            return stop.value
        answer, error = None, None
        try:
            if isinstance(step, Remote):
                answer = await _remote(steps, step)
            elif isinstance(step, Sleep):
                await asyncio.sleep(step.seconds)
            else:
                answer = await asyncio.to_thread(step.fn, *step.args)
        except Exception as exc:  # noqa: BLE001 - the logic decides; thrown in at its yield
            error = exc


async def _remote(steps: Steps[Any], step: Remote) -> Any:
    """Await one call; if this coroutine is cancelled, cancel the call and tell the logic."""
    ref = step.method.remote(*step.args)
    try:
        answer = await ref
    except asyncio.CancelledError:
        # Else the call runs on (an acquire stays queued, and is granted to nobody's use).
        ray.cancel(ref)
        try:
            steps.throw(Abandoned(ref if step.decode is None else _Decoded(ref, step.decode)))
        except BaseException:  # noqa: BLE001 - whatever the logic did, the cancellation wins
            pass
        raise
    return answer if step.decode is None else step.decode(answer)


def _same(answer: Any) -> Any:
    return answer
