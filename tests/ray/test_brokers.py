"""Node brokers on the session's single-node Ray: processes lease through their node's broker.

Multi-node behaviour (fairness across nodes, a broker killed, a node removed) is in
test_brokers_multinode.py; the broker's accounting is in test_broker_core.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from conftest import TEST_MANIFEST, forget_state
from workloads import spend

import ray_quota
from ray_quota import QuotaToken
from ray_quota._runtime import renewer, rpc
from ray_quota._actors.broker import broker_name

WORKERS = 6
SECONDS = 4.0


@pytest.fixture
def brokered(ray_cluster: None, state_dir: Path) -> Iterator[Any]:
    ray_quota.shutdown()
    forget_state(state_dir, "test")  # state is durable: start on a fresh one
    info = ray_quota.init(manifest=TEST_MANIFEST, environment="test", brokers=True,
                          policy=ray_quota.Policy(lease_ttl_s=3.0), metrics_port=None)
    yield info
    renewer.flush()
    ray_quota.shutdown()


@ray.remote(num_cpus=0)
class Spender:
    def ready(self) -> bool:
        return True

    def spend(self, budget: QuotaToken, seconds: float, seed: int) -> int:
        # Slow enough that the budget (10,000) lasts the whole run.
        return spend(budget, seconds, seed=seed, most=20, pause_s=0.02)[0]


def executor_counts() -> dict[str, int]:
    return dict(ray.get(rpc.executor().call_counts.remote()))


@pytest.mark.usefixtures("ray_cluster")
def test_a_single_node_cluster_leases_directly_unless_asked() -> None:
    ray_quota.shutdown()
    info = ray_quota.init(manifest=TEST_MANIFEST, environment="test", metrics_port=None)
    try:
        assert not info.brokers
    finally:
        ray_quota.shutdown()


def test_processes_renew_through_their_brokers_and_every_used_unit_is_charged(
        brokered: Any) -> None:
    spenders = [Spender.remote() for _ in range(WORKERS)]
    ray.get([s.ready.remote() for s in spenders], timeout=120)
    warm_up = [s.spend.remote(QuotaToken("budget", expected_use=100), 0.2, 0) for s in spenders]
    used = ray.get(warm_up, timeout=120)  # the first reservation starts the node's broker
    broker = ray.get_actor(broker_name(ray.get_runtime_context().get_node_id()),
                           namespace="ray_quota")
    before, broker_before = executor_counts(), ray.get(broker.stats.remote())
    started = time.monotonic()
    used += ray.get([s.spend.remote(QuotaToken("budget", expected_use=100), SECONDS, seed)
                     for seed, s in enumerate(spenders)], timeout=120)
    elapsed = time.monotonic() - started
    after, stats = executor_counts(), ray.get(broker.stats.remote())
    for spender in spenders:
        ray.kill(spender)
    # Each process renews with the broker once a second; the broker, once for all of them.
    executor_renewals = after.get("renew", 0) - before.get("renew", 0)
    broker_renewals = stats["renew"] - broker_before.get("renew", 0)
    assert executor_renewals <= elapsed + 2, (executor_renewals, elapsed)
    assert broker_renewals >= 3 * executor_renewals, (broker_renewals, executor_renewals)
    assert stats["local_grants"] + stats["forwarded"] == stats["acquire"]
    budget = next(s for s in ray_quota.status() if s.name == "budget")
    assert budget.in_use == sum(used)  # closed tokens: exactly what was used is spent
    assert budget.leased_units == 0
