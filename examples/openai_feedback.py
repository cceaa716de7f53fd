"""The real OpenAI client from Ray tasks, its limit learned from the provider's 429s.

The manifest says the provider allows 60,000 tokens a minute (``llm-tokens`` in quota.yaml); the
provider here (a fake one on 127.0.0.1, :class:`ray_quota.testing.FakeProvider`) really allows
half of that. Each task's code is the client call and nothing else: the client's httpx transport
(:class:`ray_quota.httpx.QuotaTransport`) reserves from the task's token before each request,
commits the usage the answer reports, and tells the executor about 429s and the tokens the
provider says remain, so the executor lowers ``llm-tokens``' effective limit for every task at
once. The OpenAI client retries a 429 itself, after the provider's ``Retry-After``.

    python examples/openai_feedback.py          # 4 tasks, 5 calls each
    python examples/openai_feedback.py 8
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import ray

import ray_quota
from ray_quota import QuotaToken, quota
from ray_quota.httpx import QuotaTransport
from ray_quota.testing import FakeProvider

MANIFEST = Path(__file__).resolve().parent / "quota.yaml"
RESOURCE = "llm-tokens"
TRUE_TOKENS_PER_S = 500  # the provider's real limit: half of the manifest's 60,000 a minute
CALLS = 5


@quota(RESOURCE, expected_use=250)
@ray.remote
def summarize(base_url: str, texts: list[str]) -> list[int]:
    client = openai.OpenAI(base_url=base_url, api_key="not-needed", max_retries=8,
                           http_client=httpx.Client(transport=QuotaTransport()))
    used = []
    for text in texts:
        reply = client.chat.completions.create(
            model="fake-model", max_tokens=200,
            messages=[{"role": "user", "content": f"Summarize: {text}"}])
        used.append(reply.usage.total_tokens if reply.usage else 0)
    return used


def main(tasks: int = 4) -> dict[str, Any]:
    """Run ``tasks`` tasks of :data:`CALLS` calls; returns the calls, tokens used, the
    provider's refusals, and the effective limit before and after (tokens a minute)."""
    ray_was_running = ray.is_initialized()
    ray_quota.init(manifest=MANIFEST, environment="local")
    try:
        # A small window (2 s of its limit) so that the demo reaches it in seconds.
        with FakeProvider(TRUE_TOKENS_PER_S, burst_s=2.0) as provider, \
                QuotaToken(RESOURCE, expected_use=250 * tasks):
            before = _effective()
            texts = [f"document {i} " * 40 for i in range(CALLS)]
            used = ray.get([summarize.remote(provider.base_url, texts) for _ in range(tasks)])
            refused = sum(not answer.served for answer in provider.answers)
        result = {"calls": sum(len(u) for u in used), "tokens": sum(map(sum, used)),
                  "refused": refused, "effective_before": before, "effective_after": _effective()}
    finally:
        if not ray_was_running:
            ray_quota.shutdown()
            ray.shutdown()
    print(f"{result['calls']} calls, {result['tokens']} tokens; the provider refused "
          f"{result['refused']}; {RESOURCE}'s effective limit {result['effective_before']:,.0f} "
          f"-> {result['effective_after']:,.0f} tokens a minute")
    return result


def _effective() -> float:
    limit = next(s.effective_limit for s in ray_quota.status() if s.name == RESOURCE)
    return float(limit or 0.0)


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:2]))
