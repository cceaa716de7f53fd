"""Enforcement on a real Ray: reject raises, throttle waits without pinning a CPU, terminate ends."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import ray
from conftest import reserve_by

import ray_quota
from ray_quota import QuotaTerminated, QuotaToken

pytestmark = pytest.mark.usefixtures("executor")


@ray.remote(num_cpus=1)
def wait_for_slot() -> float:
    token = QuotaToken("solo", expected_use=1)
    started = time.monotonic()
    with token.reserve(1):
        pass
    return time.monotonic() - started


@ray.remote(num_cpus=1)
def quick() -> bool:
    return True


def test_throttled_tasks_do_not_hold_their_cpu_while_waiting() -> None:
    holder = QuotaToken("solo", expected_use=1)
    held = holder.reserve(1)
    cpus = int(ray.cluster_resources()["CPU"])
    waiting = [wait_for_slot.remote() for _ in range(cpus)]  # enough to pin every CPU
    deadline = time.monotonic() + 60
    while waiters("solo") < cpus:  # every one of them is blocked in reserve
        assert time.monotonic() < deadline, "the waiting tasks never started"
        time.sleep(0.1)
    done, _ = ray.wait([quick.remote() for _ in range(cpus)], num_returns=cpus, timeout=60)
    assert len(done) == cpus, "tasks waiting on a throttled resource kept their CPUs"
    ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0.1)
    assert not ready, "the throttled tasks should still be waiting"
    held.commit()
    assert len(ray.get(waiting, timeout=60)) == cpus
    holder.close()


def waiters(resource: str) -> int:
    return next(s.waiters for s in ray_quota.status() if s.name == resource)


@ray.remote(max_retries=3)
def doomed_task(log: str, twin: str) -> None:
    with open(log, "a") as attempts:
        attempts.write("attempt\n")
    token = QuotaToken("doomed", expected_use=1)
    reserve_by(twin, token, 1)


def test_terminate_fails_the_task_naming_the_resource_and_is_not_retried(
        tmp_path: Path, twin: str) -> None:
    holder = QuotaToken("doomed", expected_use=1)
    held = holder.reserve(1)
    log = tmp_path / "attempts"
    with pytest.raises(QuotaTerminated, match="doomed"):
        ray.get(doomed_task.remote(str(log), twin))
    assert log.read_text().count("attempt") == 1
    held.commit()
    holder.close()


@ray.remote(max_restarts=0)
class DoomedActor:
    def reserve(self) -> None:
        QuotaToken("doomed", expected_use=1).reserve(1)

    def alive(self) -> bool:
        return True


@ray.remote(max_restarts=0)
class AsyncDoomedActor:
    async def reserve(self) -> None:
        await QuotaToken("doomed", expected_use=1).reserve_async(1)

    async def alive(self) -> bool:
        return True


@pytest.mark.parametrize("doomed", [DoomedActor, AsyncDoomedActor], ids=["sync", "async"])
def test_terminate_ends_the_actor_that_asked(doomed: Any) -> None:
    holder = QuotaToken("doomed", expected_use=1)
    held = holder.reserve(1)
    actor = doomed.remote()
    assert ray.get(actor.alive.remote())
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.reserve.remote())
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.alive.remote())
    held.commit()
    holder.close()
