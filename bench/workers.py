"""The work every limiter gets, and the records workers keep of what they were granted.

A worker runs in a Ray actor process (or a thread, for the lock counter, which cannot span
processes). It waits for a common start time, loops ``acquire`` / ``release`` until a common stop
time, and records every grant itself, so the checks in :mod:`bench.check` never trust a limiter.
"""

from __future__ import annotations

import random
import threading
import time
from array import array
from typing import Any

from bench.limiters import LockBucket, make_client

BIN_S = 0.001  # grants sent and received inside one such bin are recorded as the bin


class RateRecord:
    """Grants as ``(sent, received, units)`` spans, fast ones folded into 1 ms bins.

    A bin stands for the span ``[bin start, bin end]``: it still contains every folded grant's
    real instant, so the checks stay conservative.
    """

    def __init__(self) -> None:
        self.latency = array("d")
        self.bins: dict[int, int] = {}
        self.sent = array("d")
        self.received = array("d")
        self.units = array("q")

    def add(self, sent: float, received: float, units: int) -> None:
        self.latency.append(received - sent)
        k = int(sent / BIN_S)
        if received < (k + 1) * BIN_S:
            self.bins[k] = self.bins.get(k, 0) + units
        else:
            self.sent.append(sent)
            self.received.append(received)
            self.units.append(units)

    def export(self) -> dict[str, Any]:
        spans = [(k * BIN_S, (k + 1) * BIN_S, u) for k, u in self.bins.items()]
        spans += zip(self.sent, self.received, self.units)
        return {"latency": self.latency.tobytes(), "spans": spans,
                "grants": len(self.latency), "units": sum(u for *_, u in spans)}


def wait_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def rate_loop(client: Any, amount: int, start_at: float, stop_at: float) -> dict[str, Any]:
    record = RateRecord()
    clock = time.monotonic
    wait_until(start_at)
    while (sent := clock()) < stop_at:
        handle = client.acquire(amount)
        received = clock()
        client.release(handle, amount, amount)
        record.add(sent, received, amount)
    out = record.export()
    out["stopped"] = clock()
    return out


def slot_loop(client: Any, start_at: float, stop_at: float, hold_s: tuple[float, float],
              seed: int) -> dict[str, Any]:
    """Hold one slot for a random time, release, repeat; holds are (granted, released, 1)."""
    rng = random.Random(seed)
    latency = array("d")
    holds: list[tuple[float, float, int]] = []
    clock = time.monotonic
    wait_until(start_at)
    while (sent := clock()) < stop_at:
        handle = client.acquire(1)
        granted = clock()
        time.sleep(rng.uniform(*hold_s))
        released = clock()
        client.release(handle, 1, 1)
        latency.append(granted - sent)
        holds.append((granted, released, 1))
    return {"latency": latency.tobytes(), "holds": holds, "grants": len(holds),
            "stopped": clock()}


def run_client(client: Any, job: dict[str, Any], start_at: float, stop_at: float,
               seed: int = 0) -> dict[str, Any]:
    """Run one worker's share of a scenario with an already built client, then close it."""
    try:
        if job["limit"].kind == "concurrency":
            return slot_loop(client, start_at, stop_at, job["hold_s"], seed)
        return rate_loop(client, job["amount"], start_at, stop_at)
    finally:
        client.close()


def build(job: dict[str, Any], token: Any = None, bucket: LockBucket | None = None) -> Any:
    return make_client(job["limiter"], job["limit"], token=token, actor=job.get("actor"),
                       bucket=bucket, redis_url=job.get("redis_url"), key=job.get("key"))


class Worker:
    """One benchmark process; made a Ray actor by :func:`start_workers`.

    ``prepare`` builds the limiter's client (connections, imports) before the common start
    time is even chosen, so no worker starts late; ``go`` runs it.
    """

    def __init__(self) -> None:
        self._job: dict[str, Any] | None = None
        self._clients: list[Any] = []
        self._seed = 0

    def ready(self) -> str:
        """Import what the limiters need; say where ray_quota comes from (as in the executor)."""
        import limits.strategies  # noqa: F401
        import pyrate_limiter  # noqa: F401
        import redis  # noqa: F401

        import ray_quota

        return ray_quota.__file__

    def prepare(self, job: dict[str, Any], token: Any = None, seed: int = 0,
                threads: int = 1) -> None:
        """Build the client; ``threads`` > 1 builds that many sharing one lock counter."""
        self._job, self._seed = job, seed
        if threads > 1:
            bucket = LockBucket(job["limit"])
            self._clients = [build(job, bucket=bucket) for _ in range(threads)]
        else:
            self._clients = [build(job, token=token)]

    def go(self, start_at: float, stop_at: float) -> list[dict[str, Any]]:
        job, clients = self._job, self._clients
        assert job is not None
        self._job, self._clients = None, []
        if len(clients) == 1:
            return [run_client(clients[0], job, start_at, stop_at, self._seed)]
        results: list[dict[str, Any]] = [{} for _ in clients]

        def one(i: int) -> None:
            results[i] = run_client(clients[i], job, start_at, stop_at, self._seed + i)

        pool = [threading.Thread(target=one, args=(i,)) for i in range(len(clients))]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        return results


def start_workers(n: int) -> tuple[list[Any], str]:
    """``n`` worker actors, and where they import ray_quota from."""
    import ray

    actor: Any = ray.remote(num_cpus=0)(Worker)
    workers = [actor.remote() for _ in range(n)]
    where = ray.get([w.ready.remote() for w in workers])
    return workers, where[0]
