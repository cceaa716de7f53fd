"""A Ray cluster with its metrics stack (dashboard, metrics agent, service discovery file) and an
executor that serves no endpoint of its own: its metrics can only leave through Ray.

Run by tests/ray/test_ray_metrics_e2e.py in its own process (the session's cluster runs without
the dashboard, so without Ray's service discovery file). Prints one JSON line: where Ray's
service discovery file is, and what this process reserved, committed and was refused; then keeps
the cluster up until its standard input closes or gives a line, while the test's Prometheus
scrapes it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter

import ray

import ray_quota
from ray_quota import FailedReservation, QuotaToken
from ray_quota._runtime import renewer

MANIFEST = {"environments": {"test": {
    "tok": {"limit": {"type": "rate", "value": 1000, "period": "second", "burst": 200}},
    "conn": {"limit": {"type": "concurrency", "value": 4}},
    "tok-reject": {"limit": {"type": "rate", "value": 10, "period": "minute", "burst": 10},
                   "enforcement": "reject"},
}}}
SERVICE_DISCOVERY = "prom_metrics_service_discovery.json"  # Ray writes it in its temp dir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def workload() -> dict[str, Counter[str]]:
    """Reserve and commit on each resource; refused reservations too. Returns what was done."""
    done: dict[str, Counter[str]] = {"reserved": Counter(), "committed": Counter(),
                                     "refused": Counter(), "reservations": Counter()}
    for resource, label, amount, used in (("tok", "team-a", 50, 30), ("tok", "team-b", 20, 20),
                                          ("conn", None, 1, 1), ("tok-reject", None, 4, 4)):
        with QuotaToken(resource, amount * 10, label=label) as token:
            for _ in range(5):
                try:
                    with token.reserve(amount) as reservation:
                        reservation.commit(used)
                except FailedReservation:
                    done["refused"][resource] += 1
                    continue
                done["reserved"][resource] += amount
                done["committed"][resource] += used
                done["reservations"][resource] += 1
    return done


def main() -> None:
    temp = tempfile.mkdtemp(prefix="rq", dir="/tmp")  # short: Ray's socket paths live in it
    try:
        ray.init(num_cpus=2, include_dashboard=True, dashboard_port=free_port(),
                 _temp_dir=temp, log_to_driver=False,
                 _system_config={"metrics_report_interval_ms": 1000})
        # No endpoint of its own (metrics_port=None); Ray's pipeline by default, as the
        # metrics agent runs here.
        ray_quota.init(manifest=MANIFEST, environment="test", metrics_port=None,
                       policy=ray_quota.Policy(lease_ttl_s=3.0))
        done = workload()
        renewer.flush()  # this process's observations reach the executor now
        discovery = os.path.join(temp, SERVICE_DISCOVERY)
        deadline = time.monotonic() + 60
        while not os.path.exists(discovery) and time.monotonic() < deadline:
            time.sleep(0.5)
        print(json.dumps({"service_discovery": discovery, **done}), flush=True)
        sys.stdin.readline()
        ray_quota.shutdown()
        ray.shutdown()
    finally:
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
