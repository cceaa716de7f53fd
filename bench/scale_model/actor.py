"""What the executor and a broker share in the model: one thread, a core timer, a recall
board for the watches of those below, and answers that leave when a job ends.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from bench.scale_model.params import Params, Stats
from bench.scale_model.sim import CoreTimer, Reply, Server, Sim
from ray_quota._core.protocol import (
    WATCH_TIMEOUT_S,
    Report,
)


class Board:
    """Recalls waiting for their holders, as ``RecallBoard``: one open watch per holder."""

    def __init__(self) -> None:
        self._watchers: dict[str, tuple[int, Reply]] = {}
        self._posted: dict[str, set[str]] = {}
        self._ids = itertools.count()

    def wait(self, holder: str, reply: Reply) -> tuple[list[str] | None, list[tuple[Reply, list[str]]],
                                                       int]:
        """Register a watch: (an answer now or None, watchers to answer [] now, watch id)."""
        if holder in self._posted:
            return sorted(self._posted.pop(holder)), [], -1
        replaced = self._watchers.pop(holder, None)
        watch_id = next(self._ids)
        self._watchers[holder] = (watch_id, reply)
        return None, [(replaced[1], [])] if replaced else [], watch_id

    def post(self, holder: str, token_ids: Iterable[str]) -> list[tuple[Reply, list[str]]]:
        """Tell ``holder`` these tokens are recalled; returns the watch to answer, if open."""
        watcher = self._watchers.pop(holder, None)
        if watcher is not None:
            return [(watcher[1], sorted(token_ids))]
        self._posted.setdefault(holder, set()).update(token_ids)
        return []

    def expire(self, holder: str, watch_id: int) -> Reply | None:
        """The watch timed out; its reply, if it is still open."""
        watcher = self._watchers.get(holder)
        if watcher is None or watcher[0] != watch_id:
            return None
        del self._watchers[holder]
        return watcher[1]


# ------------------------------------------------------------------------- the lease calls


class LeaseService(Protocol):
    """The lease calls a process makes: to the executor directly, or to its node's broker."""

    hop_s: float

    def acquire(self, reply: Reply, token_id: str, generation: int, claimant: str, key: str,
                amount: int, prefetch: int) -> None: ...

    def settle(self, reports: list[Report]) -> None: ...

    def renew(self, reply: Reply, holder: str, reports: list[Report], observed: bool) -> None: ...

    def watch(self, reply: Reply, holder: str) -> None: ...

    def merge_back(self, reply: Reply, token_id: str, generation: int, claimant: str,
                   parent_id: str, reports: list[Report]) -> None: ...


class Actor:
    """What the executor and a broker share: one thread (a :class:`Server`), a core timer, a
    recall board for the watches of those below, and answers that leave when a job ends."""

    def __init__(self, sim: Sim, params: Params, stats: Stats, *, hop_s: float,
                 call_s: float) -> None:
        self._sim = sim
        self._params = params
        self._stats = stats
        self.server = Server(sim, stats.window)
        self.timer = CoreTimer(sim, stats.window, params.core_time_s)
        self._board = Board()
        self._outbox: list[tuple[float, Callable[..., None], tuple[Any, ...]]] = []
        self.hop_s = hop_s  # from a caller to this actor, one way
        self._call_s = call_s

    def watch(self, reply: Reply, holder: str) -> None:
        """The long poll: answered by a recall, or with [] after the watch timeout."""
        self._count("watch")
        self.server.submit(functools.partial(self._watch_job, reply, holder))

    def _count(self, method: str) -> None:
        raise NotImplementedError

    def _watch_job(self, reply: Reply, holder: str) -> float:
        answer, woken, watch_id = self._board.wait(holder, reply)
        if answer is None:
            self._sim.after(WATCH_TIMEOUT_S, self._watch_timeout, holder, watch_id)
        return self._answer(self._call_s, reply, answer, woken)

    def _watch_timeout(self, holder: str, watch_id: int) -> None:
        reply = self._board.expire(holder, watch_id)
        if reply is not None:
            self.server.submit(lambda: self._answer(self._params.reply_s, reply, [], []))

    def _send(self, hop_s: float, call: Callable[..., None], *args: Any) -> None:
        """A call to another actor: it leaves when the current job ends."""
        self._outbox.append((hop_s, call, args))

    def _answer(self, cost: float, reply: Reply | None, result: Any,
                woken: list[tuple[Reply, list[str]]]) -> float:
        """Send the job's answer (None: no answer yet), the watches it woke (each adds a reply
        cost) and its calls when it ends; returns the job's cost."""
        cost += len(woken) * self._params.reply_s
        end = self._sim.now + cost
        if reply is not None and result is not None:
            reply.send(self._sim, end, result)
        for watcher, token_ids in woken:
            watcher.send(self._sim, end, token_ids)
        for hop_s, call, args in self._outbox:
            self._sim.at(end + hop_s, call, *args)
        self._outbox.clear()
        return cost
