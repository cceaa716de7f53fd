"""The discrete-event clock and the pieces every simulated server is made of: a reply that
crosses a hop, the measured window, a single-threaded server, and a timer of core CPU time.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class Sim:
    """A heap of events on a fake clock; ``now`` moves only from one event to the next."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self.events = 0

    def __call__(self) -> float:
        return self.now  # the scheduler's clock

    def at(self, when: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._heap, (max(when, self.now), next(self._seq), fn, args))

    def after(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        self.at(self.now + delay, fn, *args)

    def run(self, until: float, done: Callable[[], bool],
            progress: Callable[[float], None] | None = None) -> None:
        """Process events in time order until ``until`` or until ``done()`` says so;
        ``progress(now)`` is called every 10 simulated seconds."""
        heap = self._heap
        report_at = 10.0
        while heap and heap[0][0] <= until:
            when, _, fn, args = heapq.heappop(heap)
            self.now = when
            fn(*args)
            self.events += 1
            if done():
                return
            if progress is not None and when >= report_at:
                progress(when)
                report_at += 10.0


@dataclass(frozen=True, slots=True)
class Reply:
    """Where an answer goes: ``fn(value)``, called ``hop_s`` after the server sends it."""

    fn: Callable[[Any], None]
    hop_s: float

    def send(self, sim: Sim, at: float, value: Any) -> None:
        sim.at(at + self.hop_s, self.fn, value)


class Window:
    """The measured interval, and what servers did inside it."""

    def __init__(self, start: float, end: float) -> None:
        self.start, self.end = start, end

    @property
    def length(self) -> float:
        return self.end - self.start

    def overlap(self, start: float, end: float) -> float:
        return max(0.0, min(end, self.end) - max(start, self.start))

    def holds(self, t: float) -> bool:
        return self.start <= t < self.end


class Server:
    """One thread serving jobs in arrival order. A job runs at its start time and returns its
    cost in seconds; the next job starts when that cost has elapsed."""

    def __init__(self, sim: Sim, window: Window) -> None:
        self._sim = sim
        self._window = window
        self._queue: deque[tuple[float, Callable[[], float]]] = deque()
        self._running = False
        self.busy_s = 0.0  # inside the window
        self.max_backlog = 0  # the most jobs waiting at once, inside the window
        self.waited_s = 0.0  # time jobs started in the window spent queued
        self.started = 0  # jobs started in the window

    def submit(self, job: Callable[[], float]) -> None:
        self._queue.append((self._sim.now, job))
        if not self._running:
            self._next()
        elif len(self._queue) > self.max_backlog and self._window.holds(self._sim.now):
            self.max_backlog = len(self._queue)

    def _next(self) -> None:
        submitted, job = self._queue.popleft()
        self._running = True
        now = self._sim.now
        if self._window.holds(now):
            self.waited_s += now - submitted
            self.started += 1
        cost = job()
        self.busy_s += self._window.overlap(now, now + cost)
        self._sim.at(now + cost, self._finished)

    def _finished(self) -> None:
        self._running = False
        if self._queue:
            self._next()


class CoreTimer:
    """The CPU time the real core takes, or a fixed figure when the run asks for one."""

    def __init__(self, sim: Sim, window: Window, fixed: float | None) -> None:
        self._sim = sim
        self._window = window
        self._fixed = fixed
        self._started = 0.0
        self.in_window_s = 0.0
        self.by_what: defaultdict[str, float] = defaultdict(float)  # core s in the window, by job
        self.count: Counter[str] = Counter()

    def start(self) -> None:
        self._started = time.thread_time()

    def stop(self, what: str = "") -> float:
        """The core time since :meth:`start`, counted against ``what`` (a method, say)."""
        spent = time.thread_time() - self._started
        if self._fixed is not None:
            spent = self._fixed
        if self._window.holds(self._sim.now):
            self.in_window_s += spent
            self.by_what[what] += spent
            self.count[what] += 1
        return spent
