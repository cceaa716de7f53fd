"""Recalls reach the holder's watch call, on the executor class itself (no Ray).

Leases are known by key (``holder:n``) while each process (or broker) watches under its holder
id, so a recall must be addressed to the holder of the key.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from conftest import TEST_MANIFEST

from ray_quota import Policy
from ray_quota._actors.executor import ExecutorActor
from ray_quota._core.credentials import holder_id
from ray_quota._core.protocol import Grant, TokenInfo


async def recall_reaches_watcher(path: Path) -> list[str]:
    executor = ExecutorActor(TEST_MANIFEST, "test", Policy(lease_ttl_s=10.0), state_path=str(path))
    holding = await executor.open_token("conn", 1, "a", None)
    other = await executor.open_token("conn", 1, "b", None)
    assert isinstance(holding, TokenInfo) and isinstance(other, TokenInfo)
    # proc-a holds two of the four slots: one in use, one spare (prefetched).
    proc_a, proc_b = holder_id("proc-a", "secret-a"), holder_id("proc-b", "secret-b")
    grant = await executor.acquire(holding.id, 0, "a", f"{proc_a}:0", 1, 3, None, "secret-a")
    assert isinstance(grant, Grant) and grant.units == 2
    watch = asyncio.create_task(executor.watch(proc_a, 5.0, "secret-a"))
    await asyncio.sleep(0)  # the watch is open before anyone waits
    waiting = asyncio.create_task(executor.acquire(other.id, 0, "b", f"{proc_b}:0", 3, 0, 1.0,
                                                   "secret-b"))
    recalled = await asyncio.wait_for(watch, timeout=2.0)
    waiting.cancel()
    return recalled


def test_a_recall_reaches_the_watch_of_the_process_holding_the_lease(tmp_path: Path) -> None:
    recalled = asyncio.run(recall_reaches_watcher(tmp_path / "state.sqlite"))
    assert len(recalled) == 1
