"""Executor calls per second on a real 3-node cluster on this machine, brokers off and on.

    python -m bench.cluster_scale            # 24 worker processes, 20 s per mode
    python -m bench.cluster_scale --quick    # 6 processes, 5 s per mode

One ``ray.cluster_utils.Cluster`` with three nodes; the same workload runs twice on it, first
with processes leasing from the executor directly, then through their nodes' brokers (a fresh
executor each time). Each worker process holds its own token, as a task would, and loops:
reserve a few units of a shared rate limit, "work" for a few milliseconds, commit. The executor
counts every token and lease call it serves, by method; the table reports them per second,
with the reservations the workers made in the same time, and writes bench/cluster_scale.json
and bench/cluster_scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import ray
from ray.cluster_utils import Cluster

import ray_quota
from bench import scratch_state
from ray_quota import QuotaToken

HERE = Path(__file__).resolve().parent
NODES = 3
# Far more than the workers want, so each mode does the same work and only the calls differ.
MANIFEST = {"environments": {"bench": {
    "llm-tokens": {"limit": {"type": "rate", "value": 1_000_000, "period": "second",
                             "burst": 100_000}},
}}}


@ray.remote(num_cpus=0)
class Worker:
    def ready(self, token: QuotaToken) -> str:
        """One reservation before the clock starts: it starts the node's broker, if any."""
        with token.reserve(1):
            pass
        token.close()
        return ray.get_runtime_context().get_node_id()

    def run(self, token: QuotaToken, start_at: float, seconds: float) -> int:
        time.sleep(max(0.0, start_at - time.time()))
        done = 0
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            with token.reserve(50) as reservation:
                time.sleep(0.005)  # the work the units pay for
                reservation.commit(40)
            done += 1
        token.close()
        return done


def executor_counts() -> dict[str, int]:
    from ray_quota._runtime import rpc

    return dict(ray.get(rpc.executor().call_counts.remote()))


def measure(brokers: bool, processes: int, seconds: float) -> dict[str, Any]:
    """One mode: start the executor, run the workers, count the executor's calls."""
    ray_quota.init(manifest=MANIFEST, environment="bench", metrics_port=None, brokers=brokers,
                   state_path=scratch_state("cluster_scale"))
    workers = [Worker.options(resources={f"n{i % NODES}": 1}).remote() for i in range(processes)]
    nodes = ray.get([w.ready.remote(QuotaToken("llm-tokens", expected_use=1))
                     for w in workers], timeout=300)
    tokens = [QuotaToken("llm-tokens", expected_use=1000) for _ in workers]
    start_at = time.time() + 2.0
    refs = [w.run.remote(t, start_at, seconds) for w, t in zip(workers, tokens)]
    time.sleep(max(0.0, start_at - time.time()))
    before = executor_counts()
    reservations = sum(ray.get(refs, timeout=seconds + 300))
    after = executor_counts()
    for worker in workers:
        ray.kill(worker)
    ray_quota.shutdown()
    calls = {m: (after.get(m, 0) - before.get(m, 0)) / seconds for m in sorted(after)}
    return {"brokers": brokers, "processes": processes, "nodes": len(set(nodes)),
            "seconds": seconds, "reservations_per_s": reservations / seconds,
            "executor_calls_per_s": sum(calls.values()), "by_method": calls}


def table(results: list[dict[str, Any]]) -> str:
    off, on = results
    methods = sorted(set(off["by_method"]) | set(on["by_method"]))
    lines = ["| | brokers off | brokers on |", "|---|---:|---:|"]
    lines.append(f"| reservations/s (all workers) | {off['reservations_per_s']:,.0f} | "
                 f"{on['reservations_per_s']:,.0f} |")
    lines.append(f"| **executor calls/s** | **{off['executor_calls_per_s']:,.1f}** | "
                 f"**{on['executor_calls_per_s']:,.1f}** |")
    for method in methods:
        lines.append(f"| &nbsp;&nbsp;{method} | {off['by_method'].get(method, 0):,.1f} | "
                     f"{on['by_method'].get(method, 0):,.1f} |")
    ratio = off["executor_calls_per_s"] / max(on["executor_calls_per_s"], 1e-9)
    lines.append(f"| executor calls, off / on | {ratio:.1f}x | |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 processes, 5 s per mode")
    args = parser.parse_args()
    processes, seconds = (6, 5.0) if args.quick else (24, 20.0)
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 2, "resources": {"n0": 100}})
    for i in range(1, NODES):
        cluster.add_node(num_cpus=2, resources={f"n{i}": 100})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        results = [measure(brokers, processes, seconds) for brokers in (False, True)]
    finally:
        ray.shutdown()
        cluster.shutdown()
    machine = f"{os.cpu_count()} cores, {platform.python_version()}, load {os.getloadavg()[0]:.1f}"
    out = {"machine": machine, "results": results}
    text = table(results)
    if not args.quick:
        (HERE / "cluster_scale.json").write_text(json.dumps(out, indent=2) + "\n")
        (HERE / "cluster_scale.md").write_text(
            f"{NODES}-node `Cluster` on one machine ({machine}), {processes} worker processes, "
            f"{seconds:.0f} s per mode. Command: `python -m bench.cluster_scale`.\n\n"
            + text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
