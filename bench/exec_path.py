"""The executor path against one plain Ray actor call, in the same run: DESIGN §5's 1.3x target.

    python -m bench.exec_path                 # p50s and the ratio
    python -m bench.exec_path --pieces        # also each client-side piece, timed alone

Every ``reserve(100)`` on a burst of 100 (refilled within a microsecond) is one executor call,
never a wait. The baseline is a call to a plain async Ray actor that answers a small value, which
is what one executor round trip cannot beat; the executor itself is an async actor too.
Samples alternate between the two, so load on this shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

MANIFEST = {"environments": {"exec": {
    "exec": {"limit": {"type": "rate", "value": 1_000_000_000, "period": "second",
                       "burst": 100}}}}}
RESERVE, PLAIN = "token.reserve(100) (one executor acquire)", "plain actor call"


class Plain:
    """The baseline: an async actor whose method does nothing and answers a small value."""

    async def acquire(self, amount: int) -> int:
        return 0


def p50(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[len(ordered) // 2]


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(n: int, pieces: bool = False, resource: str = "exec") -> dict[str, float]:
    """p50 (ms) of each way in, ``n`` samples each, interleaved; ``resource`` of the running
    executor gives every reservation its whole burst of 100."""
    import ray

    import ray_quota
    from ray_quota._runtime import rpc

    plain = ray.remote(Plain).options(max_concurrency=10_000, num_cpus=0).remote()
    ray.get(plain.acquire.remote(1))
    token = ray_quota.QuotaToken(resource, expected_use=100)
    token.reserve(100).commit(100)
    executor = rpc.executor()
    ways: dict[str, Callable[[], Any]] = {
        PLAIN: lambda: ray.get(plain.acquire.remote(100)),
        RESERVE: lambda: token.reserve(100).commit(100),
    }
    if pieces:
        ways["executor.calls_served (bare call, no work)"] = lambda: ray.get(
            executor.calls_served.remote())
        ways["rpc.call('calls_served') (client path, no work)"] = lambda: rpc.call(
            "calls_served")
    samples: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(n):
        for name, fn in ways.items():
            samples[name].append(timed(fn))
    token.close()
    return {name: p50(values) * 1000 for name, values in samples.items()}


def ratio_of(figures: dict[str, float]) -> float:
    """Reserve p50 over the plain actor call's p50: the target is at most 1.3."""
    return figures[RESERVE] / figures[PLAIN]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.exec_path", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=1000, help="samples of each way")
    parser.add_argument("--pieces", action="store_true")
    parser.add_argument("--json", action="store_true", help="one JSON line, for bench.run")
    args = parser.parse_args(argv)

    import ray

    import ray_quota
    from bench import scratch_state

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 namespace="ray_quota_exec_path")
    try:
        ray_quota.shutdown()
        ray_quota.init(manifest=MANIFEST, environment="exec", state_path=scratch_state("exec"),
                       metrics_port=None)
        figures = measure(args.n, args.pieces)
    finally:
        ray_quota.shutdown()
        if started:
            ray.shutdown()
    ratio = ratio_of(figures)
    if args.json:
        print(json.dumps({"p50_ms": figures, "ratio": ratio}))
        return 0
    for name, ms in figures.items():
        print(f"{ms:8.3f} ms  p50  {name}")
    print(f"reserve p50 / plain actor call p50 = {ratio:.2f} (target <= 1.3)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
