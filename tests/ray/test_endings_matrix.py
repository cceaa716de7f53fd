"""Every kind of quota'd Ray callable through every way it can end leaves no quota behind.

Each case opens a parent token, runs one kind of ``@quota`` callable (called through
``.options()``) as a child of it, ends it one way, and then checks that the executor's status
for the resource is back where it was before (tokens, slots in use, leases) and that the parent
has its whole expected use back.

An ending that runs no code in the holder (a force-cancelled task, a killed actor) leaves the
token to the executor, which releases tokens nobody names and gives a released child's expected
use back to its parent (the orphan release).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from conftest import TEST_MANIFEST, forget_state

import ray_quota
from ray_quota import QuotaToken, current_token, quota

RESOURCE = "conn"
PARENT_USE = 100
CHILD_USE = 10
TTL_S = 2.0  # lease time-to-live: a dead holder's slots come back within this
# How long a case may take to get back to its baseline: a killed holder's lease expires within
# a TTL, then its token, which nobody names any more, is released after the orphan grace.
SETTLE_S = 4 * TTL_S


@pytest.fixture(scope="module")
def executor(ray_cluster: None, state_dir: Path) -> Iterator[None]:
    """One executor for every case, with a short lease time-to-live so that dead holders clear
    quickly; each case compares against the status it found."""
    from ray_quota._runtime import renewer

    ray_quota.shutdown()
    forget_state(state_dir, "test")
    ray_quota.init(manifest=TEST_MANIFEST, environment="test",
                   policy=ray_quota.Policy(lease_ttl_s=TTL_S, orphan_grace_s=TTL_S), metrics_port=None)
    yield
    renewer.flush()
    ray_quota.shutdown()


class Flaky(Exception):
    """What the first attempt raises when a case asks for an exception retry."""


def act(ending: str, marker: str) -> int:
    """Every kind's body: hold a slot, count the attempt, end as the case says.

    ``raise``/``crash``: the first attempt raises / exits the process, the retry succeeds.
    ``block``: hold a slot until cancelled or killed (the marker says it is running).
    """
    with current_token(RESOURCE).reserve(1) as reservation:
        reservation.commit(1)
    path = Path(marker)
    tries = int(path.read_text()) if path.exists() else 0
    path.write_text(str(tries + 1))
    if tries == 0 and ending == "raise":
        raise Flaky("first attempt")
    if tries == 0 and ending == "crash":
        os._exit(1)
    if ending == "block":
        with current_token(RESOURCE).reserve(1):
            for _ in range(600):
                time.sleep(0.1)
                if _cancelled():
                    break
    return tries


def _cancelled() -> bool:
    """Whether a (sync) actor task was cancelled: Ray does not interrupt those."""
    context = ray.get_runtime_context()
    return bool(context.get_actor_id()) and context.is_canceled()


async def act_async(ending: str, marker: str) -> int:
    """``act`` for an async actor: a running coroutine is cancelled at its next await."""
    if ending != "block":
        return act(ending, marker)
    async with await current_token(RESOURCE).reserve_async(1):
        Path(marker).write_text("1")
        await asyncio.sleep(60)
    return 0


RETRIES: dict[str, Any] = {"max_retries": 1, "retry_exceptions": [Flaky]}


@quota(RESOURCE, expected_use=CHILD_USE)
@ray.remote(**RETRIES)
def function(ending: str, marker: str) -> int:
    return act(ending, marker)


@quota(RESOURCE, expected_use=CHILD_USE)
@ray.remote(**RETRIES)
def generator(ending: str, marker: str) -> Iterator[int]:
    yield -1
    yield act(ending, marker)


@quota(RESOURCE, expected_use=CHILD_USE)
@ray.remote(num_returns="streaming", **RETRIES)
def streaming(ending: str, marker: str) -> Iterator[int]:
    yield -1
    yield act(ending, marker)


class Worker:
    def run(self, ending: str, marker: str) -> int:
        return act(ending, marker)


class AsyncWorker:
    async def run(self, ending: str, marker: str) -> int:
        return await act_async(ending, marker)


ACTOR_RETRIES: dict[str, Any] = {"max_restarts": 1, "max_task_retries": 1}
SyncActor = quota(RESOURCE, expected_use=CHILD_USE)(ray.remote(**ACTOR_RETRIES)(Worker))
ThreadedActor = quota(RESOURCE, expected_use=CHILD_USE)(
    ray.remote(max_concurrency=4, **ACTOR_RETRIES)(Worker))
AsyncActor = quota(RESOURCE, expected_use=CHILD_USE)(ray.remote(**ACTOR_RETRIES)(AsyncWorker))


# ----------------------------------------------------------------------------- running a case


class Case:
    """One kind, started as a child of the token in scope, that the test can end."""

    def start(self, ending: str, marker: str) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Wait for a normal end (success, or success after a retry)."""
        raise NotImplementedError

    def cancel(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError


class TaskCase(Case):
    def __init__(self, task: Any, streams: bool) -> None:
        self.task, self.streams = task, streams

    def start(self, ending: str, marker: str) -> None:
        self.ref = self.task.options(num_cpus=0.5).remote(ending, marker)

    def finish(self) -> None:
        if self.streams:
            assert [ray.get(ref) for ref in self.ref][-1] in (0, 1)
        else:
            assert ray.get(self.ref) in (0, 1)

    def cancel(self) -> None:
        ray.cancel(self.ref)

    def kill(self) -> None:
        ray.cancel(self.ref, force=True)


class ActorCase(Case):
    def __init__(self, actor_class: Any) -> None:
        self.actor_class = actor_class

    def start(self, ending: str, marker: str) -> None:
        self.actor = self.actor_class.options(num_cpus=0).remote()
        self.ref = self.actor.run.options(retry_exceptions=[Flaky]).remote(ending, marker)

    def finish(self) -> None:
        assert ray.get(self.ref) in (0, 1)
        self.drop()

    def drop(self) -> None:
        del self.actor, self.ref  # the last handle gone: Ray ends the actor gracefully

    def cancel(self) -> None:
        ray.cancel(self.ref)
        self.drop()

    def kill(self) -> None:
        ray.kill(self.actor)
        self.drop()


KINDS: dict[str, Callable[[], Case]] = {
    "function": lambda: TaskCase(function, streams=False),
    "generator": lambda: TaskCase(generator, streams=True),
    "streaming": lambda: TaskCase(streaming, streams=True),
    "actor": lambda: ActorCase(SyncActor),
    "threaded-actor": lambda: ActorCase(ThreadedActor),
    "async-actor": lambda: ActorCase(AsyncActor),
}
ENDINGS = ("success", "raise", "crash", "cancel", "kill")


def snapshot() -> tuple[int, int, int]:
    status = next(s for s in ray_quota.status() if s.name == RESOURCE)
    return status.tokens, status.in_use, status.leases


def wait_for(marker: Path) -> None:
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline, "the case never started"
        time.sleep(0.05)
    time.sleep(0.2)  # into its sleep, holding its slot


def cases() -> Iterator[Any]:
    """Kind by ending."""
    for ending in ENDINGS:
        for kind in KINDS:
            yield pytest.param(kind, ending, id=f"{kind}-{ending}")


@pytest.mark.usefixtures("executor")
@pytest.mark.parametrize(("kind", "ending"), list(cases()))
def test_every_kind_and_ending_leaves_the_status_as_it_was(kind: str, ending: str,
                                                            tmp_path: Path) -> None:
    with QuotaToken(RESOURCE, expected_use=PARENT_USE) as parent:
        baseline = snapshot()
        case = KINDS[kind]()
        marker = tmp_path / "attempts"
        case.start("block" if ending in ("cancel", "kill") else ending, str(marker))
        if ending in ("cancel", "kill"):
            wait_for(marker)
            case.cancel() if ending == "cancel" else case.kill()
        else:
            case.finish()
        del case
        deadline = time.monotonic() + SETTLE_S
        while (snapshot(), parent.describe()[0]) != (baseline, PARENT_USE):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert (snapshot(), parent.describe()[0]) == (baseline, PARENT_USE)
