"""What the executor and a broker share in the model: one thread, a core timer, a recall
watch for each holder below, and answers that leave when a job ends.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

from bench.scale_model.params import Params, Stats
from bench.scale_model.sim import CoreTimer, Reply, Server, Sim
from ray_quota._core.protocol import (
    WATCH_TIMEOUT_S,
    Report,
)
from ray_quota._core.watches import Watches

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
    """What the executor and a broker share: one thread (a :class:`Server`), a core timer, the
    open recall watches of those below (the real :class:`Watches`), and answers that leave when
    a job ends."""

    def __init__(self, sim: Sim, params: Params, stats: Stats, *, hop_s: float,
                 call_s: float) -> None:
        self._sim = sim
        self._params = params
        self._stats = stats
        self.server = Server(sim, stats.window)
        self.timer = CoreTimer(sim, stats.window, params.core_time_s)
        self._watches: Watches[Reply] = Watches()  # as the actor's RecallBoard keeps them
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
        answer, replaced = self._watches.watch(holder, reply)
        if answer is None:
            self._sim.after(WATCH_TIMEOUT_S, self._watch_timeout, holder, reply)
        woken: list[tuple[Reply, list[str]]] = [] if replaced is None else [(replaced, [])]
        return self._answer(self._call_s, reply, answer, woken)

    def _watch_timeout(self, holder: str, reply: Reply) -> None:
        if self._watches.close(holder, reply):
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
