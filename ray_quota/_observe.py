"""What this process observed about its reservations, until the next lease renewal carries it away.

Plain counts, no prometheus_client: the hot path pays for one short lock, a dict look-up, a bucket
index and a few integer increments. The renewer drains the counts into ``renew`` once a second (and
once more at exit); the executor merges them into the cluster's one metrics registry.

Example:
    >>> acc = Accumulator()
    >>> acc.reserved("cluster-1", "llm-tokens", "team-a", LOCAL, GRANTED, 500, 0.000004)
    >>> acc.committed("cluster-1", "llm-tokens", "team-a", 500, 312)
    >>> batch = acc.drain()     # then None until more is observed
"""

from __future__ import annotations

import threading
from bisect import bisect_left

# Upper bounds (seconds) of the reservation latency buckets: from a local lease (microseconds)
# to a long throttled wait. The executor's histogram uses the same bounds; +Inf is implicit.
BUCKETS: tuple[float, ...] = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
_N = len(BUCKETS)
SUM = _N + 1  # index of the seconds total in a latency record, after the +Inf bucket
UNITS = _N + 2  # index of the units granted

LOCAL = "local"
EXECUTOR = "executor"
PATHS = (LOCAL, EXECUTOR)
GRANTED = "granted"
REJECTED = "rejected"
TERMINATED = "terminated"
TIMEOUT = "timeout"
OUTCOMES = (GRANTED, REJECTED, TERMINATED, TIMEOUT)

# (cluster id, resource, label, path, outcome) -> [count per bucket..., +Inf, seconds, units]
LatencyKey = tuple[str, str, str | None, str, str]
# (cluster id, resource, label) -> [committed, refunded, overused]
UnitsKey = tuple[str, str, str | None]
Batch = tuple[dict[LatencyKey, list[float]], dict[UnitsKey, list[float]]]


class Accumulator:
    """Counts of one process's reservations, drained as a :data:`Batch` and sent on.

    The cluster id in every key lets an executor ignore what was observed on tokens of another
    executor (a process that outlived the one it talked to).
    """

    __slots__ = ("_lock", "_latency", "_units")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latency: dict[LatencyKey, list[float]] = {}
        self._units: dict[UnitsKey, list[float]] = {}

    def reserved(self, cluster: str, resource: str, label: str | None, path: str, outcome: str,
                 units: int, seconds: float) -> None:
        """One reservation ended with ``outcome`` after ``seconds``; ``units`` were granted."""
        key = (cluster, resource, label, path, outcome)
        index = bisect_left(BUCKETS, seconds)  # bucket "le" bounds are inclusive
        with self._lock:
            record = self._latency.get(key)
            if record is None:
                record = self._latency[key] = [0.0] * (_N + 3)
            record[index] += 1
            record[SUM] += seconds
            record[UNITS] += units

    def committed(self, cluster: str, resource: str, label: str | None, amount: int,
                  used: int) -> None:
        """A reservation of ``amount`` was committed as ``used``."""
        key = (cluster, resource, label)
        with self._lock:
            record = self._units.get(key)
            if record is None:
                record = self._units[key] = [0.0, 0.0, 0.0]
            record[0] += used
            if used < amount:
                record[1] += amount - used
            elif used > amount:
                record[2] += used - amount

    def drain(self) -> Batch | None:
        """Everything observed since the last drain, or None if nothing was."""
        with self._lock:
            if not self._latency and not self._units:
                return None
            batch = (self._latency, self._units)
            self._latency, self._units = {}, {}
        return batch

    def restore(self, batch: Batch | None) -> None:
        """Put a drained batch back (its renewal failed), so that the next one carries it."""
        if batch is None:
            return
        latency, units = batch
        with self._lock:
            for key, counts in latency.items():
                _add(self._latency.setdefault(key, [0.0] * (_N + 3)), counts)
            for ukey, ucounts in units.items():
                _add(self._units.setdefault(ukey, [0.0, 0.0, 0.0]), ucounts)


def _add(into: list[float], counts: list[float]) -> None:
    for i, count in enumerate(counts):
        into[i] += count


# The process's accumulator; the token API feeds it and the renewer drains it.
ACCUMULATOR = Accumulator()
reserved = ACCUMULATOR.reserved
committed = ACCUMULATOR.committed
drain = ACCUMULATOR.drain
restore = ACCUMULATOR.restore
