"""One local Ray cluster for the whole test session, and a fresh executor for each test that asks.

The core's tests need neither: they run on a fake clock (tests/fakes.py).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Small limits so that Ray tests finish in seconds.
TEST_MANIFEST: dict[str, Any] = {"environments": {"test": {
    "tok": {"limit": {"type": "rate", "value": 1000, "period": "second", "burst": 200},
            "enforcement": "throttle", "unit": "token"},
    "fast": {"limit": {"type": "rate", "value": 1_000_000, "period": "second",
                       "burst": 100_000}},
    "tok-reject": {"limit": {"type": "rate", "value": 100, "period": "second", "burst": 50},
                   "enforcement": "reject", "wait_limit": "100ms"},
    "budget": {"limit": {"type": "capacity", "value": 10_000}, "enforcement": "reject"},
    "conn": {"limit": {"type": "concurrency", "value": 4}, "enforcement": "throttle",
             "wait_limit": "20s"},
    "solo": {"limit": {"type": "concurrency", "value": 1}, "enforcement": "throttle"},
    "doomed": {"limit": {"type": "concurrency", "value": 1}, "enforcement": "terminate",
               "wait_limit": "200ms"},
}}}


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    import ray

    # Workers import test helpers by module name, as cloudpickle refers to them.
    paths = ":".join(str(path) for path in (ROOT / "tests", ROOT / "tests" / "ray", ROOT))
    ray.init(num_cpus=4, include_dashboard=False, namespace="ray_quota_tests",
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": paths}})
    yield
    ray.shutdown()


@pytest.fixture
def executor(ray_cluster: None) -> Iterator[Any]:
    """A fresh executor on TEST_MANIFEST with a short lease time-to-live; stopped afterwards."""
    import ray_quota
    from ray_quota._runtime import renewer

    ray_quota.shutdown()
    info = ray_quota.init(manifest=TEST_MANIFEST, environment="test",
                          policy=ray_quota.Policy(lease_ttl_s=3.0), metrics_port=0)
    yield info
    renewer.flush()
    ray_quota.shutdown()


# ------------------------------------------------------------------ the sync and async twins

TWINS = ("sync", "async")


def reserve_by(twin: str, token: Any, amount: int, timeout: float | None = None) -> Any:
    """``token.reserve``, or ``token.reserve_async`` run in an event loop of its own."""
    if twin == "sync":
        return token.reserve(amount, timeout=timeout)
    return asyncio.run(token.reserve_async(amount, timeout=timeout))


@pytest.fixture(params=TWINS)
def twin(request: pytest.FixtureRequest) -> str:
    """Runs the test once per twin: through :meth:`QuotaToken.reserve`, then ``reserve_async``."""
    return str(request.param)


@pytest.fixture
def reserve(twin: str) -> Callable[..., Any]:
    """``reserve(token, amount, timeout=None)`` by the test's twin (see :func:`reserve_by`)."""
    return functools.partial(reserve_by, twin)
