"""One local Ray cluster for the whole test session, and a fresh executor for each test that asks.

The core's tests need neither: they run on a fake clock (tests/fakes.py). Executors keep their
state in a temporary directory (``RAY_QUOTA_STATE_DIR``), never in the user's own.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
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
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the session cluster's executors keep their state (its workers are told so)."""
    return tmp_path_factory.mktemp("ray_quota_state")


_tests = itertools.count()


@pytest.fixture(autouse=True)
def _private_state_dir(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's own state directory, for what it starts outside the session cluster (a
    scenario's subprocess with its own Ray, an executor built in this process)."""
    from ray_quota._actors.durable import STATE_DIR_VARIABLE

    monkeypatch.setenv(STATE_DIR_VARIABLE, str(state_dir / "tests" / str(next(_tests))))


@pytest.fixture(scope="session")
def ray_cluster(state_dir: Path) -> Iterator[None]:
    import ray

    from ray_quota._actors.durable import STATE_DIR_VARIABLE

    # Workers import test helpers by module name, as cloudpickle refers to them.
    paths = ":".join(str(path) for path in (ROOT / "tests", ROOT / "tests" / "ray", ROOT))
    env = {"PYTHONPATH": paths, STATE_DIR_VARIABLE: str(state_dir)}
    ray.init(num_cpus=4, include_dashboard=False, namespace="ray_quota_tests",
             log_to_driver=False, runtime_env={"env_vars": env})
    yield
    ray.shutdown()


def forget_state(state_dir: Path, environment: str) -> None:
    """Delete an environment's state file (the executor stopped): the next one starts afresh."""
    for suffix in ("", "-wal", "-shm"):
        (state_dir / f"{environment}.sqlite{suffix}").unlink(missing_ok=True)


@pytest.fixture
def executor(ray_cluster: None, state_dir: Path) -> Iterator[Any]:
    """A fresh executor on TEST_MANIFEST with a short lease time-to-live; stopped afterwards."""
    import ray_quota
    from ray_quota._runtime import renewer

    ray_quota.shutdown()
    forget_state(state_dir, "test")
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


# A task's give-back (its tokens' merge_back or close) is queued and sent without holding the
# task's end up (ray_quota/_runtime/giveback.py): another process sees it moments later.
GIVE_BACK_SEEN_S = 5.0


def eventually(check: Callable[[], bool], within_s: float = GIVE_BACK_SEEN_S) -> bool:
    """Whether ``check()`` holds within ``within_s`` (asked every 50 ms)."""
    deadline = time.monotonic() + within_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
