"""What this process observed about its reservations, until the next lease renewal carries it away.

Plain counts, no prometheus_client and no lock on the hot path: a dict look-up, a bucket index and
a few increments. The renewer drains the counts into ``renew`` once a second (and once more when
the process ends normally); the executor merges them into the cluster's one metrics registry.

Example:
    >>> acc = Accumulator()
    >>> acc.reserved("cluster-1", "llm-tokens", "team-a", LOCAL, GRANTED, 500, 0.000004)
    >>> acc.committed("cluster-1", "llm-tokens", "team-a", 500, 312)
    >>> batch = acc.drain()     # then None until more is observed
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from typing import Any

from ray_quota._spec import MAX_NAME

# Upper bounds (seconds) of the reservation latency buckets: from a local lease (microseconds)
# to a long throttled wait. The executor's histogram uses the same bounds; +Inf is implicit.
BUCKETS: tuple[float, ...] = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
_N = len(BUCKETS)
_FIRST = BUCKETS[0]
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

    No lock on the hot path: each thread counts into its own records, which only it writes, and
    which only grow. A drain reads every thread's records and takes what grew since the last
    drain; an increment it misses is taken by the next one. Writes are single bytecodes on
    lists of floats, so a concurrent read sees each count whole.

    The cluster id in every key lets an executor ignore what was observed on tokens of another
    executor (a process that outlived the one it talked to).
    """

    __slots__ = ("_local", "_lock", "_pending", "_stores")

    def __init__(self) -> None:
        self._local = threading.local()
        self._stores: list[_Store] = []
        self._lock = threading.Lock()  # drains and restores, and a thread's first count
        self._pending: Batch = ({}, {})  # drained, sent, failed: the next drain carries it

    def reserved(self, cluster: str, resource: str, label: str | None, path: str, outcome: str,
                 units: int, seconds: float) -> None:
        """One reservation ended with ``outcome`` after ``seconds``; ``units`` were granted."""
        try:
            latency = self._local.latency
        except AttributeError:
            latency = self._store().latency
        key = (cluster, resource, label, path, outcome)
        record = latency.get(key)
        if record is None:
            record = latency[key] = [0.0] * (_N + 3)
        # Bucket "le" bounds are inclusive; a local lease answers within the first bucket.
        record[0 if seconds <= _FIRST else bisect_left(BUCKETS, seconds)] += 1
        record[-2] += seconds  # SUM, UNITS: constant indexes are cheaper than globals here
        record[-1] += units

    def committed(self, cluster: str, resource: str, label: str | None, amount: int,
                  used: int) -> None:
        """A reservation of ``amount`` was committed as ``used``."""
        try:
            units = self._local.units
        except AttributeError:
            units = self._store().units
        key = (cluster, resource, label)
        record = units.get(key)
        if record is None:
            record = units[key] = [0.0, 0.0, 0.0]
        record[0] += used
        if used < amount:
            record[1] += amount - used
        elif used > amount:
            record[2] += used - amount

    def drain(self) -> Batch | None:
        """Everything observed since the last drain, or None if nothing was."""
        with self._lock:
            latency, units = self._pending
            self._pending = ({}, {})
            for store in list(self._stores):
                alive = store.thread.is_alive()  # before reading: a dead thread writes no more
                _take(store.latency, store.sent_latency, latency)
                _take(store.units, store.sent_units, units)
                if not alive:
                    self._stores.remove(store)
        return (latency, units) if latency or units else None

    def restore(self, batch: Batch | None) -> None:
        """Put a drained batch back (its renewal failed), so that the next drain carries it."""
        if batch is None:
            return
        latency, units = batch
        with self._lock:
            for key, counts in latency.items():
                _add(self._pending[0], key, counts)
            for ukey, ucounts in units.items():
                _add(self._pending[1], ukey, ucounts)

    def _store(self) -> _Store:
        store = _Store(threading.current_thread())
        with self._lock:
            self._stores.append(store)
        self._local.latency, self._local.units = store.latency, store.units
        return store


class _Store:
    """One thread's running totals, and what of them was drained already."""

    __slots__ = ("latency", "sent_latency", "sent_units", "thread", "units")

    def __init__(self, thread: threading.Thread) -> None:
        self.thread = thread
        self.latency: dict[LatencyKey, list[float]] = {}
        self.units: dict[UnitsKey, list[float]] = {}
        self.sent_latency: dict[LatencyKey, list[float]] = {}
        self.sent_units: dict[UnitsKey, list[float]] = {}


def _take(totals: dict[Any, list[float]], sent: dict[Any, list[float]],
          into: dict[Any, list[float]]) -> None:
    """Add to ``into`` what ``totals`` gained since ``sent``, and remember it as sent."""
    for key, record in totals.copy().items():  # copies are atomic: the owner may be counting
        now = record[:]
        before = sent.get(key)
        delta = now if before is None else [a - b for a, b in zip(now, before)]
        if any(delta):
            _add(into, key, delta)
            sent[key] = now


def _add(into: dict[Any, list[float]], key: Any, counts: list[float]) -> None:
    mine = into.get(key)
    if mine is None:
        into[key] = list(counts)
    else:
        for i, count in enumerate(counts):
            mine[i] += count


# ------------------------------------------------------------ checks where a batch is received
# A batch comes from another process (with its renewal), so from outside the trust boundary:
# what is not well formed is dropped, and counted, before it can reach a histogram or counter.


def clean(batch: object) -> tuple[Batch | None, int]:
    """The well-formed entries of a batch another process sent, and how many were dropped.

    Well formed: keys of strings (a label as long as a resource name may be, path and outcome
    among the known ones) and records of the right length whose counts are finite numbers
    from 0 (a NaN would poison a histogram until restart).

    Example:
        >>> clean(({("c", "tok", None, LOCAL, GRANTED): [float("nan")] * (len(BUCKETS) + 3)},
        ...        {("c", "tok", "team"): [1.0, 0.0, 0.0]}))
        (({}, {('c', 'tok', 'team'): [1.0, 0.0, 0.0]}), 1)
    """
    if batch is None:
        return None, 0
    if not (isinstance(batch, tuple) and len(batch) == 2
            and all(isinstance(part, dict) for part in batch)):
        return None, 1
    latency = {key: record for key, record in batch[0].items()
               if _key(key, 5) and key[3] in PATHS and key[4] in OUTCOMES
               and _record(record, _N + 3)}
    units = {key: record for key, record in batch[1].items()
             if _key(key, 3) and _record(record, 3)}
    dropped = len(batch[0]) + len(batch[1]) - len(latency) - len(units)
    return ((latency, units) if latency or units else None), dropped


def _key(key: object, size: int) -> bool:
    """(cluster, resource, label, ...): strings of at most a name's length, a label or None."""
    if not isinstance(key, tuple) or len(key) != size:
        return False
    return all((item is None and i == 2) or (isinstance(item, str) and len(item) <= MAX_NAME)
               for i, item in enumerate(key))


def _record(record: object, size: int) -> bool:
    return isinstance(record, list) and len(record) == size and all(map(_count, record))


def _count(count: object) -> bool:
    if type(count) is float:
        return math.isfinite(count) and count >= 0
    return type(count) is int and 0 <= count <= 2**53


# The process's accumulator; the token API feeds it and the renewer drains it.
ACCUMULATOR = Accumulator()
reserved = ACCUMULATOR.reserved
committed = ACCUMULATOR.committed
drain = ACCUMULATOR.drain
restore = ACCUMULATOR.restore
