"""This process's background work: a renewer thread that reports and renews every token's leases
once an interval, a watch thread that hears recalls, and a last flush when the process ends.

Each renewal also *names* the tokens this process keeps without a lease (see
:func:`~ray_quota._core.protocol.name_key`), so that the executor keeps them: every live handle
it holds idle, and every token it sent away (pickled) that nobody has taken up yet. Ray owns a
task's arguments by the process that submitted it, so a token on its way to a task that has not
started (queued for minutes, say) is named by its sender; once taken up, by its receiver. A
``@quota`` task's tokens are named until the task's result is ready (it ended, whichever way):
until then a Ray retry may take them up again.

The intervals are read from this module at each use, so a test may change them here.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import ray
import ray.exceptions

from ray_quota._core.protocol import (
    RENEW_INTERVAL_S,
    WATCH_TIMEOUT_S,
    Renewed,
    Report,
    name_key,
)
from ray_quota._errors import QuotaError
from ray_quota._observability import observe as _observe
from ray_quota._runtime import giveback, routing, rpc
from ray_quota._runtime.identity import HOLDER, SECRET

if TYPE_CHECKING:
    from ray_quota._token import QuotaToken


class _Process:
    renewer: Renewer | None = None
    lock = threading.Lock()


def current() -> Renewer | None:
    """This process's renewer, once a token asked the executor for units."""
    return _Process.renewer


def track(token: QuotaToken) -> None:
    """Have this process's renewer settle and renew the token's leases, and name it while it
    holds none."""
    _started().add(token)


def sent(token_id: str, generation: int) -> None:
    """This process pickled the token, whose bytes carry ``generation``: name it until it is
    taken up there (or, see :func:`until_done`, until a task ends)."""
    _started().sent(token_id, generation)


def until_done(token_ids: Iterable[str], ref: Any) -> None:
    """The tokens just sent are a task's: name them until ``ref``, its result, is ready."""
    _started().until_done(token_ids, ref)


def _started() -> Renewer:
    """This process's renewer, started with its watch thread if need be."""
    with _Process.lock:
        renewer = _Process.renewer
        if renewer is None:
            renewer = _Process.renewer = Renewer()
            renewer.start()
            threading.Thread(target=_watch, args=(renewer,), name="ray_quota-recalls",
                             daemon=True).start()
            routing.when_broker_fails(renewer.adopt_all)
            atexit.register(flush)
            _flush_when_actor_exits()
    return renewer


def flush() -> None:
    """Settle every lease of this process now (tests and clean exits); quiet if nobody listens
    (Ray shut down, or the executor gone): at exit, a traceback would only be noise."""
    if _Process.renewer is not None and ray.is_initialized():
        try:
            _Process.renewer.flush()
        except (QuotaError, ray.exceptions.RayError):
            pass


class Renewer(threading.Thread):
    """Every interval: report what each token's lease used, give back spare, renew the rest."""

    def __init__(self) -> None:
        super().__init__(name="ray_quota-renewer", daemon=True)
        self._tokens: weakref.WeakSet[QuotaToken] = weakref.WeakSet()
        # Tokens sent away and not known to be taken up: id -> [generation, task result or None]
        self._sent: dict[str, list[Any]] = {}
        self._sent_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._last = threading.Event()  # the process is ending: flush once more, then stop
        self._done = threading.Event()

    def add(self, token: QuotaToken) -> None:
        self._tokens.add(token)

    def sent(self, token_id: str, generation: int) -> None:
        with self._sent_lock:
            self._sent[token_id] = [generation, None]

    def until_done(self, token_ids: Iterable[str], ref: Any) -> None:
        with self._sent_lock:
            for token_id in token_ids:
                if (entry := self._sent.get(token_id)) is not None:
                    entry[1] = ref

    def _names(self) -> list[Report]:
        """Names of the tokens sent and not taken up; those of tasks that ended are dropped."""
        with self._sent_lock:
            refs = [entry[1] for entry in self._sent.values() if entry[1] is not None]
            done = set(ray.wait(refs, num_returns=len(refs), timeout=0,
                                fetch_local=False)[0]) if refs else set()
            for token_id, (_, ref) in list(self._sent.items()):
                if ref is not None and ref in done:
                    del self._sent[token_id]
            return [_name(token_id, entry) for token_id, entry in self._sent.items()]

    def _names_answered(self, names: list[Report], alive: Renewed) -> None:
        """Stop naming the tokens the answer no longer keeps (taken up, or gone), unless sent
        again since."""
        with self._sent_lock:
            for report in names:
                entry = self._sent.get(report.token_id)
                if entry is not None and (report.token_id, report.key) not in alive \
                        and _name(report.token_id, entry) == report:
                    del self._sent[report.token_id]

    def recall(self, token_ids: set[str]) -> None:
        reports = [report for token in list(self._tokens) if token._id in token_ids
                   and (report := token._recall())]
        if reports:
            routing.send("settle", reports)

    def adopt_all(self) -> None:
        """Take every brokered lease of this process over directly (the broker failed)."""
        tokens = list(self._tokens)
        entries = [entry for token in tokens for entry in token._adoptions()]
        adopted = set(rpc.call("adopt", entries, SECRET)) if entries else set()
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
        giveback.flush()  # before the renewal, which no longer names what they gave back
        with self._flush_lock:
            tokens = list(self._tokens)
            names = self._names()
            observed = _observe.drain()  # metrics travel with the renewal
            if not tokens and not names and observed is None:
                return
            sent_at = time.monotonic()
            for token in tokens:
                token._take_up_if_idle(sent_at)
            reports = [report for token in tokens for report in token._reports(sent_at)]
            try:
                alive = routing.lease_call("renew", HOLDER, reports + names, observed)
            except BaseException:
                _observe.restore(observed)  # the next renewal carries them
                raise
            for token in tokens:
                token._renewed(alive, sent_at)
            self._names_answered(names, alive)


def _name(token_id: str, entry: list[Any]) -> Report:
    """The name of a token sent at a generation, or of a task's token (kept while the task has
    not ended, taken up or not: a Ray retry takes it up again)."""
    generation, ref = entry
    return Report(token_id, name_key(HOLDER, None if ref is not None else generation), 0, 0, 0,
                  False)


def _watch(renewer: Renewer) -> None:
    """Keep one call open at the executor that answers when our spare units should go back."""
    while not _actor_exiting():
        try:
            recalled = routing.lease_call("watch", HOLDER, WATCH_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - no executor right now; renewals still shrink leases
            time.sleep(RENEW_INTERVAL_S)
            continue
        if recalled:
            renewer.recall(set(recalled))


# ------------------------------------------------------------------- an actor on its way out


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
            renewer = _Process.renewer
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
