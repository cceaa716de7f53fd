"""How long one request to a reject resource with a wait limit takes against a long queue.

A reject resource decides at once whether a request can be granted within its wait limit, from a
forecast of the queue ahead (:mod:`ray_quota._core.forecast`). This times that decision, on the
pure scheduler and a fake clock, against queues of 100, 1,000 and 4,000 waiters (one per token,
one unit each, on a slow bucket, so all of them wait), and reports each as a ratio to the
100-waiter case of the same run: a bounded forecast keeps the ratios near 1, a whole-queue replay
makes them grow with the queue.

    python -m bench.reject_scan            # 100, 1,000 and 4,000 queued
    python -m bench.reject_scan 100 10000  # other sizes; the first is the reference
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time

from ray_quota._core.scheduler import Scheduler
from ray_quota._spec import Enforcement, Kind, ResourceSpec

SPEC = ResourceSpec("llm", Kind.RATE, value=10, period_s=1.0, burst=10,
                    enforcement=Enforcement.THROTTLE, wait_limit_s=1e6)
REPEATS = 5


def one_request_s(queued: int) -> float:
    """Median seconds of one reject request's admission behind ``queued`` waiters."""
    now = [0.0]
    sched = Scheduler({SPEC.name: SPEC}, clock=lambda: now[0])
    # Queued as throttle (no forecast on admission, so the queue builds fast), then the
    # resource becomes a reject resource with the same wait limit.
    for i in range(queued + SPEC.burst):
        token = sched.open_token(SPEC.name, 1, claimant="c").id
        sched.acquire(token, 0, "c", f"p{i}:1", 1)
    sched.set_limit(dataclasses.replace(SPEC, enforcement=Enforcement.REJECT))
    probe = sched.open_token(SPEC.name, 1, claimant="c").id
    times = []
    for i in range(REPEATS):
        started = time.perf_counter()
        ticket = sched.acquire(probe, 0, "c", f"probe:{i}", 1)
        times.append(time.perf_counter() - started)
        assert ticket.outcome is None, "the probe should wait, well within the wait limit"
        sched.cancel(ticket)  # the queue stays as it was for the next repeat
    return statistics.median(times)


def main(argv: list[str]) -> int:
    sizes = [int(arg) for arg in argv] or [100, 1000, 4000]
    base = one_request_s(sizes[0])
    print(f"{'queued':>8} {'one request':>14} {'ratio':>8}")
    for size in sizes:
        seconds = base if size == sizes[0] else one_request_s(size)
        print(f"{size:>8} {seconds * 1e3:>11.2f} ms {seconds / base:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
