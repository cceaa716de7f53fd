"""Remove a node that runs quota-holding work from a multi-node cluster on this machine.

Run by tests/ray/test_node_failure.py in its own process (it needs its own Ray cluster); prints one
JSON line of what it observed.
"""

from __future__ import annotations

import json
import os
import sys
import time

import ray
from ray.cluster_utils import Cluster

import ray_quota
from ray_quota import QuotaToken

MANIFEST = {"environments": {"test": {
    "conn": {"limit": {"type": "concurrency", "value": 6}},
    "tok": {"limit": {"type": "rate", "value": 2000, "period": "second", "burst": 200}},
}}}


@ray.remote(num_cpus=0)
class Holder:
    def hold(self, conn: QuotaToken, slots: int) -> int:
        self.held = [conn.reserve(1) for _ in range(slots)]
        return os.getpid()

    def work(self, tok: QuotaToken, seconds: float) -> int:
        done = 0
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            with tok.reserve(5):
                done += 1
        return done


def conn_status() -> ray_quota.ResourceStatus:
    return next(s for s in ray_quota.status() if s.name == "conn")


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    doomed = cluster.add_node(num_cpus=1, resources={"doomed": 10})
    cluster.add_node(num_cpus=1, resources={"survivor": 10})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    ray_quota.init(manifest=MANIFEST, environment="test", policy=ray_quota.Policy(lease_ttl_s=3))
    on_doomed = [Holder.options(resources={"doomed": 1}).remote() for _ in range(2)]
    on_survivor = Holder.options(resources={"survivor": 1}).remote()
    ray.get([h.hold.remote(QuotaToken("conn", 1), 2) for h in on_doomed])
    ray.get(on_survivor.hold.remote(QuotaToken("conn", 1), 1))
    held_before = conn_status().in_use
    survivor_work = on_survivor.work.remote(QuotaToken("tok", 10), 8.0)
    time.sleep(1.0)
    cluster.remove_node(doomed)
    removed_at = time.monotonic()
    while conn_status().in_use > 1 and time.monotonic() - removed_at < 30:
        time.sleep(0.2)
    reclaimed_after = time.monotonic() - removed_at
    result = {
        "held_before": held_before,
        "held_after": conn_status().in_use,
        "reclaimed_after_s": reclaimed_after,
        "survivor_reservations": ray.get(survivor_work, timeout=60),
        "executor_alive": bool(ray_quota.status()),
    }
    print(json.dumps(result))
    sys.stdout.flush()
    ray_quota.shutdown()
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
