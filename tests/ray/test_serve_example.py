"""examples/serve_llm.py on the session's Ray: a Serve deployment's replicas, driven by concurrent
HTTP requests, keep the shared limits and give the tenants their weighted shares, as the replicas'
own records show."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import ray
from conftest import forget_state

import ray_quota


@pytest.fixture
def example(ray_cluster: None, state_dir: Path) -> Iterator[ModuleType]:
    ray_quota.shutdown()
    forget_state(state_dir, "local")  # state is durable: start on a fresh one
    yield importlib.import_module("examples.serve_llm")
    assert ray.is_initialized(), "the example shut down the Ray it did not start"
    ray_quota.shutdown()


def test_serve_replicas_share_both_limits_by_the_tenants_weights(example: ModuleType) -> None:
    result = example.main(seconds=10.0, clients=16)
    assert len(result["replicas"]) == example.REPLICAS  # every replica served
    assert result["requests"] > 100
    # The requests-in-flight limit holds across replicas, and was reached.
    assert result["most_in_flight"] == result["requests_limit"] == 8
    # The tokens-per-minute limit holds: never more used than the bucket held and refilled.
    assert 0 < result["tokens_used"] <= result["allowed"]
    # Under contention the tenants get 3:1 (the weights) of what there is.
    shares = result["tokens_by_tenant"]
    assert 2.0 <= shares["premium"] / shares["free"] <= 4.5, shares
    # Every replica closed its tokens when Serve ended it.
    status = {s.name: s for s in ray_quota.status()}
    assert status["llm-tokens"].tokens == status["llm-requests"].tokens == 0
