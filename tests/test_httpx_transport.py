"""The httpx transport against the fake provider (a real HTTP server on 127.0.0.1), with a
recording stand-in for the token: what it reserves, commits and reports. No Ray here; the
whole path through the executor is tests/ray/test_openai_feedback.py."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest

from ray_quota._spec import Kind, ResourceSpec
from ray_quota.httpx import AsyncQuotaTransport, QuotaTransport, estimate_tokens, parse_seconds
from ray_quota.testing import FakeProvider


class _Reservation:
    def __init__(self, log: list[tuple[Any, ...]], amount: int) -> None:
        self.log, self.amount, self.done = log, amount, False

    def refused(self, retry_after_s: float | None = None, *, remaining: int | None = None,
                reset_s: float | None = None) -> None:
        self.log.append(("refused", retry_after_s, remaining))

    def remaining(self, units: int, reset_s: float | None = None) -> None:
        self.log.append(("remaining", units, reset_s))

    def commit(self, used: int | None = None) -> None:
        self.done = True
        self.log.append(("commit", used))

    def __enter__(self) -> _Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.done:
            self.commit(0)

    async def __aenter__(self) -> _Reservation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__()


class _Token:
    """Records what the transport asks of a token."""

    spec = ResourceSpec("tpm", Kind.RATE, 10**6, period_s=1.0, burst=10**6)

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []

    def reserve(self, amount: int) -> _Reservation:
        self.log.append(("reserve", amount))
        return _Reservation(self.log, amount)

    async def reserve_async(self, amount: int) -> _Reservation:
        return self.reserve(amount)


def test_estimate_is_max_tokens_plus_the_prompt_at_four_characters_a_token() -> None:
    request = httpx.Request("POST", "http://x/v1/chat/completions",
                            json={"messages": [{"role": "user", "content": "a" * 40}],
                                  "max_tokens": 100})
    assert estimate_tokens(request) == 110


@pytest.mark.parametrize("text,seconds", [("2", 2.0), ("0.5", 0.5), ("1m30s", 90.0),
                                          ("250ms", 0.25), ("6m0s", 360.0), ("soon", None),
                                          (None, None), ("-1", None)])
def test_header_durations_are_read_as_seconds(text: str | None, seconds: float | None) -> None:
    assert parse_seconds(text) == seconds


def test_the_openai_client_through_the_transport_commits_the_reported_usage() -> None:
    token = _Token()
    with FakeProvider(tokens_per_s=10_000) as provider:
        client = openai.OpenAI(base_url=provider.base_url, api_key="fake", max_retries=0,
                               http_client=httpx.Client(transport=QuotaTransport(token)))
        reply = client.chat.completions.create(
            model="m", max_tokens=40, messages=[{"role": "user", "content": "x" * 80}])
    assert reply.usage is not None and reply.usage.total_tokens == 20 + 20
    assert token.log[0] == ("reserve", 40 + 20)
    assert ("commit", 40) in token.log
    assert token.log[1][0] == "remaining"


def test_a_429_is_reported_with_its_retry_after_and_commits_nothing() -> None:
    token = _Token()
    with FakeProvider(tokens_per_s=10, burst_s=1.0) as provider:  # holds 10 tokens
        client = httpx.Client(transport=QuotaTransport(token))
        response = client.post(provider.base_url + "/chat/completions",
                               json={"messages": [{"content": "x" * 400}], "max_tokens": 50})
    assert response.status_code == 429
    kind, retry, remaining = token.log[1]
    assert kind == "refused" and retry is not None and retry > 0 and remaining is not None
    assert token.log[-1] == ("commit", 0)


def test_the_async_transport_does_the_same() -> None:
    token = _Token()

    async def main(url: str) -> int:
        client = openai.AsyncOpenAI(
            base_url=url, api_key="fake", max_retries=0,
            http_client=httpx.AsyncClient(transport=AsyncQuotaTransport(token)))
        reply = await client.chat.completions.create(
            model="m", max_tokens=40, messages=[{"role": "user", "content": "x" * 80}])
        return reply.usage.total_tokens if reply.usage else -1

    with FakeProvider(tokens_per_s=10_000) as provider:
        assert asyncio.run(main(provider.base_url)) == 40
    assert ("commit", 40) in token.log and token.log[0] == ("reserve", 60)


def test_a_failed_request_commits_nothing() -> None:
    token = _Token()
    client = httpx.Client(transport=QuotaTransport(token))
    with pytest.raises(httpx.ConnectError):
        client.post("http://127.0.0.1:9/v1/chat/completions", json={"messages": []})
    assert token.log[-1] == ("commit", 0)
