"""An async Ray actor that serves many requests at once under two limits, with ``reserve_async``.

The actor holds two tokens, given to it at creation (passing a token moves it into the actor):
one on ``llm-requests`` (at most 8 calls in flight) and one on ``llm-tokens`` (the provider's
tokens per minute). Each request awaits both reservations, so waiting never blocks the actor's
event loop: other requests keep being served meanwhile. The same pattern fits a Ray Serve
deployment.

    python examples/async_actor.py          # 40 requests
    python examples/async_actor.py 200
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from pathlib import Path
from typing import Any

import ray

import ray_quota
from ray_quota import QuotaToken

MANIFEST = Path(__file__).resolve().parent / "quota.yaml"
MAX_TOKENS = 200  # the most one call uses


@ray.remote(num_cpus=0)
class LLMClient:
    """Async: every method is a coroutine, many run at once on the actor's event loop."""

    def __init__(self, requests: QuotaToken, tokens: QuotaToken) -> None:
        self.requests = requests
        self.tokens = tokens
        self.in_flight = 0
        self.most_in_flight = 0

    async def ask(self, prompt: str) -> int:
        async with await self.requests.reserve_async(1), \
                await self.tokens.reserve_async(MAX_TOKENS) as reservation:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            await asyncio.sleep(random.uniform(0.01, 0.05))  # the "model call"
            used = random.randint(MAX_TOKENS // 2, MAX_TOKENS)
            reservation.commit(used)
            self.in_flight -= 1
        return used

    def most_at_once(self) -> int:
        return self.most_in_flight

    def close(self) -> None:
        """Release both tokens now, rather than when their leases run out."""
        self.requests.close()
        self.tokens.close()


def run(size: int, requests_limit: int, burst: int, refill_per_s: float) -> dict[str, Any]:
    actor = LLMClient.remote(QuotaToken("llm-requests", expected_use=requests_limit),
                             QuotaToken("llm-tokens", expected_use=MAX_TOKENS * requests_limit))
    started = time.monotonic()
    used = sum(ray.get([actor.ask.remote(f"question {i}") for i in range(size)]))
    elapsed = time.monotonic() - started
    most = ray.get(actor.most_at_once.remote())
    ray.get(actor.close.remote())
    ray.kill(actor)
    allowed = burst + refill_per_s * elapsed
    print(f"{size} requests used {used:,} tokens in {elapsed:.1f}s (the limit allows "
          f"{allowed:,.0f}); at most {most} in flight (limit {requests_limit})")
    return {"requests": size, "tokens_used": used, "allowed": allowed, "most_in_flight": most,
            "requests_limit": requests_limit}


def main(size: int = 40) -> dict[str, Any]:
    """Send ``size`` concurrent requests to the async actor; returns use against the limits."""
    ray_was_running = ray.is_initialized()
    info = ray_quota.init(manifest=MANIFEST, environment="local")  # starts a Ray if none runs
    try:
        tokens = info.resources["llm-tokens"]
        return run(size, info.resources["llm-requests"].value, tokens.burst, tokens.refill_per_s)
    finally:
        if not ray_was_running:
            ray.shutdown()  # a local Ray takes its executor with it


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:2]))
