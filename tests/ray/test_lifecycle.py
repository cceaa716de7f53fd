"""How a token's life ends with the task or coroutine that holds it: cancellation and retries."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import ray

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
    with ray_quota.current_token().reserve(5) as reservation:
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
