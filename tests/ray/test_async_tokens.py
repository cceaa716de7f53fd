"""Nothing blocks an event loop: every token operation has an asyncio twin that never waits on it.

An async actor (a Ray Serve replica is one) runs its requests on one event loop; a blocking Ray
call there (``ray.get``, Ray's actor lookup) stalls every request it serves. The actor below
makes each such call on a thread that runs a loop fail loudly in its records, then runs every
token operation's async twin, from a process that has asked the executor nothing yet (as the
first request of a new replica does), with brokers off and on.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from conftest import TEST_MANIFEST, forget_state

import ray_quota
from ray_quota import QuotaToken, TokenClosedError
from ray_quota._runtime import renewer

BLOCKING = ("get", "wait", "get_actor")  # Ray's calls that wait for an answer


@pytest.fixture(params=[False, True], ids=["direct", "brokered"])
def started(request: pytest.FixtureRequest, ray_cluster: None, state_dir: Path) -> Iterator[Any]:
    ray_quota.shutdown()
    forget_state(state_dir, "test")
    yield ray_quota.init(manifest=TEST_MANIFEST, environment="test", brokers=request.param,
                         policy=ray_quota.Policy(lease_ttl_s=3.0), metrics_port=None)
    renewer.flush()
    ray_quota.shutdown()


def record_blocking_calls() -> list[str]:
    """From now on, note each blocking Ray call made on a thread running an event loop (where
    it was made from), then make it: the list returned fills as they happen."""
    blocked: list[str] = []
    for name in BLOCKING:
        original = getattr(ray, name)

        def guarded(*args: Any, _original: Any = original, _name: str = name,
                    **kwargs: Any) -> Any:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                pass  # no loop on this thread: waiting here stalls nobody
            else:
                blocked.append(f"ray.{_name} on the event loop:\n"
                               + "".join(traceback.format_stack(limit=12)[:-1]))
            return _original(*args, **kwargs)

        setattr(ray, name, guarded)
    return blocked


@ray.remote(num_cpus=0)
class AsyncUser:
    """An async actor, fresh to ray_quota: its process has not found the executor yet."""

    def __init__(self) -> None:
        self.blocked = record_blocking_calls()

    async def use(self, moved: QuotaToken) -> dict[str, Any]:
        # A token moved here, unverified: its first reservation learns the executor's identity.
        async with await moved.reserve_async(20) as reservation:
            reservation.commit(15)
        token = await QuotaToken.open_async("tok", 100, label="async")
        async with await token.reserve_async(50) as reservation:
            reservation.commit(40)
        child = await token.split_async(30)
        (await child.reserve_async(10)).commit(10)
        merged_back = await child.return_to_parent_async()
        other = await QuotaToken.open_async("tok", 10)
        await token.merge_async(other)
        expected_use, _ = await token.describe_async()
        async with await QuotaToken.open_async("conn", 1) as scoped:
            (await scoped.reserve_async(1)).commit()
        await moved.close_async()
        await token.close_async()
        try:
            await token.reserve_async(1)
            closed = False
        except TokenClosedError:
            closed = True
        return {"blocked": self.blocked, "merged_back": merged_back,
                "expected_use": expected_use, "closed": closed, "label": token.label}


def test_no_token_operation_blocks_an_async_actors_event_loop(started: Any) -> None:
    moved = QuotaToken("tok", 40)
    user = AsyncUser.remote()  # type: ignore[attr-defined]
    result = ray.get(user.use.remote(moved), timeout=60)
    assert not result["blocked"], "\n".join(result["blocked"])
    assert result["merged_back"] is True
    assert result["expected_use"] == 110  # 100 - 30 split + 30 back + 10 merged
    assert result["closed"] is True
    assert result["label"] == "async"
    # Everything was given back: nothing is held, no token is left open.
    status = {s.name: s for s in ray_quota.status()}
    assert status["tok"].tokens == 0
    assert status["conn"].tokens == 0
    ray.kill(user)

