"""Profile ray_quota's local fast path: ``reserve(1)`` + ``commit(1)`` served from the lease.

    python -m bench.profile_local                   # throughput and p50 of the full op
    python -m bench.profile_local --breakdown       # ns per piece of the op, one by one
    python -m bench.profile_local --cprofile        # cProfile, top functions by own time
    py-spy record -o /tmp/local.svg -- python -m bench.profile_local --seconds 20
    python -m bench.profile_local --executor-path --seconds 20   # prints the executor's pid:
    py-spy record --pid PID -d 10 -o /tmp/executor.svg           # ... profile it meanwhile

It starts a local Ray and an executor with one resource far above demand, so every call after
the first is served by the process's lease and the executor is not involved.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

MANIFEST = {"environments": {"profile": {
    "open": {"limit": {"type": "rate", "value": 10_000_000, "period": "second",
                       "burst": 10_000_000}},
    # every reserve takes the whole burst, which refills within a microsecond: one executor
    # call per reservation, never a wait
    "exec": {"limit": {"type": "rate", "value": 1_000_000_000, "period": "second",
                       "burst": 100}}}}}


def per_call_ns(fn: Callable[[], Any], n: int) -> float:
    """Best of 5 runs of ``n`` calls, in ns per call (best: the machine is shared)."""
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - t0) / n)
    return best


def full_op(token: Any) -> Callable[[], None]:
    reserve = token.reserve

    def op() -> None:
        reserve(1).commit(1)

    return op


def measure(token: Any, seconds: float) -> dict[str, float]:
    op = full_op(token)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(1000):
            op()
        n += 1000
    throughput = n / (time.perf_counter() - t0)
    samples = []
    clock = time.perf_counter_ns
    for _ in range(100_000):
        s = clock()
        op()
        samples.append(clock() - s)
    samples.sort()
    return {"per_s": throughput, "p50_us": samples[len(samples) // 2] / 1000,
            "p99_us": samples[int(len(samples) * 0.99)] / 1000,
            "mean_us": statistics.fmean(samples) / 1000}


def breakdown(token: Any, n: int) -> list[tuple[str, float]]:
    """The op's pieces, each timed alone; what a piece cannot find in this version is skipped."""
    import threading

    import ray_quota._token as tok_mod

    rows: list[tuple[str, float]] = [("reserve(1).commit(1), the whole op",
                                      per_call_ns(full_op(token), n))]
    lease = token._lease
    lock = token._lock
    pieces: dict[str, Callable[[], Any]] = {
        "empty Python call (baseline)": lambda: None,
        "token._usable()": token._usable,
        "time.monotonic()": time.monotonic,
        "time.perf_counter()": time.perf_counter,
    }
    now = time.monotonic()

    def take_settle() -> None:
        lease.take(1, now)
        lease.settle(1, 1)

    pieces["lease.take(1) + lease.settle(1, 1)"] = take_settle
    if hasattr(tok_mod, "_check_units"):
        pieces["_check_units('used', 1, allow_zero=True)"] = lambda: tok_mod._check_units(
            "used", 1, allow_zero=True)
    reservation_cls: Any = tok_mod.Reservation
    try:
        import inspect

        nargs = len(inspect.signature(reservation_cls.__init__).parameters) - 1

        def make_drop() -> None:
            r = reservation_cls(*((token, 1, lease)[:nargs]))
            r._open = False  # dropped committed: __del__ runs but does nothing

        pieces["Reservation(...) created and dropped (incl. __del__)"] = make_drop
    except (TypeError, ValueError):
        pass
    observe = getattr(tok_mod, "_observe", None)
    if observe is not None and hasattr(observe, "reserved"):
        spec = token._spec
        pieces["_observe.reserved(...) (metrics, local path)"] = lambda: observe.reserved(
            token._cluster, spec.name, token._label, observe.LOCAL, observe.GRANTED, 1, 2e-6)
    if observe is not None and hasattr(observe, "committed"):
        spec = token._spec
        pieces["_observe.committed(...) (metrics)"] = lambda: observe.committed(
            token._cluster, spec.name, token._label, 1, 1)
    single = threading.Lock()

    def lock_pair() -> None:
        single.acquire()
        single.release()

    pieces["threading.Lock acquire+release"] = lock_pair

    def with_lock() -> None:
        with lock:
            pass

    pieces["with token._lock: (uncontended)"] = with_lock
    for name, fn in pieces.items():
        rows.append((name, per_call_ns(fn, n)))
    return rows


def executor_path(seconds: float) -> int:
    import os

    import ray

    import ray_quota
    from ray_quota._runtime import rpc

    pid = ray.get(rpc.executor().__ray_call__.remote(lambda self: os.getpid()))
    print(f"executor pid {pid}; driver pid {os.getpid()}", flush=True)
    token = ray_quota.QuotaToken("exec", expected_use=100)
    samples = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        s = time.perf_counter_ns()
        token.reserve(100).commit(100)
        samples.append(time.perf_counter_ns() - s)
    samples.sort()
    print(f"executor path reserve(100)+commit(100): {len(samples) / seconds:,.0f}/s  "
          f"p50 {samples[len(samples) // 2] / 1e6:.3f} ms  "
          f"p99 {samples[int(len(samples) * 0.99)] / 1e6:.3f} ms")
    token.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("-n", type=int, default=200_000, help="calls per timed piece")
    parser.add_argument("--executor-path", action="store_true",
                        help="reserve(100) on a burst of 100: every call goes to the executor")
    args = parser.parse_args(argv)

    import ray

    import ray_quota
    from bench import scratch_state

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             namespace="ray_quota_profile")
    try:
        ray_quota.shutdown()
        ray_quota.init(manifest=MANIFEST, environment="profile",
                       state_path=scratch_state("profile"))
        if args.executor_path:
            return executor_path(args.seconds)
        token = ray_quota.QuotaToken("open", expected_use=1)
        op = full_op(token)
        for _ in range(10_000):  # the first lease, then warm caches
            op()
        print(f"ray_quota from {ray_quota.__file__}")
        if args.cprofile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.n):
                op()
            profiler.disable()
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(18)
            print(out.getvalue())
        elif args.breakdown:
            for name, ns in breakdown(token, args.n):
                print(f"{ns:8.0f} ns  {name}")
        else:
            m = measure(token, args.seconds)
            print(f"reserve(1)+commit(1): {m['per_s']:,.0f}/s  p50 {m['p50_us']:.2f} µs  "
                  f"p99 {m['p99_us']:.2f} µs  mean {m['mean_us']:.2f} µs")
        token.close()
    finally:
        ray_quota.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
