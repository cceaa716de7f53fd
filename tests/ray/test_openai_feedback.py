"""Provider feedback on the real session cluster: the real ``openai`` client, from Ray tasks
under ``@quota``, through the httpx transport, against the fake provider; and a driver that
knows a token's id cannot lower a limit with it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import ray

import ray_quota
from ray_quota import QuotaToken, quota
from ray_quota._core.protocol import EXECUTOR_NAME, NAMESPACE, ProviderSignal
from ray_quota._errors import QuotaError
from ray_quota.httpx import QuotaTransport
from ray_quota.testing import FakeProvider

TRUE_RATE = 300  # tokens per second the fake provider allows; "tok" allows 1000


def effective(resource: str = "tok") -> float | None:
    return next(s.effective_limit for s in ray_quota.status() if s.name == resource)


@quota("tok", expected_use=50)
@ray.remote
def ask(base_url: str, calls: int) -> list[int]:
    client = openai.OpenAI(base_url=base_url, api_key="fake", max_retries=8,
                           http_client=httpx.Client(transport=QuotaTransport()))
    used = []
    for _ in range(calls):  # the user's code: the client call, nothing else
        reply = client.chat.completions.create(
            model="fake", max_tokens=40, messages=[{"role": "user", "content": "x" * 40}])
        used.append(reply.usage.total_tokens if reply.usage else -1)
    return used


@pytest.mark.usefixtures("executor")
def test_openai_calls_from_ray_tasks_teach_the_executor_the_providers_limit() -> None:
    assert effective() == 1000.0
    with FakeProvider(TRUE_RATE, burst_s=1.0) as provider:
        results = ray.get([ask.remote(provider.base_url, 10) for _ in range(4)], timeout=120)
        refused = sum(not answer.served for answer in provider.answers)
    assert all(used == [30] * 10 for used in results)
    learned = effective()
    assert learned is not None and learned < 1000.0, (learned, refused)


@pytest.mark.usefixtures("executor")
def test_knowing_a_token_id_does_not_let_a_driver_lower_the_limit() -> None:
    token = QuotaToken("tok", expected_use=10)
    with token.reserve(5) as reservation:
        reservation.commit(5)
    executor = ray.get_actor(EXECUTOR_NAME, namespace=NAMESPACE)
    key = "someone-else:0"
    for claimant, secret in (("not-the-claimant", "guess"), (token._claimant, "guess")):
        answer = ray.get(executor.feedback.remote(token._id, 0, claimant, key,
                                                  ProviderSignal(True, 30.0), secret))
        assert isinstance(answer, QuotaError)
    assert effective() == 1000.0
    with token.reserve(5, timeout=5) as reservation:  # nothing held
        reservation.commit(5)
    token.close()


@pytest.mark.usefixtures("executor")
def test_the_owner_of_a_reservation_can_report_a_refusal() -> None:
    token = QuotaToken("tok", expected_use=10)
    with token.reserve(5) as reservation:
        reservation.refused(0.2)
        reservation.commit(0)
    for _ in range(50):
        if effective() == 700.0:
            break
        ray.get(ray.get_actor(EXECUTOR_NAME, namespace=NAMESPACE).status.remote())
    assert effective() == 700.0
    token.close()


@pytest.fixture
def no_executor(ray_cluster: None, state_dir: Path) -> Iterator[None]:
    """As tests/ray/test_examples.py: the example starts its own executor on quota.yaml."""
    from conftest import forget_state

    ray_quota.shutdown()
    forget_state(state_dir, "local")
    yield
    ray_quota.shutdown()


def test_the_openai_example_learns_a_lower_limit(no_executor: None) -> None:
    from examples import openai_feedback

    result = openai_feedback.main(tasks=4)
    assert result["calls"] == 4 * openai_feedback.CALLS
    assert result["effective_after"] < result["effective_before"] == 60000.0
