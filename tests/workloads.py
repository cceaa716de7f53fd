"""Workloads that run inside Ray workers, shared by the tests and the multi-node scenarios."""

from __future__ import annotations

import asyncio
import random
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


def spend(budget: QuotaToken, seconds: float, *, seed: int, most: int,
          pause_s: float) -> tuple[int, int]:
    """Reserve 1 to ``most`` units of ``budget`` at a time for ``seconds``, commit a random part
    of each, pause ``pause_s`` between, then close the token; returns (units used, reservations),
    by this worker's own count."""
    rng = random.Random(seed)
    used = reservations = 0
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        with budget.reserve(rng.randint(1, most)) as reservation:
            spent = rng.randint(0, reservation.amount)
            reservation.commit(spent)
            used += spent
            reservations += 1
        time.sleep(pause_s)
    budget.close()
    return used, reservations
