"""Fan-out: ``@ray_quota.quota`` tasks against the same plain Ray tasks, in one run (issue 15).

    python -m bench.fanout                 # 1,000 tasks each way
    python -m bench.fanout -n 200 --json   # smaller, one JSON line

Each task reserves 5 and commits 3 against a limit far above demand; the decorated ones run
inside a parent token's scope, so each is given a split of it. Reported per task: the whole
fan-out's wall time (submit all, wait for all), the driver's submission loop alone, and the
executor calls the decorated run made (every method, over the tasks' ends too: the count is
taken once the parent's expected use is whole again). Also the p50 of one ``split`` and one
``QuotaToken(...)`` open, each a synchronous executor call today.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

try:
    from ray_quota._runtime.packed import BATCHED
except ImportError:  # measuring a copy from before give-backs were batched
    BATCHED = "give_back.operations"

MANIFEST = {"environments": {"fanout": {
    "tok": {"limit": {"type": "rate", "value": 100_000_000, "period": "second",
                      "burst": 100_000_000}}}}}
PARENT_USE = 1_000_000


def plain_body(resource: str) -> str:
    return resource


def quota_body(resource: str) -> str:
    import ray_quota

    with ray_quota.current_token(resource).reserve(5) as reservation:
        reservation.commit(3)
    return resource


def fan_out(remote: Any, n: int, resource: str) -> tuple[float, float]:
    """Wall time and the submission loop's time, in seconds, for ``n`` tasks."""
    import ray

    start = time.perf_counter()
    refs = [remote.remote(resource) for _ in range(n)]
    submitted = time.perf_counter()
    ray.get(refs)
    return time.perf_counter() - start, submitted - start


def calls(executor: Any) -> dict[str, int]:
    import ray

    return dict(ray.get(executor.call_counts.remote()))


def measure(n: int, resource: str = "tok") -> dict[str, Any]:
    """The figures of one run, on ``resource`` of the running executor (far above demand)."""
    import ray

    import ray_quota
    from ray_quota._runtime import rpc

    plain = ray.remote(num_cpus=0.5)(plain_body)
    decorated = ray_quota.quota(resource, expected_use=10)(ray.remote(num_cpus=0.5)(quota_body))
    executor = rpc.executor()
    with ray_quota.QuotaToken(resource, expected_use=PARENT_USE) as parent:
        fan_out(plain, 50, resource)  # warm workers, imports and caches on both sides
        fan_out(decorated, 50, resource)
        plain_wall, plain_submit = fan_out(plain, n, resource)
        before = calls(executor)
        quota_wall, quota_submit = fan_out(decorated, n, resource)
        deadline = time.monotonic() + 30
        while parent.describe()[0] != PARENT_USE and time.monotonic() < deadline:
            time.sleep(0.05)  # the tasks' give-backs, queued at their ends
        after = calls(executor)
        by_method = {m: after.get(m, 0) - before.get(m, 0) for m in after}
        by_method = {m: c for m, c in by_method.items() if c and m != "describe"}
        # Operations that came in a give_back batch are counted by method and in BATCHED; the
        # batch itself as one give_back call.
        batched = by_method.pop(BATCHED, 0)
        split_p50 = p50_of(lambda: parent.split(1).close(), 200)
    open_p50 = p50_of(lambda: ray_quota.QuotaToken(resource, expected_use=1).close(), 200)
    return {
        "n": n,
        "plain_ms_per_task": plain_wall / n * 1e3,
        "quota_ms_per_task": quota_wall / n * 1e3,
        "ratio": quota_wall / plain_wall,
        "plain_submit_us_per_task": plain_submit / n * 1e6,
        "quota_submit_us_per_task": quota_submit / n * 1e6,
        "added_submit_us_per_task": (quota_submit - plain_submit) / n * 1e6,
        "executor_calls_per_task": (sum(by_method.values()) - batched) / n,
        "executor_calls_by_method": by_method,
        "split_p50_ms": split_p50 * 1e3,
        "open_p50_ms": open_p50 * 1e3,
    }


def p50_of(fn: Any, n: int) -> float:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def table(result: dict[str, Any]) -> str:
    rows = [
        ("plain `@ray.remote` tasks, per task", f"{result['plain_ms_per_task']:.2f} ms"),
        ("`@quota` tasks in a parent's scope, per task",
         f"{result['quota_ms_per_task']:.2f} ms ({result['ratio']:.2f}x)"),
        ("driver's submission loop, plain / `@quota`, per task",
         f"{result['plain_submit_us_per_task']:.0f} / {result['quota_submit_us_per_task']:.0f} µs"),
        ("driver's added submission cost, per task",
         f"{result['added_submit_us_per_task']:.0f} µs"),
        ("executor calls per decorated task (operations served, by method)",
         f"{result['executor_calls_per_task']:.2f} ("
         + ", ".join(f"{m} {c / result['n']:.2f}"
                     for m, c in sorted(result["executor_calls_by_method"].items())) + ")"),
        ("`token.split(1)` p50 / `QuotaToken(...)` p50",
         f"{result['split_p50_ms']:.2f} / {result['open_p50_ms']:.2f} ms"),
    ]
    lines = [f"| fan-out of {result['n']:,} tasks | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=1000, help="tasks each way")
    parser.add_argument("--json", action="store_true", help="one JSON line")
    args = parser.parse_args(argv)

    import ray

    import ray_quota
    from bench import scratch_state

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 namespace="ray_quota_fanout")
    try:
        ray_quota.shutdown()
        ray_quota.init(manifest=MANIFEST, environment="fanout",
                       state_path=scratch_state("fanout"), metrics_port=None)
        result = measure(args.n)
    finally:
        ray_quota.shutdown()
        if started:
            ray.shutdown()
    print(json.dumps(result) if args.json else table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
