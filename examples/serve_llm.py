"""A Ray Serve deployment whose replicas share an LLM provider's limits, with fair shares by tenant.

Every replica of ``LLM`` serves HTTP requests of two tenants, ``premium`` (weight 3) and ``free``
(weight 1). The provider allows a number of tokens per minute (``llm-tokens``) and of requests in
flight at once (``llm-requests``); both are the cluster's, not the replica's: however many
replicas run, the limits hold, and when the tenants ask for more than the limits allow, they get
3:1 of what there is. Each request awaits its reservations (``reserve_async``), so a waiting
request never stalls the replica's event loop, and commits the tokens the model call really used.
The replicas open their tokens on first use with ``await QuotaToken.open_async(...)`` and close
them when Serve ends them (``async def __del__``).

``max_ongoing_requests`` is set high: requests should wait in ray_quota's fair queue, where the
tenants' weights count, rather than in Serve's router, which is first come, first served.

    python examples/serve_llm.py            # 12 s of 16 clients per tenant
    python examples/serve_llm.py 30 8       # 30 s, 8 clients per tenant
"""

from __future__ import annotations

import asyncio
import random
import socket
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import ray
from ray import serve
from starlette.requests import Request

import ray_quota
from ray_quota import QuotaToken

MANIFEST = Path(__file__).resolve().parent / "quota.yaml"
TENANTS = {"premium": 3, "free": 1}  # their weights: shares of whatever is contended
MAX_TOKENS = 60  # the most one model call uses
CALL_S = (0.2, 0.4)  # how long one model call takes
REPLICAS = 2


@ray.remote(num_cpus=0)
class Records:
    """Where the replicas put what each request did (one actor, so that all can be read)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def all(self) -> list[dict[str, Any]]:
        return self.rows


@serve.deployment(num_replicas=REPLICAS, max_ongoing_requests=1000,
                  ray_actor_options={"num_cpus": 0})
class LLM:
    """A replica: per tenant, one token on each limit, weighted by the tenant's share."""

    def __init__(self, records: Any) -> None:
        self.records = records
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.tokens: dict[str, tuple[QuotaToken, QuotaToken]] = {}
        self.opening = asyncio.Lock()

    async def tenant_tokens(self, tenant: str) -> tuple[QuotaToken, QuotaToken]:
        async with self.opening:
            if tenant not in self.tokens:
                weight = TENANTS[tenant]
                self.tokens[tenant] = (
                    await QuotaToken.open_async("llm-requests", weight, label=tenant),
                    await QuotaToken.open_async("llm-tokens", weight * MAX_TOKENS, label=tenant))
        return self.tokens[tenant]

    async def __call__(self, request: Request) -> dict[str, Any]:
        tenant = (await request.json())["tenant"]
        if tenant not in TENANTS:
            return {"error": f"unknown tenant {tenant!r}"}
        requests, tokens = await self.tenant_tokens(tenant)
        asked = time.time()
        async with await requests.reserve_async(1), \
                await tokens.reserve_async(MAX_TOKENS) as reservation:
            started = time.time()  # both granted: the call is in flight from here
            await asyncio.sleep(random.uniform(*CALL_S))  # the "model call"
            used = random.randint(MAX_TOKENS // 2, MAX_TOKENS)
            reservation.commit(used)
            ended = time.time()  # still holding its request slot
        await self.records.add.remote({"replica": self.replica, "tenant": tenant, "asked": asked,
                                       "started": started, "ended": ended, "used": used})
        return {"tenant": tenant, "used": used}

    async def __del__(self) -> None:
        for pair in self.tokens.values():
            for token in pair:
                await token.close_async()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def drive(url: str, seconds: float, clients: int) -> dict[str, int]:
    """``clients`` HTTP clients per tenant, each sending one request after another until
    ``seconds`` have passed; returns how many requests each tenant had answered."""
    stop = time.monotonic() + seconds
    answered = dict.fromkeys(TENANTS, 0)
    async with httpx.AsyncClient(timeout=120) as client:

        async def one_client(tenant: str) -> None:
            while time.monotonic() < stop:
                answer = await client.post(url, json={"tenant": tenant})
                answer.raise_for_status()
                answered[tenant] += 1

        await asyncio.gather(*(one_client(tenant) for tenant in TENANTS
                               for _ in range(clients)))
    return answered


def most_at_once(rows: list[dict[str, Any]]) -> int:
    """The most requests in flight at once, over all replicas (from their own timestamps)."""
    edges = sorted([(row["started"], 1) for row in rows] + [(row["ended"], -1) for row in rows])
    most = now = 0
    for _, step in edges:  # an end sorts before a start at the same instant
        now += step
        most = max(most, now)
    return most


def summarize(rows: list[dict[str, Any]], tokens_spec: Any, requests_limit: int,
              stopped: float) -> dict[str, Any]:
    """Use against the limits, and the tenants' shares while both had requests waiting: from a
    quarter into the run (the burst spent) until the clients stopped sending (``stopped``)."""
    first, last = min(row["started"] for row in rows), max(row["started"] for row in rows)
    # Tokens actually used can never exceed what the bucket held plus what it refilled meanwhile
    # (what a call left unused went back, so it is not counted twice).
    allowed = tokens_spec.burst + tokens_spec.refill_per_s * (last - first)
    contended = first + (stopped - first) / 4
    by_tenant = {tenant: sum(row["used"] for row in rows if row["tenant"] == tenant
                             and contended <= row["started"] < stopped)
                 for tenant in TENANTS}
    return {"requests": len(rows), "tokens_used": sum(row["used"] for row in rows),
            "allowed": allowed, "most_in_flight": most_at_once(rows),
            "requests_limit": requests_limit, "tokens_by_tenant": by_tenant,
            "replicas": sorted({row["replica"] for row in rows}),
            "longest_wait_s": max(row["started"] - row["asked"] for row in rows)}


def main(seconds: float = 12.0, clients: int = 16) -> dict[str, Any]:
    """Serve ``LLM`` and drive it over HTTP for ``seconds``; returns use against the limits,
    from the replicas' own records."""
    ray_was_running = ray.is_initialized()
    info = ray_quota.init(manifest=MANIFEST, environment="local")  # starts a Ray if none runs
    port = free_port()
    records = Records.remote()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(LLM.bind(records), name="llm", route_prefix="/generate")
        stopped = time.time() + seconds  # when the clients stop sending
        answered = asyncio.run(drive(f"http://127.0.0.1:{port}/generate", seconds, clients))
        rows = ray.get(records.all.remote())
        if len(rows) != sum(answered.values()):
            raise RuntimeError(f"{sum(answered.values())} requests answered, {len(rows)} recorded")
        result = summarize(rows, info.resources["llm-tokens"],
                           info.resources["llm-requests"].value, stopped)
    finally:
        serve.shutdown()  # the replicas close their tokens (__del__)
        ray.kill(records)
        if not ray_was_running:
            ray.shutdown()  # a local Ray takes its executor with it
    shares = result["tokens_by_tenant"]
    print(f"{result['requests']} requests on {len(result['replicas'])} replicas used "
          f"{result['tokens_used']:,} tokens (the limit allows {result['allowed']:,.0f}); at "
          f"most {result['most_in_flight']} in flight (limit {result['requests_limit']}); "
          f"under contention premium:free = {shares['premium']:,}:{shares['free']:,} tokens "
          f"(weights {TENANTS['premium']}:{TENANTS['free']})")
    return result


if __name__ == "__main__":
    main(*(float(arg) for arg in sys.argv[1:2]), *(int(arg) for arg in sys.argv[2:3]))
