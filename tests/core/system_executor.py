"""The executor of the whole-system model (see ``system_world``): ``ExecutorService`` with a real
SQLite ``StateStore`` whose writes can be made to fail, written before anything is answered, as
the executor actor does; and the resources and timing the model runs with.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fakes import FakeClock

from ray_quota._core.protocol import Grant
from ray_quota._core.resource import Policy
from ray_quota._core.service import ExecutorService
from ray_quota._errors import ExecutorUnavailableError, QuotaError
from ray_quota._spec import Enforcement, Kind, ResourceSpec
from ray_quota._store import StateStore

RATE = ResourceSpec("rate", Kind.RATE, value=50, period_s=1.0, burst=25)
CAP = ResourceSpec("cap", Kind.CAPACITY, value=400, enforcement=Enforcement.REJECT,
                   wait_limit_s=1.0)
CONC = ResourceSpec("conc", Kind.CONCURRENCY, value=3, wait_limit_s=30.0)
# A rate whose requests fail unless their wait estimate is within the wait limit.
QUICK = ResourceSpec("quick", Kind.RATE, value=20, period_s=1.0, burst=10,
                     enforcement=Enforcement.REJECT, wait_limit_s=1.5)
SPECS = {spec.name: spec for spec in (RATE, CAP, CONC, QUICK)}
POLICY = Policy(lease_ttl_s=4.0, orphan_grace_s=6.0)
EPS = 1e-6


class Crashed(Exception):
    """The executor failed to write its state and went down; Ray would restart it."""


class FlakyStore(StateStore):
    """A real store whose next write can be made to fail, as a full or locked disk does."""

    fail_next = False

    def write(self, changes: Any) -> None:
        if self.fail_next:
            self.fail_next = False
            raise sqlite3.OperationalError("database or disk is full")
        super().write(changes)


class Executor:
    """The executor actor's rules around the service: write the outbox's changes first, then
    answer; a failed write takes the executor down (it restarts from what is on disk)."""

    def __init__(self, clock: FakeClock, path: Path) -> None:
        self.clock = clock
        self.path = path
        self.store = FlakyStore(path)
        self.restarts = 0
        ids = itertools.count()
        self._new_id = lambda: f"tok-{next(ids)}"
        self.service = ExecutorService(SPECS, clock=clock, policy=POLICY, new_id=self._new_id)
        self.store.start("cluster", "test")
        self.saved_at = clock.now
        self.waiting: dict[int, Callable[[Grant | QuotaError], None]] = {}
        self.recall: Callable[[str, frozenset[str]], None] = lambda holder, ids: None
        self._deliver()

    def call(self, method: str, *args: Any) -> Any:
        """Make one call; raise its error; raise :class:`Crashed` if its write failed."""
        answer = getattr(self.service, method)(*args)
        self._deliver()
        if isinstance(answer, QuotaError):
            raise answer
        return answer

    def tick(self) -> None:
        self.service.tick()
        self._deliver()

    def restart(self) -> None:
        """Come back from the store, as Ray restarts a dead executor: answers not yet given
        are lost with the old one."""
        self.restarts += 1
        self.store.close()
        self.store = FlakyStore(self.path)
        saved = self.store.load()
        assert saved is not None
        self.service = ExecutorService(SPECS, clock=self.clock, policy=POLICY,
                                       new_id=self._new_id)
        self.service.restore(saved.resources, saved.tokens, saved.leases,
                             elapsed_s=self.clock.now - self.saved_at, ended=saved.ended)
        lost, self.waiting = self.waiting, {}
        for answer in lost.values():
            answer(ExecutorUnavailableError("the executor died before answering"))

    def _deliver(self) -> None:
        outbox = self.service.drain()
        try:
            for changes in outbox.changes:
                self.store.write(changes)
        except sqlite3.Error:
            self.restart()
            raise Crashed() from None
        if outbox.changes:
            self.saved_at = self.clock.now
        for resolved in outbox.resolved:
            answer = self.waiting.pop(resolved.ticket, None)
            if answer is not None:
                answer(resolved.outcome)
        for recall in outbox.recalls:
            self.recall(recall.holder, recall.token_ids)
