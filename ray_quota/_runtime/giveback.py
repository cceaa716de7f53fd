"""Give-backs off the critical path: ``close`` and ``merge_back`` queued, sent in batches.

A task's end (``@quota``'s give-back) and a token's ``close`` used to wait for the executor's
answer, a round trip each. Their caller needs no answer: the handle is unusable at once here (its
state says so before anything is queued), and what it held (lease totals, expected use, credit)
travels in the queued message, exactly as it did in the call. So they are queued, and sent
without waiting:

- within :data:`BATCH_WINDOW_S` of the first one queued, by this module's sender thread, all
  queued so far in one executor call (``give_back``), or at once when :data:`BATCH_MAX` wait;
- inside any call this process makes to the executor, which applies them first (so the
  process's own next call, ``status()``, ``describe()`` or a task's ``acquire``, sees them, and
  they cost no call of their own), or before any call to its node's broker;
- before each renewal (the renewer flushes them first), and when the process ends its tokens.

A commit's unused units of an uncontended rate lease are queued the same way (``_token``'s
``_settle``): nobody waits for them, and a task's end then sends them with its give-back.

What no longer surfaces: an error the executor answers to a queued give-back (the token was
closed elsewhere meanwhile, the executor was unavailable) is logged by the executor, not raised
to the code that closed the token; and if the process is killed within the batch window, the
queued give-backs are lost, as a call under way was: the tokens' leases then expire and the
orphans are released, which loses their expected use to the parent (the parent's own use is
unaffected). Another process sees a give-back up to :data:`BATCH_WINDOW_S` (plus a message's
travel) after the task that made it ended.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ray

from ray_quota._runtime import identity, routing, rpc
from ray_quota._runtime.packed import GIVE_BACKS, Carried
from ray_quota._runtime.steps import exiting_elsewhere

BATCH_WINDOW_S = 0.02  # gathered this long after the first: at 1,000 tasks/s, ~20 per call
BATCH_MAX = 256  # sent at once when this many wait


class _Queue:
    entries: list[tuple[str, tuple[Any, ...]]] = []
    lock = threading.Lock()
    wake = threading.Event()
    sender: threading.Thread | None = None


def queue(method: str, *args: Any) -> None:
    """Send the lease call ``method(*args)`` (without this process's secret, which is added)
    soon, without waiting; see the module's docstring for when."""
    if method not in GIVE_BACKS:
        raise ValueError(f"only {sorted(GIVE_BACKS)} may be queued, not {method!r}")
    with _Queue.lock:
        _Queue.entries.append((method, args))
        full = len(_Queue.entries) >= BATCH_MAX
        if _Queue.sender is None:
            _Queue.sender = threading.Thread(target=_send_soon, name="ray_quota-giveback",
                                             daemon=True)
            _Queue.sender.start()
    if full:
        flush()
    else:
        _Queue.wake.set()


def pending() -> int:
    """How many give-backs wait to be sent."""
    with _Queue.lock:
        return len(_Queue.entries)


def flush() -> None:
    """Send every queued give-back now, without waiting for answers (in the order queued)."""
    batch = take()
    if batch:
        try:
            rpc.send("give_back", batch)
        except Exception:  # noqa: BLE001 - nobody to tell (shut down): as a lost call
            pass


def take() -> Carried:
    """The queued give-backs, with this process's secret, for an executor call to carry
    (applied before the call); sent on at once instead while a broker serves this process."""
    if not _Queue.entries:  # the common case, on every call this process makes: no lock
        return []
    if exiting_elsewhere() or not ray.is_initialized():
        return []  # the thread ending this process sends them (or nobody listens any more)
    with _Queue.lock:
        batch, _Queue.entries = _Queue.entries, []
    try:
        if routing.broker() is not None:
            for method, args in batch:  # the broker settles its sub-leases: one by one
                routing.send(method, *args)
            return []
    except Exception:  # noqa: BLE001 - nobody to tell (shut down): as a lost call
        return []
    return [(method, (*args, identity.SECRET)) for method, args in batch]


def _send_soon() -> None:
    """The sender thread: a batch goes :data:`BATCH_WINDOW_S` after its first give-back."""
    while True:
        _Queue.wake.wait()
        time.sleep(BATCH_WINDOW_S)
        _Queue.wake.clear()
        try:
            flush()
        except Exception:  # noqa: BLE001 - the thread must outlive any one batch
            pass


rpc.before_calls(flush, take)
