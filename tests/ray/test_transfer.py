"""Passing a token moves it: task and actor arguments, return values, ray.put, and Ray retries."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import ray

import ray_quota
from ray_quota import QuotaError, QuotaToken, TokenClosedError, TokenMovedError

pytestmark = pytest.mark.usefixtures("executor")


@ray.remote
def spend(token: QuotaToken, amount: int = 5) -> int:
    with token.reserve(amount) as reservation:
        reservation.commit(amount)
    return token.expected_use


@ray.remote
def make_token() -> QuotaToken:
    token = QuotaToken("tok", expected_use=9)
    token.reserve(3).commit(3)
    return token


@ray.remote
class Keeper:
    def __init__(self) -> None:
        self.token: QuotaToken | None = None

    def keep(self, token: QuotaToken) -> int:
        self.token = token
        with token.reserve(2):
            pass
        return token.expected_use

    def spend_again(self) -> int:
        assert self.token is not None
        with self.token.reserve(2):
            pass
        return self.token.expected_use


def test_task_argument_moves_the_token_and_the_old_handle_refuses() -> None:
    token = QuotaToken("tok", expected_use=10)
    assert ray.get(spend.remote(token)) == 10
    with pytest.raises(TokenMovedError, match="split it first"):
        token.reserve(1)
    with pytest.raises(TokenMovedError):
        token.split(1)


def test_actor_argument_moves_the_token_and_the_actor_keeps_using_it() -> None:
    keeper = Keeper.remote()
    token = QuotaToken("tok", expected_use=4)
    assert ray.get(keeper.keep.remote(token)) == 4
    assert ray.get(keeper.spend_again.remote()) == 4  # another method call, same actor
    with pytest.raises(TokenMovedError):
        token.reserve(1)
    ray.kill(keeper)


def test_return_value_moves_the_token_to_the_caller() -> None:
    token = ray.get(make_token.remote())
    assert token.expected_use == 9
    with token.reserve(4) as reservation:
        reservation.commit(4)
    token.close()


def test_ray_put_moves_the_token_and_only_one_taker_may_use_it() -> None:
    token = QuotaToken("tok", expected_use=6)
    ref = ray.put(token)
    with pytest.raises(TokenMovedError):
        token.reserve(1)
    keeper = Keeper.remote()
    assert ray.get(keeper.keep.remote(ref)) == 6
    with pytest.raises(TokenMovedError, match="already taken up"):
        ray.get(spend.remote(ref))
    assert ray.get(keeper.spend_again.remote()) == 6  # the first taker is unaffected
    ray.kill(keeper)


@ray.remote(max_retries=2)
def spend_then_crash_once(token: QuotaToken, marker: str) -> int:
    with token.reserve(5) as reservation:
        reservation.commit(5)
    if not os.path.exists(marker):
        Path(marker).write_text("crashed once")
        os._exit(1)  # a worker crash: Ray retries the same task
    return token.expected_use


def test_a_ray_retry_of_the_same_task_may_take_the_token_up_again(tmp_path: Path) -> None:
    token = QuotaToken("tok", expected_use=8)
    marker = tmp_path / "crashed"
    assert ray.get(spend_then_crash_once.remote(token, str(marker))) == 8
    assert marker.exists()


def test_a_token_released_by_its_taker_is_closed_for_later_takers() -> None:
    token = QuotaToken("tok", expected_use=6)
    ref = ray.put(token)
    ray.get(spend.remote(ref))  # the task ends and drops the token: it is released
    with pytest.raises(QuotaError) as failure:
        ray.get(spend.remote(ref))
    assert isinstance(failure.value, TokenClosedError)  # errors cross Ray as themselves


def live_tokens(resource: str) -> int:
    return next(s.tokens for s in ray_quota.status() if s.name == resource)


def test_a_token_a_task_never_closes_is_released_when_the_task_is_done() -> None:
    before = live_tokens("tok")
    ray.get([spend.remote(QuotaToken("tok", expected_use=3)) for _ in range(4)])
    deadline = time.monotonic() + 4 * 3.0  # at the latest when its lease expires
    while live_tokens("tok") > before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live_tokens("tok") == before


@ray.remote
def spend_in_threads(token: QuotaToken) -> int:
    def work() -> None:
        with token.reserve(1) as reservation:
            reservation.commit(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return token.expected_use


def test_threads_of_the_task_that_took_a_token_up_may_use_it() -> None:
    token = QuotaToken("conn", expected_use=2)
    assert ray.get(spend_in_threads.remote(token)) == 2
