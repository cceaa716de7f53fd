"""Run every benchmark scenario for ray_quota and every baseline; write a table and charts.

    python -m bench             # the full run, a few minutes on 2 cores
    python -m bench --quick     # tiny sizes, well under a minute

Scenarios (each for ray_quota and every baseline, with the same work and the same limit):

a.  one process, reserve+commit of 1 unit, limit far above demand: throughput and latency.
    ``ray_quota`` is served by its local lease; ``ray_quota (executor path)`` reserves a whole
    burst each time, so every reservation is one executor call.
b1. N processes share one rate limit far above demand: throughput.
b2. N processes share one rate limit that binds: admitted units against the limit, latency.
c.  three tenants weighted 1:2:4 share a binding rate limit: shares, share error, Jain's index.
d.  N processes share a concurrency limit, holding slots for random times: utilisation, max in use.

Admissions are checked from the workers' own records (bench/check.py), never from a limiter.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import check, scratch_state
from bench.limiters import (
    ACTOR,
    ALL,
    LOCK,
    RAY_QUOTA,
    RAY_QUOTA_EXEC,
    Limit,
    LockBucket,
    make_client,
    plain_actor,
    unavailable,
)
from bench.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
ENVIRONMENT = "bench"
TENANTS = {"tenant-1": 1, "tenant-2": 2, "tenant-4": 4}

# Far above anything this machine can reserve, so the limiter's own cost is what is measured.
OPEN = Limit("rate", rate=10_000_000, burst=10_000_000)
# Binding: the busy workers want several times more, even when each executor call takes 10 ms
# on a loaded machine, so every limiter is backlogged. Burst = one second of refill, since the
# ``limits`` package only knows whole-second windows.
SATURATED = Limit("rate", rate=1_000, burst=1_000)
SLOTS = Limit("concurrency", slots=4)
EXEC_BURST = 100  # executor path: each reservation takes the whole burst, which refills at once
EXEC = Limit("rate", rate=1_000_000_000, burst=EXEC_BURST)


@dataclass(frozen=True)
class Sizes:
    workers: int = 8
    a_seconds: float = 2.0  # per limiter, for each of the throughput and latency loops
    b1_seconds: float = 4.0
    b2_seconds: float = 5.0
    c_seconds: float = 8.0
    c_workers_per_tenant: int = 2
    d_seconds: float = 5.0
    amount: int = 10  # units per reservation in b2 and c
    hold_s: tuple[float, float] = (0.002, 0.020)
    lead_s: float = 0.1  # from "every worker is prepared" to the common start
    f_tasks: int = 1000  # fan-out: tasks each way
    f_exec_samples: int = 1000  # executor path: samples each way


FULL = Sizes()
QUICK = Sizes(workers=4, a_seconds=0.1, b1_seconds=0.3, b2_seconds=0.5, c_seconds=0.6,
              c_workers_per_tenant=1, d_seconds=0.3, lead_s=0.05, f_tasks=50,
              f_exec_samples=50)

SCENARIOS = {
    "a": "a. one process, reserve+commit of 1 unit (limit far above demand)",
    "b1": "b1. {n} processes share one rate limit far above demand (throughput)",
    "b2": "b2. {n} processes share one binding rate limit ({rate:,.0f} units/s, burst {burst:,})",
    "c": "c. three tenants weighted 1:2:4 share a binding rate limit ({rate:,.0f} units/s)",
    "d": "d. {n} processes share a concurrency limit of {slots} slots, random holds",
}
# Not a limiter comparison (ray_quota only, with its own table): not among SCENARIOS' tables.
FANOUT = "f"
EVERYTHING = frozenset(SCENARIOS) | {FANOUT}


def manifest() -> dict[str, Any]:
    def rate(limit: Limit) -> dict[str, Any]:
        return {"limit": {"type": "rate", "value": int(limit.rate), "period": "second",
                          "burst": limit.burst}, "enforcement": "throttle"}

    return {"environments": {ENVIRONMENT: {
        "a-open": rate(OPEN),
        "a-exec": rate(EXEC),
        "b1-open": rate(OPEN),
        "b2-saturated": rate(SATURATED),
        "c-tenants": rate(SATURATED),
        "f-open": rate(OPEN),
        "d-slots": {"limit": {"type": "concurrency", "value": SLOTS.slots},
                    "enforcement": "throttle"},
    }}}


# ------------------------------------------------------------------------------ measuring


def _lat_array(results: list[dict[str, Any]]) -> np.ndarray:
    parts = [np.frombuffer(r["latency"], dtype=np.float64) for r in results]
    return np.sort(np.concatenate(parts)) if parts else np.array([])


def _pct(lat: np.ndarray, q: float) -> float:
    return float(np.percentile(lat, q)) if len(lat) else math.nan


def _executor_calls() -> int:
    import ray

    from ray_quota._runtime import rpc

    return int(ray.get(rpc.executor().calls_served.remote()))


def _rate_metrics(results: list[dict[str, Any]], limit: Limit, start: float,
                  stop: float) -> dict[str, Any]:
    spans = [s for r in results for s in r["spans"]]
    lat = _lat_array(results)
    grants = sum(r["grants"] for r in results)
    units = sum(r["units"] for r in results)
    end = max([r["stopped"] for r in results] + [stop])
    elapsed = end - start
    bound = limit.burst + limit.rate * elapsed
    half = start + (stop - start) / 2
    steady_units = sum(u for _, received, u in spans if half <= received <= stop)
    excess = check.max_rate_excess(spans, limit.rate) - limit.burst if spans else -math.inf
    return {
        "grants": grants,
        "units": units,
        "per_s": grants / elapsed,
        "units_per_s": units / elapsed,
        "bound": bound,
        "admitted_vs_bound": units / bound,
        "steady_vs_rate": steady_units / (limit.rate * (stop - half)),
        "over_admission": max(0.0, excess),
        "p50_ms": _pct(lat, 50) * 1e3,
        "p99_ms": _pct(lat, 99) * 1e3,
        "timeline": _timeline(spans, start) if limit.rate < OPEN.rate else [],
    }


def _timeline(spans: list[tuple[float, float, float]], start: float) -> list[list[float]]:
    """Cumulative units by receive time, thinned to at most 400 points, for the charts."""
    points = sorted((received - start, u) for _, received, u in spans)
    total, out = 0.0, []
    step = max(1, len(points) // 400)
    for i, (t, u) in enumerate(points):
        total += u
        if i % step == 0 or i == len(points) - 1:
            out.append([round(t, 4), total])
    return out


class Bench:
    def __init__(self, sizes: Sizes, redis_url: str | None) -> None:
        self.sizes = sizes
        self.redis_url = redis_url
        self.workers: list[Any] = []
        self._plain: Any = None

    # ---------------------------------------------------------------------- scenario a

    def scenario_a(self) -> list[dict[str, Any]]:
        rows = []
        for name in [RAY_QUOTA, RAY_QUOTA_EXEC, *ALL[1:]]:
            limit = EXEC if name == RAY_QUOTA_EXEC else OPEN
            reason = unavailable(name, limit, self.redis_url)
            if reason:
                rows.append({"limiter": name, "status": reason})
                continue
            rows.append(self._single(name, limit))
            _progress("a", rows[-1])
        return rows

    def _single(self, name: str, limit: Limit) -> dict[str, Any]:
        from ray_quota import QuotaToken

        token, actor, amount = None, None, 1
        if name == RAY_QUOTA:
            token = QuotaToken("a-open", expected_use=1)
        elif name == RAY_QUOTA_EXEC:
            token = QuotaToken("a-exec", expected_use=EXEC_BURST)
            amount = EXEC_BURST
        elif name == ACTOR:
            actor = self.plain_actor(limit)
        client = make_client(name, limit, token=token, actor=actor, bucket=LockBucket(limit),
                             redis_url=self.redis_url, key=uuid.uuid4().hex)
        acquire, release = client.acquire, client.release
        seconds = self.sizes.a_seconds
        try:
            for _ in range(50):  # warm up: connections, the first lease
                release(acquire(amount), amount, amount)
            calls_before = _executor_calls() if token is not None else 0
            # Throughput: batches growing until one takes 10 ms, no timing per call.
            done, batch, t0 = 0, 1, time.perf_counter()
            deadline = t0 + seconds
            while (now := time.perf_counter()) < deadline:
                b0 = now
                for _ in range(batch):
                    release(acquire(amount), amount, amount)
                done += batch
                if time.perf_counter() - b0 < 0.01:
                    batch *= 2
            throughput = done / (time.perf_counter() - t0)
            # Latency: every call timed; the record feeds the admission check as well.
            from bench.workers import RateRecord

            record, clock = RateRecord(), time.monotonic
            start = clock()
            stop = start + seconds
            while (sent := clock()) < stop:
                handle = acquire(amount)
                release(handle, amount, amount)
                record.add(sent, clock(), amount)
            calls = (_executor_calls() - calls_before) if token is not None else None
        finally:
            client.close()
        out = record.export()
        out["stopped"] = clock()
        metrics = _rate_metrics([out], limit, start, stop)
        lat = _lat_array([out])
        reservations = done + out["grants"]
        return {"limiter": name, "status": "ok", "per_s": throughput,
                "p50_us": _pct(lat, 50) * 1e6, "p99_us": _pct(lat, 99) * 1e6,
                "over_admission": metrics["over_admission"],
                "executor_calls_per_reservation": (None if calls is None
                                                   else calls / reservations)}

    # ------------------------------------------------------------------ multi-process

    def _run_workers(self, name: str, limit: Limit, resource: str, seconds: float,
                     workers: int, expected_use: list[int] | None = None,
                     extra: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], float,
                                                                    float, int | None]:
        """Run ``workers`` workers of limiter ``name`` between a common start and stop."""
        import ray

        from ray_quota import QuotaToken

        job: dict[str, Any] = {"limiter": name, "limit": limit, "redis_url": self.redis_url,
                               "key": uuid.uuid4().hex, "amount": self.sizes.amount,
                               "hold_s": self.sizes.hold_s, **(extra or {})}
        if name == ACTOR:
            job["actor"] = self.plain_actor(limit)
        tokens = None
        if name == RAY_QUOTA:
            weights = expected_use or [self.sizes.amount] * workers
            tokens = [QuotaToken(resource, expected_use=w) for w in weights]
        if name == LOCK:
            ray.get(self.workers[0].prepare.remote(job, threads=workers))
            used = self.workers[:1]
        else:
            ray.get([self.workers[i].prepare.remote(job, tokens[i] if tokens else None, seed=i)
                     for i in range(workers)])
            used = self.workers[:workers]
        calls_before = _executor_calls() if tokens else 0
        start = time.monotonic() + self.sizes.lead_s
        stop = start + seconds
        results = [r for batch in ray.get([w.go.remote(start, stop) for w in used])
                   for r in batch]
        calls = None
        if tokens:
            calls = _executor_calls() - calls_before
        return results, start, stop, calls

    def plain_actor(self, limit: Limit) -> Any:
        """The plain actor limiter, started once and reset to ``limit`` for each run."""
        import ray

        if self._plain is None:
            self._plain = plain_actor(limit)
        ray.get(self._plain.reset.remote(limit.rate, limit.burst, limit.slots))
        return self._plain

    def scenario_b(self, which: str) -> list[dict[str, Any]]:
        limit = OPEN if which == "b1" else SATURATED
        resource = "b1-open" if which == "b1" else "b2-saturated"
        seconds = self.sizes.b1_seconds if which == "b1" else self.sizes.b2_seconds
        amount = 1 if which == "b1" else self.sizes.amount
        rows = []
        for name in ALL:
            reason = unavailable(name, limit, self.redis_url)
            if reason:
                rows.append({"limiter": name, "status": reason})
                continue
            results, start, stop, calls = self._run_workers(
                name, limit, resource, seconds, self.sizes.workers,
                expected_use=[amount] * self.sizes.workers, extra={"amount": amount})
            row = {"limiter": name, "status": "ok",
                   **_rate_metrics(results, limit, start, stop)}
            row["executor_calls_per_reservation"] = (None if calls is None
                                                     else calls / max(1, row["grants"]))
            rows.append(row)
            _progress(which, row)
        return rows

    def scenario_c(self) -> list[dict[str, Any]]:
        limit = SATURATED
        per = self.sizes.c_workers_per_tenant
        tenant_of = [t for t in TENANTS for _ in range(per)]
        weights = [TENANTS[t] * self.sizes.amount for t in tenant_of]
        fair = {t: w / sum(TENANTS.values()) for t, w in TENANTS.items()}
        rows = []
        for name in ALL:
            reason = unavailable(name, limit, self.redis_url)
            if reason:
                rows.append({"limiter": name, "status": reason})
                continue
            results, start, stop, calls = self._run_workers(
                name, limit, "c-tenants", self.sizes.c_seconds, len(tenant_of),
                expected_use=weights)
            row = {"limiter": name, "status": "ok",
                   **_rate_metrics(results, limit, start, stop)}
            # Shares over the second half of the run, when every tenant is backlogged and the
            # initial burst is long gone.
            half = start + (stop - start) / 2
            units = dict.fromkeys(TENANTS, 0.0)
            grants = dict.fromkeys(TENANTS, 0)
            for tenant, result in zip(tenant_of, results):
                for _, received, u in result["spans"]:
                    if half <= received <= stop:
                        units[tenant] += u
                        grants[tenant] += 1
            total = sum(units.values()) or 1.0
            shares = {t: units[t] / total for t in TENANTS}
            norm = [shares[t] / fair[t] for t in TENANTS]
            row.update({"shares": shares, "fair": fair, "tenant_grants": grants,
                        "share_error": max(abs(x - 1) for x in norm),
                        "jain": check.jain(norm),
                        "executor_calls_per_reservation": (None if calls is None else
                                                           calls / max(1, row["grants"]))})
            rows.append(row)
            _progress("c", row)
        return rows

    def scenario_d(self) -> list[dict[str, Any]]:
        limit = SLOTS
        rows = []
        for name in ALL:
            reason = unavailable(name, limit, self.redis_url)
            if reason:
                rows.append({"limiter": name, "status": reason})
                continue
            results, start, stop, calls = self._run_workers(
                name, limit, "d-slots", self.sizes.d_seconds, self.sizes.workers,
                expected_use=[1] * self.sizes.workers)
            holds = [h for r in results for h in r["holds"]]
            lat = _lat_array(results)
            peak = check.max_overlap(holds)
            end = max(r["stopped"] for r in results)
            row = {"limiter": name, "status": "ok", "grants": len(holds),
                   "per_s": len(holds) / (end - start),
                   "utilisation": check.busy_fraction(holds, limit.slots, start, stop),
                   "max_in_use": peak, "over_admission": max(0, peak - limit.slots),
                   "p50_ms": _pct(lat, 50) * 1e3, "p99_ms": _pct(lat, 99) * 1e3,
                   "executor_calls_per_reservation": (None if calls is None
                                                      else calls / max(1, len(holds)))}
            rows.append(row)
            _progress("d", row)
        return rows


def scenario_f(sizes: Sizes) -> dict[str, Any]:
    """Fan-out (bench/fanout.py) and the executor path against a plain actor call
    (bench/exec_path.py), each in this run."""
    from bench import exec_path, fanout

    figures = exec_path.measure(sizes.f_exec_samples, resource="a-exec")
    return {"fanout": fanout.measure(sizes.f_tasks, resource="f-open"),
            "exec_path_p50_ms": figures, "exec_path_ratio": exec_path.ratio_of(figures)}


def _progress(scenario: str, row: dict[str, Any]) -> None:
    keys = ("per_s", "p50_us", "p50_ms", "over_admission", "share_error", "utilisation")
    shown = ", ".join(f"{k}={row[k]:.4g}" for k in keys if isinstance(row.get(k), float | int))
    print(f"  [{scenario}] {row['limiter']}: {shown}", flush=True)


# --------------------------------------------------------------------------------- main


def machine() -> dict[str, str]:
    import ray

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": str(os.cpu_count()), "cpu": cpu, "python": platform.python_version(),
            "ray": ray.__version__, "platform": platform.platform(),
            "ray_quota": _ray_quota_version()}


def _ray_quota_version() -> str:
    """Which ray_quota was measured: its path and the git commit of the work tree, if clean."""
    import subprocess

    import ray_quota

    where = Path(ray_quota.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, check=True).stdout.strip()
        return f"{where} at {commit}{' + uncommitted changes' if dirty else ''}"
    except (OSError, subprocess.CalledProcessError):
        marker = where.parent / "SNAPSHOT_OF"  # written by whoever exported a snapshot to measure
        if marker.exists():
            return f"{where} (snapshot of {marker.read_text().strip()})"
        return f"{where} (not a git work tree)"


def _pythonpath() -> str:
    """Workers import ``bench`` (and the same ``ray_quota`` as this process) from here."""
    return os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)


def run(sizes: Sizes, out: Path, *, quick: bool,
        only: frozenset[str] = EVERYTHING) -> dict[str, Any]:
    """Run every scenario and write ``results.md``, ``results.json`` and charts into ``out``."""
    import ray

    import ray_quota
    from bench import report
    from bench.workers import start_workers

    began = time.monotonic()
    load = {"before": os.getloadavg()}
    server = RedisServer()
    redis_url = None
    redis_note = None
    if server.binary:
        server.start()
        redis_url = server.url
    else:
        redis_note = "no redis-server binary on PATH: the Redis-backed baselines were skipped"
    own_ray = not ray.is_initialized()
    results: dict[str, Any] = {}
    worker_ray_quota = None
    try:
        if own_ray:
            ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False,
                     namespace="ray_quota_bench",
                     runtime_env={"env_vars": {"PYTHONPATH": _pythonpath()}})
        ray_quota.shutdown()
        ray_quota.init(manifest=manifest(), environment=ENVIRONMENT,
                       state_path=scratch_state("bench"))
        bench = Bench(sizes, redis_url)
        if "a" in only:
            print("scenario a (single process)", flush=True)
            results["a"] = bench.scenario_a()
        if only - {"a", FANOUT}:
            bench.workers, worker_ray_quota = start_workers(
                max(sizes.workers, 3 * sizes.c_workers_per_tenant))
        for key in ("b1", "b2"):
            if key in only:
                print(f"scenario {key}", flush=True)
                results[key] = bench.scenario_b(key)
        if "c" in only:
            print("scenario c (weighted tenants)", flush=True)
            results["c"] = bench.scenario_c()
        if "d" in only:
            print("scenario d (concurrency)", flush=True)
            results["d"] = bench.scenario_d()
        if FANOUT in only:
            print("scenario f (fan-out, executor path)", flush=True)
            results["f"] = scenario_f(sizes)
        for worker in bench.workers:
            ray.kill(worker)
        if bench._plain is not None:
            ray.kill(bench._plain)
    finally:
        from ray_quota._runtime import renewer

        renewer.flush()
        ray_quota.shutdown()
        if own_ray:
            ray.shutdown()
        server.stop()
    load["after"] = os.getloadavg()
    meta = {"quick": quick, "sizes": asdict(sizes), "machine": machine(), "load": load,
            "worker_ray_quota": worker_ray_quota,
            "seconds": time.monotonic() - began, "redis": redis_note,
            "limits": {"open": asdict(OPEN), "saturated": asdict(SATURATED),
                       "slots": asdict(SLOTS), "exec": asdict(EXEC)},
            "titles": {k: v.format(n=sizes.workers, rate=SATURATED.rate, burst=SATURATED.burst,
                                   slots=SLOTS.slots) for k, v in SCENARIOS.items()},
            "command": "python -m bench" + (" --quick" if quick else "") + (
                f" --only {','.join(sorted(only))}" if only != EVERYTHING else "")}
    out.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "results": results}
    (out / "results.json").write_text(json.dumps(doc, default=str))
    report.write(doc, out)
    return doc


def main(argv: list[str] | None = None) -> int:
    # A `timeout` or Ctrl-C still stops the Ray and redis-server this run started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the test's mode)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="where results.md, results.json and the charts go (default: bench/)")
    parser.add_argument("--render", type=Path, metavar="RESULTS_JSON",
                        help="only redraw results.md and the charts from a results.json")
    parser.add_argument("--only", default=",".join(sorted(EVERYTHING)),
                        help=f"comma-separated scenarios to run (default: all of "
                             f"{','.join(sorted(EVERYTHING))})")
    args = parser.parse_args(argv)
    if args.render:
        from bench import report

        doc = json.loads(args.render.read_text())
        report.write(doc, args.out)
        print(f"wrote {args.out / 'results.md'}")
        return 0
    only = frozenset(args.only.split(","))
    if not only <= EVERYTHING:
        parser.error(f"unknown scenario in --only: {sorted(only - EVERYTHING)}")
    doc = run(QUICK if args.quick else FULL, args.out, quick=args.quick, only=only)
    print(f"\nwrote {args.out / 'results.md'} in {doc['meta']['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
