"""The @quota decorator, current_token(), and QuotaExecutor on a real local Ray."""

from __future__ import annotations

import pytest
import ray

import ray_quota
from conftest import eventually
from ray_quota import QuotaExecutor, QuotaToken, TokenStateError, current_token, quota

pytestmark = pytest.mark.usefixtures("executor")


def live_tokens(resource: str = "tok") -> int:
    return next(s.tokens for s in ray_quota.status() if s.name == resource)


@quota("tok", expected_use=100)
@ray.remote
def leaf(amount: int) -> tuple[int, str | None]:
    token = current_token()
    with token.reserve(amount) as reservation:
        reservation.commit(amount)
    return token.expected_use, token.label


@quota("tok", expected_use=300)
@ray.remote
def fan_out(children: int) -> list[tuple[int, str | None]]:
    return ray.get([leaf.remote(5) for _ in range(children)])


@quota("tok", expected_use=50)
@ray.remote
def takes_token(token: QuotaToken) -> int:
    with token.reserve(1):
        pass
    return token.expected_use


@quota("tok", expected_use=40)
@ray.remote
class AsyncCaller:
    async def call(self) -> int:
        async with await current_token("tok").reserve_async(3) as reservation:
            reservation.commit(3)
        return current_token().expected_use


@quota("conn", expected_use=1)
@quota("tok", expected_use=10)
@ray.remote
class Caller:
    def call(self) -> tuple[str, str]:
        with current_token("conn").reserve(1), current_token("tok").reserve(2):
            return current_token("conn").resource, current_token("tok").resource


def test_a_task_called_with_a_token_in_scope_gets_a_split_child_and_gives_it_back() -> None:
    with QuotaToken("tok", expected_use=1000, label="team-a") as parent:
        assert ray.get(leaf.remote(10)) == (100, "team-a")
        # the child's expected use came back (queued at the task's end: moments later)
        assert eventually(lambda: parent.describe()[0] == 1000)
        assert live_tokens() == 1


def test_a_task_called_with_no_token_in_scope_gets_a_fresh_one_released_after() -> None:
    assert ray.get(leaf.remote(10)) == (100, None)
    assert eventually(lambda: live_tokens() == 0)


def test_nested_fan_out_conserves_expected_use() -> None:
    with QuotaToken("tok", expected_use=2000) as parent:
        results = ray.get([fan_out.remote(2) for _ in range(3)])
        assert [len(r) for r in results] == [2, 2, 2]
        assert eventually(lambda: parent.describe()[0] == 2000)
        assert live_tokens() == 1


def test_options_keep_working_and_an_explicit_token_is_used_as_is() -> None:
    assert ray.get(leaf.options(num_cpus=0.5, name="leaf-with-options").remote(1))[0] == 100
    own = QuotaToken("tok", expected_use=77)
    assert ray.get(takes_token.remote(token=own)) == 77
    assert ray.get(takes_token.remote()) == 50  # the function's `token` parameter is filled


def test_async_and_threaded_actor_classes_carry_tokens() -> None:
    async_caller = AsyncCaller.options(num_cpus=0).remote()
    assert ray.get([async_caller.call.remote() for _ in range(3)]) == [40, 40, 40]
    ray.kill(async_caller)
    caller = Caller.options(num_cpus=0).remote()
    assert ray.get(caller.call.remote()) == ("conn", "tok")
    ray.kill(caller)


def test_current_token_outside_any_scope_says_what_is_missing() -> None:
    with pytest.raises(TokenStateError, match="in scope"):
        current_token("tok")


def test_quota_refuses_what_it_cannot_wrap() -> None:
    with pytest.raises(TypeError, match="above @ray.remote"):
        quota("tok", expected_use=1)(lambda: None)
    with pytest.raises(ValueError, match="expected_use"):
        quota("tok", expected_use=0)


def spend(amount: int) -> int:
    with current_token("tok").reserve(amount) as reservation:
        reservation.commit(amount)
    return amount


def test_quota_executor_runs_tasks_under_one_budget() -> None:
    budget = QuotaToken("tok", expected_use=800)
    with QuotaExecutor(budget, expected_use=100, progress=False) as pool:
        assert list(pool.map(spend, [1, 2, 3, 4])) == [1, 2, 3, 4]
        assert pool.submit(spend, 5).result() == 5
    assert eventually(lambda: budget.describe()[0] == 800)
    budget.close()
