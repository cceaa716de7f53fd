"""Each script in examples/ runs on a small size against the session Ray and shows what it claims.

The examples start their own executor on examples/quota.yaml (environment ``local``); each test
starts from none and stops it afterwards, so budgets are fresh and other tests are unaffected.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import ray
from conftest import eventually, forget_state

import ray_quota


@pytest.fixture
def example(ray_cluster: None, state_dir: Path,
            request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    ray_quota.shutdown()
    forget_state(state_dir, "local")  # state is durable: each example starts on a fresh one
    yield importlib.import_module(f"examples.{request.param}")
    assert ray.is_initialized(), "an example shut down the Ray it did not start"
    ray_quota.shutdown()


def live_tokens() -> dict[str, int]:
    return {s.name: s.tokens for s in ray_quota.status()}


def run(module: ModuleType, **kwargs: Any) -> Any:
    return module.main(**kwargs)


@pytest.mark.parametrize("example", ["llm_ray_data"], indirect=True)
def test_ray_data_pipeline_stays_within_the_rate_limit(example: ModuleType) -> None:
    for module in ("pandas", "pyarrow"):
        pytest.importorskip(module, reason="ray.data needs pandas and pyarrow: install ray[data]")
    result = run(example, size=96)
    assert result["rows"] == 96
    assert 0 < result["tokens_used"] <= result["allowed"]


@pytest.mark.parametrize("example", ["fan_out"], indirect=True)
def test_fan_out_gives_every_split_back_to_the_parent(example: ModuleType) -> None:
    result = run(example, size=2)
    for way in ("explicit", "decorated"):
        assert result[way]["calls"] == 2 * example.FAN
        assert result[way]["used"] >= result[way]["calls"] * example.PROMPT // 2
        assert result[way]["expected_use_after"] == result[way]["expected_use_before"]
    assert live_tokens()["llm-tokens"] == 0


@pytest.mark.parametrize("example", ["shared_budget"], indirect=True)
def test_shared_budget_is_never_overspent(example: ModuleType) -> None:
    result = run(example, size=3)
    assert result["available_before"] == result["budget"] == 50_000
    assert sum(result["per_task"]) == result["spent"] <= result["budget"]
    assert result["spent"] > result["budget"] // 2  # the tasks did spend it, not give up early
    rest = next(s for s in ray_quota.status() if s.name == example.RESOURCE)
    assert rest.available + result["spent"] <= result["budget"]
    # Every task closed its token (a close is queued: the executor sees it within moments).
    assert eventually(lambda: next(s for s in ray_quota.status()
                                   if s.name == example.RESOURCE).tokens == 0)


@pytest.mark.parametrize("example", ["connection_pool"], indirect=True)
def test_connection_pool_never_opens_more_than_the_limit(example: ModuleType) -> None:
    result = run(example, size=36)
    assert result["requests"] == 36
    assert result["would_be"] > result["limit"] == 8
    assert 1 <= result["most_open"] <= result["limit"]


@pytest.mark.parametrize("example", ["async_actor"], indirect=True)
def test_async_actor_keeps_both_limits(example: ModuleType) -> None:
    result = run(example, size=30)
    assert result["requests"] == 30
    assert 1 < result["most_in_flight"] <= result["requests_limit"] == 8
    assert 0 < result["tokens_used"] <= result["allowed"]
    assert eventually(lambda: live_tokens() == {name: 0 for name in live_tokens()})
