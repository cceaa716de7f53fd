"""A connection limit with ``throttle``: at most 8 requests open at once, across the cluster.

``llm-requests`` in examples/quota.yaml is a concurrency limit: a reservation holds slots until it
is committed (here, when the ``with`` block ends). Three threaded actors each serve up to six
requests at once, more than the limit in total; each request holds a "connection" for a random
time. Requests beyond the limit wait their turn instead of failing, and the most ever open at
once never exceeds the limit.

    python examples/connection_pool.py          # 48 requests to 3 actors of 6 threads
    python examples/connection_pool.py 200
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any

import ray

import ray_quota
from ray_quota import QuotaToken

MANIFEST = Path(__file__).resolve().parent / "quota.yaml"
RESOURCE = "llm-requests"  # concurrency 8, throttle
CLIENTS = 3
THREADS = 6  # per client: 18 would-be connections against a limit of 8


@ray.remote(num_cpus=0.5, max_concurrency=THREADS)
class Client:
    """A threaded actor: up to THREADS requests at once, all under the actor's one token."""

    def __init__(self, token: QuotaToken) -> None:
        self.token = token  # moved into this actor when it was created

    def request(self, hold_s: float) -> tuple[float, float]:
        """Hold a connection for ``hold_s`` seconds; returns when it was open."""
        with self.token.reserve(1):  # one connection; waits while all are taken
            opened = time.time()
            time.sleep(hold_s)  # talk to the server
            return opened, time.time()

    def close(self) -> None:
        self.token.close()


def most_open_at_once(intervals: list[tuple[float, float]]) -> int:
    """The largest number of intervals that overlap at any instant."""
    events = sorted([(opened, 1) for opened, _ in intervals] +
                    [(closed, -1) for _, closed in intervals])  # at a tie, close before open
    most = current = 0
    for _, change in events:
        current += change
        most = max(most, current)
    return most


def run(size: int, limit: int) -> dict[str, Any]:
    rng = random.Random(0)
    with QuotaToken(RESOURCE, expected_use=CLIENTS * THREADS, label="connection-pool") as pool:
        clients = [Client.remote(pool.split(THREADS)) for _ in range(CLIENTS)]
    intervals = ray.get([clients[i % CLIENTS].request.remote(rng.uniform(0.02, 0.1))
                         for i in range(size)])
    ray.get([c.close.remote() for c in clients])
    for c in clients:
        ray.kill(c)
    most = most_open_at_once(intervals)
    print(f"{len(intervals)} requests from {CLIENTS} actors x {THREADS} threads; at most {most} "
          f"connections open at once (limit {limit})")
    return {"requests": len(intervals), "most_open": most, "limit": limit,
            "would_be": CLIENTS * THREADS}


def main(size: int = 48) -> dict[str, Any]:
    """Make ``size`` requests under the connection limit; returns the most open at once."""
    ray_was_running = ray.is_initialized()
    info = ray_quota.init(manifest=MANIFEST, environment="local")  # starts a Ray if none runs
    try:
        return run(size, info.resources[RESOURCE].value)
    finally:
        if not ray_was_running:
            ray.shutdown()  # a local Ray takes its executor with it


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:2]))
