"""How a token's life ends with the task, coroutine, actor or driver that holds it: cancellation,
retries, actors ending, a driver's clean exit, and threads a task starts."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import ray
from conftest import eventually

import ray_quota
from ray_quota import QuotaToken

pytestmark = pytest.mark.usefixtures("executor")


def in_use(name: str) -> int:
    return next(s for s in ray_quota.status() if s.name == name).in_use


@ray.remote
class Waiter:
    """An async actor (as a Ray Serve replica is) that gives up on a reservation in time."""

    def __init__(self) -> None:
        self.token = QuotaToken("conn", expected_use=1)

    async def use_once(self) -> None:
        async with await self.token.reserve_async(1) as reservation:
            reservation.commit(1)

    async def give_up_after(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.token.reserve_async(1), seconds)
        except asyncio.TimeoutError:
            return True
        return False


def test_a_reserve_async_cancelled_by_asyncio_leaves_the_queue_and_holds_nothing() -> None:
    waiter = Waiter.remote()
    ray.get(waiter.use_once.remote())  # the actor has a live lease now
    holder = QuotaToken("conn", expected_use=4)
    everything = holder.reserve(4)
    assert ray.get(waiter.give_up_after.remote(0.5))
    everything.commit(0)
    time.sleep(1.0)  # a request still queued would be granted into the actor's lease by now
    assert in_use("conn") == 0
    again = holder.reserve(4, timeout=2.0)  # every slot can be had again
    again.commit(0)
    holder.close()
    ray.kill(waiter)


class Flaky(Exception):
    """The error the retried tasks raise."""


@ray_quota.quota("tok", expected_use=10)
@ray.remote(max_retries=2, retry_exceptions=True)
def spend_then_raise(marker: str, failures: int) -> int:
    """Reserves, commits, then raises on its first ``failures`` attempts."""
    return spend_then_fail(ray_quota.current_token(), marker, failures)


def spend_then_fail(token: QuotaToken, marker: str, failures: int) -> int:
    """Reserve 5 and commit them on ``token``, then raise on the first ``failures`` attempts
    (counted in the file ``marker``); the attempt's number once it does not raise."""
    with token.reserve(5) as reservation:
        reservation.commit(5)
    path = Path(marker)
    tries = int(path.read_text()) if path.exists() else 0
    path.write_text(str(tries + 1))
    if tries < failures:
        raise Flaky(f"attempt {tries}")
    return tries


def test_an_exception_retry_under_quota_takes_the_token_up_again(tmp_path: Path) -> None:
    with QuotaToken("tok", expected_use=100) as parent:
        assert ray.get(spend_then_raise.remote(str(tmp_path / "a"), 2)) == 2  # third attempt
        assert parent.describe()[0] == 100  # the token came back to its parent once


def test_the_last_failing_attempt_gives_the_token_back(tmp_path: Path) -> None:
    with QuotaToken("tok", expected_use=100) as parent:
        with pytest.raises(Flaky):
            ray.get(spend_then_raise.remote(str(tmp_path / "b"), 5))
        assert (tmp_path / "b").read_text() == "3"  # the first try and two retries
        assert parent.describe()[0] == 100
        with pytest.raises(Flaky):  # no exception retries asked for: the first attempt gives back
            ray.get(spend_then_raise.options(retry_exceptions=False).remote(
                str(tmp_path / "c"), 1))
        assert parent.describe()[0] == 100


@ray.remote(max_retries=2, retry_exceptions=True)
def plain_spend_then_raise(token: QuotaToken, marker: str, failures: int) -> int:
    """Like :func:`spend_then_raise`, with the token as a plain argument (no ``@quota``)."""
    return spend_then_fail(token, marker, failures)


def test_an_exception_retry_takes_a_plain_token_argument_up_again(tmp_path: Path) -> None:
    """The first attempt's worker drops (closes) the token as the attempt ends; the retry
    brings the same bytes and takes it up again (before: every retry's reserve raised
    TokenClosedError)."""
    with QuotaToken("tok", expected_use=100) as parent:
        before = tokens_of("tok")
        assert ray.get(plain_spend_then_raise.remote(parent.split(10), str(tmp_path / "p"),
                                                     2)) == 2
        assert parent.describe()[0] == 90  # a plain argument is closed, not merged back
        assert eventually(lambda: tokens_of("tok") == before, within_s=10.0)  # and not left live


# ----------------------------------------------------------------- actors, drivers and threads


def tokens_of(name: str) -> int:
    return next(s.tokens for s in ray_quota.status() if s.name == name)



@ray_quota.quota("conn", expected_use=30)
@ray.remote(num_cpus=0)
class Session:
    """An actor that holds a token of its own besides the one ``@quota`` gives it."""

    def __init__(self) -> None:
        self.own = QuotaToken("conn", expected_use=5)

    def use(self) -> None:
        with ray_quota.current_token("conn").reserve(1) as reservation:
            reservation.commit(1)
        self.own.reserve(1)  # left open: the actor's end counts it as unused

    def leave(self) -> None:
        ray.actor.exit_actor()


def test_quota_actors_give_their_expected_use_back_when_they_end() -> None:
    with QuotaToken("conn", expected_use=100) as parent:
        baseline = tokens_of("conn")
        actors = [Session.remote() for _ in range(3)]
        ray.get([actor.use.remote() for actor in actors])
        assert parent.describe()[0] == 10
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actors[0].leave.remote())  # exit_actor()
        del actors  # the other two: their handles dropped
        assert eventually(lambda: parent.describe()[0] == 100, within_s=10.0)
        assert eventually(lambda: (tokens_of("conn"), in_use("conn")) == (baseline, 0),
                          within_s=10.0)


DRIVER = """
import sys
import ray, ray_quota
ray.init(address=sys.argv[1])
token = ray_quota.QuotaToken("budget", expected_use=100)
child = token.split(40)                 # never used: released with its parent's process
reservation = token.reserve(100)
reservation.commit(10)                  # 90 go back (or stay spare in this process's lease)
open_one = token.reserve(5)             # left open: a clean exit counts it as unused
print("reserved", flush=True)
sys.exit(0)
"""


def test_a_driver_that_exits_cleanly_is_charged_what_it_committed_and_its_tokens_go() -> None:
    available = next(s.available for s in ray_quota.status() if s.name == "budget")
    tokens = tokens_of("budget")
    address = ray.get_runtime_context().gcs_address
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", DRIVER, address], capture_output=True,
                          text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert "reserved" in done.stdout
    # At once (no lease had to expire): charged 10, and both tokens are gone.
    assert eventually(lambda: tokens_of("budget") == tokens, within_s=3.0)
    assert next(s.available for s in ray_quota.status() if s.name == "budget") == available - 10


def split_from_a_thread() -> tuple[tuple[int, str | None], int]:
    """Start a ``@quota`` task from a thread of this task; return (its expected use and label,
    my expected use)."""
    with ThreadPoolExecutor(2) as threads:
        child_use = threads.submit(lambda: ray.get(child_use_of.remote())).result()
        mine = threads.submit(lambda: ray_quota.current_token("tok").describe()[0]).result()
    return child_use, mine


@ray_quota.quota("tok", expected_use=7)
@ray.remote(num_cpus=0)
def child_use_of() -> tuple[int, str | None]:
    token = ray_quota.current_token("tok")
    return token.expected_use, token.label  # a split inherits its parent's label


@ray_quota.quota("tok", expected_use=50)
@ray.remote(num_cpus=0)
def starts_threads() -> tuple[tuple[int, str | None], int]:
    return split_from_a_thread()


def test_threads_a_task_starts_see_its_token_and_split_from_it() -> None:
    with QuotaToken("tok", expected_use=100, label="team-t") as parent:
        baseline = tokens_of("tok")
        # A split of the task's token, not a fresh one of its own (which has no label).
        assert ray.get(starts_threads.remote()) == ((7, "team-t"), 50)
        assert parent.describe()[0] == 100
        assert tokens_of("tok") == baseline


@ray_quota.quota("tok", expected_use=10)
@ray.remote(num_cpus=0)
def endless(marker: str) -> Iterator[int]:
    """Streams its token's expected use until cancelled; says what it saw when closed."""
    try:
        while True:
            yield ray_quota.current_token().expected_use
            time.sleep(0.05)
    finally:
        Path(marker).write_text(str(ray_quota.current_token().expected_use))


@ray_quota.quota("tok", expected_use=20)
@ray.remote(num_cpus=0)
class Streamer:
    async def stream(self, n: int) -> AsyncIterator[int]:
        for _ in range(n):
            async with await ray_quota.current_token().reserve_async(1) as reservation:
                reservation.commit(1)
            yield ray_quota.current_token().expected_use


def test_a_generator_runs_in_scope_and_gives_back_when_its_stream_is_cancelled(
        tmp_path: Path) -> None:
    marker = tmp_path / "closed"
    with QuotaToken("tok", expected_use=100) as parent:
        stream = endless.remote(str(marker))
        assert [ray.get(next(stream)) for _ in range(3)] == [10, 10, 10]
        ray.cancel(stream)  # its finally runs in scope, then the give-back
        assert eventually(lambda: marker.exists() and parent.describe()[0] == 100,
                          within_s=10.0)
        assert marker.read_text() == "10"
        streamer = Streamer.remote()
        assert [ray.get(ref) for ref in streamer.stream.remote(3)] == [20, 20, 20]
        del streamer
        assert eventually(lambda: parent.describe()[0] == 100, within_s=10.0)


def test_quota_refuses_an_async_generator_task_which_ray_cannot_run() -> None:
    async def numbers() -> AsyncIterator[int]:
        yield 1

    with pytest.raises(TypeError, match="actor methods"):
        ray_quota.quota("tok", expected_use=1)(ray.remote(numbers))


_KEPT: list[Any] = []  # reservations left open on purpose, so that no finaliser commits them


@ray_quota.quota("budget", expected_use=50)
@ray.remote(max_retries=1, retry_exceptions=True)
def leave_one_open_then_raise(marker: str) -> int:
    path = Path(marker)
    tries = int(path.read_text()) if path.exists() else 0
    path.write_text(str(tries + 1))
    if tries == 0:
        _KEPT.append(ray_quota.current_token().reserve(30))
        raise Flaky("with a reservation open")
    with ray_quota.current_token().reserve(5) as reservation:
        reservation.commit(5)
    return tries


def budget_available() -> int:
    return next(s.available for s in ray_quota.status() if s.name == "budget")


def test_an_attempt_that_raises_for_a_retry_counts_its_open_reservation_as_unused(
        tmp_path: Path) -> None:
    before = budget_available()
    with QuotaToken("budget", expected_use=100) as parent:
        assert ray.get(leave_one_open_then_raise.remote(str(tmp_path / "n"))) == 1
        assert parent.describe()[0] == 100
    assert eventually(lambda: budget_available() == before - 5, within_s=3.0)


@ray.remote(num_cpus=0)
class PoolWorker:
    """A Ray Data style pool actor: it takes one child token from a queue when it starts."""

    def __init__(self, children: Any) -> None:
        self.token = children.get()

    def use(self) -> int:
        with self.token.reserve(1) as reservation:
            reservation.commit(1)
        return self.token.expected_use


def test_one_split_per_pool_actor_through_a_queue() -> None:
    from ray.util.queue import Queue

    with QuotaToken("tok", expected_use=100) as parent:
        children = Queue()
        for _ in range(2):
            children.put(parent.split(30))
        workers = [PoolWorker.remote(children) for _ in range(2)]
        assert ray.get([worker.use.remote() for worker in workers]) == [30, 30]
        del workers
        assert eventually(lambda: parent.describe()[0] == 100, within_s=10.0)
