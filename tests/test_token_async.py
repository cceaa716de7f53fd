"""The asyncio twins' one rule of their own: a cancelled caller stops waiting, not the operation."""

from __future__ import annotations

import asyncio

import pytest

from ray_quota._runtime.steps import Sleep, Steps
from ray_quota._token_async import to_the_end


def test_a_cancelled_caller_leaves_the_operation_running_to_its_end() -> None:
    done: list[str] = []

    def closing() -> Steps[int]:
        yield Sleep(0.05)  # the executor's answer, on its way
        done.append("closed")
        return 1

    async def cancel_the_caller() -> None:
        caller = asyncio.ensure_future(to_the_end(closing()))
        await asyncio.sleep(0.01)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await asyncio.sleep(0.1)

    asyncio.run(cancel_the_caller())
    assert done == ["closed"]


def test_an_operation_that_fails_after_its_caller_left_is_not_reported_unretrieved(
        caplog: pytest.LogCaptureFixture) -> None:
    def failing() -> Steps[None]:
        yield Sleep(0.02)
        raise RuntimeError("refused")

    async def cancel_the_caller() -> None:
        caller = asyncio.ensure_future(to_the_end(failing()))
        await asyncio.sleep(0.005)
        caller.cancel()
        await asyncio.sleep(0.05)

    asyncio.run(cancel_the_caller())
    import gc
    gc.collect()
    assert "never retrieved" not in caplog.text
