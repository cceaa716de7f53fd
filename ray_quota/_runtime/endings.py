"""A process's tokens end with it: the driver's at a clean exit, an actor's when it ends
gracefully (``exit_actor()``, or its last handle dropped).

Every handle made or taken up in this process is known here (weakly). When the process ends in
a way that can still report, each handle still live is ended cleanly: its open reservations
count as ``commit(0)``, and it goes back to the token it was split from (or is released). What
cannot run code (``ray.kill``, a crash, SIGKILL) is left to the executor: the lease expires and
the token is released as an orphan.

When this runs matters. Ray's own ``atexit`` handler disconnects from the cluster; handlers run
last registered first, and this module registers its own after importing Ray, so a driver's
tokens end while the executor can still hear it. An actor runs ``atexit`` handlers only after
Ray has disconnected, so there the tokens end from Ray's ``__ray_shutdown__`` hook instead.
``ray.shutdown`` is wrapped so that a driver's threads stop waiting on Ray before it disconnects.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import ray
import ray.exceptions

from ray_quota._errors import ExecutorUnavailableError, QuotaError
from ray_quota._runtime import giveback
from ray_quota._runtime.steps import resume_calls, stop_calls

if TYPE_CHECKING:
    from ray_quota._token import QuotaToken

# How long an ending actor waits for its tokens to end: Ray kills a slow exit after ~5 s.
ACTOR_EXIT_WAIT_S = 3.0


class _Owned:
    """This process's handles, by the order they were made here (children after parents)."""

    tokens: ClassVar[weakref.WeakValueDictionary[int, QuotaToken]] = (
        weakref.WeakValueDictionary())
    order = itertools.count()
    lock = threading.Lock()
    hooked = False  # this actor's __ray_shutdown__ ends them


def own(token: QuotaToken) -> None:
    """Have ``token`` end with this process (called for every handle made or taken up here)."""
    with _Owned.lock:
        _Owned.tokens[next(_Owned.order)] = token
        hook = not _Owned.hooked
        _Owned.hooked = True
    if hook:
        hook_actor()


def end_all() -> int:
    """End every live handle of this process cleanly, newest first (so a child merges back into
    a parent that is still live); returns how many it ended. Quiet once nobody listens."""
    if not ray.is_initialized():
        return 0
    giveback.flush()  # the tasks' give-backs first, before their parents end
    with _Owned.lock:
        tokens = [token for _, token in sorted(_Owned.tokens.items(), reverse=True)]
    ended = 0
    for token in tokens:
        try:
            ended += token._end_cleanly()
        except ExecutorUnavailableError:
            return ended  # the executor is gone: its expiry settles the rest
        except (QuotaError, ray.exceptions.RayError):
            continue  # this one was refused (closed elsewhere meanwhile): the others still end
    return ended


def _at_exit() -> None:
    """A driver's (or task worker's) clean exit: end its tokens, then have its other threads
    stop calling Ray before Ray disconnects."""
    if ray.is_initialized():
        end_all()
        stop_calls(timeout_s=1.0)


atexit.register(_at_exit)  # after Ray's own (imported above), so it runs before Ray disconnects


def _quiet_shutdown(original: Callable[..., Any]) -> Callable[..., Any]:
    """``ray.shutdown`` that first has this process's other threads stop waiting on Ray: a
    thread that touches Ray after it disconnected ends the whole process with exit code 1."""

    @functools.wraps(original)
    def shutdown(*args: Any, **kwargs: Any) -> Any:
        if ray.is_initialized():
            stop_calls(timeout_s=1.0)
        try:
            return original(*args, **kwargs)
        finally:
            resume_calls()

    shutdown.__ray_quota__ = True  # type: ignore[attr-defined]
    return shutdown


if not getattr(ray.shutdown, "__ray_quota__", False):
    ray.shutdown = _quiet_shutdown(ray.shutdown)


def hook_actor() -> None:
    """In an actor, end this process's tokens from Ray's ``__ray_shutdown__`` hook, chained to
    any the actor has.

    The tokens end from a thread of their own: a call made from the hook's thread carries no
    task context, and Ray 2.60 gives such calls of concurrently exiting actors the same task
    id, which crashes the executor's worker.
    """
    try:
        worker = ray._private.worker.global_worker  # no public way to reach the actor instance
        if worker.mode != ray.WORKER_MODE or worker.actor_id.is_nil():
            return
        actor = worker.actors.get(worker.actor_id)
        if actor is None or getattr(actor, "__ray_quota_ending__", False):
            with _Owned.lock:
                _Owned.hooked = actor is not None  # not made yet: try with the next token
            return
        own_hook = getattr(actor, "__ray_shutdown__", None)

        def shutdown() -> None:
            try:
                if own_hook is not None:
                    own_hook()
            finally:
                ending = threading.Thread(target=end_all, name="ray_quota-ending", daemon=True)
                ending.start()
                ending.join(ACTOR_EXIT_WAIT_S)

        actor.__ray_shutdown__ = shutdown
        actor.__ray_quota_ending__ = True
    except Exception:  # noqa: BLE001 - Ray's internals moved, or the actor takes no attributes
        pass
