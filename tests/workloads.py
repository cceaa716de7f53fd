"""Workloads that run inside Ray workers, shared by the tests and the multi-node scenarios."""

from __future__ import annotations

import asyncio
import time

from ray_quota import QuotaToken


async def backlog(token: QuotaToken, amount: int, start_at: float,
                  duration_s: float) -> list[tuple[float, int]]:
    """Keep four reservations of ``amount`` queued at once from ``start_at`` (wall clock) for
    ``duration_s``, so the token is never idle even when a busy machine is slow to schedule the
    process; returns (monotonic time, units) of every grant, in order."""
    grants: list[tuple[float, int]] = []
    await asyncio.sleep(max(0.0, start_at - time.time()))
    stop = time.monotonic() + duration_s

    async def loop() -> None:
        while time.monotonic() < stop:
            async with await token.reserve_async(amount) as reservation:
                reservation.commit(amount)
                grants.append((time.monotonic(), amount))

    await asyncio.gather(*(loop() for _ in range(4)))
    return sorted(grants)
