"""Tokens whose holder ended holding nothing (issue 14; issue 18 item 3), on the real session
cluster: a ``@quota`` child cancelled or crashed before it reserved gives its expected use back
to its parent once the orphan grace passed; a token of a dead process that never reserved is
released, as is a token argument whose task took it up and died unused; and a token argument
that waits in Ray's queue longer than the grace, its task unable to start, is kept, because its
sender names it until the task takes it up."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from conftest import TEST_MANIFEST, forget_state

import ray_quota
from ray_quota import QuotaToken
from ray_quota._runtime import renewer

# Several renewal intervals: a live process names its idle tokens in time.
GRACE_S = 3.0
CPUS = 4  # the session cluster's (see conftest)


@pytest.fixture
def short_grace(ray_cluster: None, state_dir: Path) -> Iterator[Any]:
    ray_quota.shutdown()
    forget_state(state_dir, "test")
    info = ray_quota.init(manifest=TEST_MANIFEST, environment="test", metrics_port=None,
                          policy=ray_quota.Policy(lease_ttl_s=3.0, orphan_grace_s=GRACE_S))
    yield info
    renewer.flush()
    ray_quota.shutdown()


pytestmark = pytest.mark.usefixtures("short_grace")


def live_tokens(resource: str) -> int:
    return next(s.tokens for s in ray_quota.status() if s.name == resource)


def wait_for(condition: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)
    return bool(condition())


@ray.remote(num_cpus=CPUS)
def hold_every_cpu(seconds: float) -> None:
    time.sleep(seconds)


@ray.remote
def started() -> bool:
    return True


@ray_quota.quota("tok", expected_use=30)
@ray.remote(max_retries=0)
def crash_before_reserving() -> None:
    os._exit(1)  # no close, no give-back, no final report


@ray_quota.quota("tok", expected_use=30)
@ray.remote
def never_runs() -> None:
    raise AssertionError("cancelled before it started")


@ray.remote(max_retries=0)
def open_and_die() -> None:
    _own = QuotaToken("tok", expected_use=3)  # never reserved; never dropped
    time.sleep(1.5)  # renewals name it
    os._exit(1)


@ray.remote(max_retries=0)
def hold_then_die(token: QuotaToken) -> None:
    time.sleep(2.5)  # more than a renewal interval: this process takes the token up
    os._exit(1)


@ray.remote
def use(token: QuotaToken) -> int:
    with token.reserve(1) as reservation:
        reservation.commit(1)
    return token.describe()[0]


def test_a_quota_child_that_crashed_before_reserving_gives_its_share_back() -> None:
    with QuotaToken("tok", expected_use=100) as parent:
        with pytest.raises(ray.exceptions.WorkerCrashedError):
            ray.get(crash_before_reserving.remote())
        assert parent.describe()[0] == 70
        assert wait_for(lambda: parent.describe()[0] == 100, GRACE_S + 8.0)
        assert live_tokens("tok") == 1


def test_quota_children_cancelled_before_they_started_give_their_shares_back() -> None:
    ray.get(started.remote())
    blocker = hold_every_cpu.remote(60.0)
    with QuotaToken("tok", expected_use=100) as parent:
        refs = [never_runs.remote() for _ in range(3)]
        assert parent.describe()[0] == 10
        for ref in refs:
            ray.cancel(ref)
        for ref in refs:
            with pytest.raises(ray.exceptions.TaskCancelledError):
                ray.get(ref, timeout=30)
        assert wait_for(lambda: parent.describe()[0] == 100, GRACE_S + 8.0)
        assert parent.split(50).expected_use == 50  # the next child is whole again
    ray.cancel(blocker, force=True)


def test_a_never_reserved_token_of_a_dead_process_is_released() -> None:
    with pytest.raises(ray.exceptions.WorkerCrashedError):
        ray.get(open_and_die.remote())
    assert wait_for(lambda: live_tokens("tok") == 0, GRACE_S + 8.0)


def test_a_token_argument_whose_task_died_without_using_it_is_released() -> None:
    token = QuotaToken("tok", expected_use=5)
    with pytest.raises(ray.exceptions.WorkerCrashedError):
        ray.get(hold_then_die.remote(token))
    # Its sender stopped naming it once the task took it up; nobody names it now.
    assert wait_for(lambda: live_tokens("tok") == 0, GRACE_S + 8.0)


def test_a_token_argument_queued_longer_than_the_grace_is_kept() -> None:
    ray.get(started.remote())
    wait_s = 3 * GRACE_S
    blocker = hold_every_cpu.remote(wait_s)
    time.sleep(0.5)  # the blocker holds every CPU: the task below waits in Ray's queue
    token = QuotaToken("tok", expected_use=7)
    ref = use.remote(token)  # nobody but this driver knows of it until the task starts
    assert ray.get(ref, timeout=wait_s + 30) == 7  # it was not released meanwhile
    ray.get(blocker)
