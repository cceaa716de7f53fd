"""The sync and async drivers of one step generator: same answers, same errors, no cluster."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from ray_quota._runtime.steps import Blocking, Sleep, Steps, run, run_async


def drive(twin: str, steps: Steps[Any]) -> Any:
    return run(steps) if twin == "sync" else asyncio.run(run_async(steps))


@pytest.fixture(params=["sync", "async"])
def twin(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def fails() -> None:
    raise KeyError("no")


def test_each_steps_answer_is_sent_back_and_the_return_value_is_the_result(twin: str) -> None:
    def steps() -> Steps[int]:
        first = yield Blocking(lambda x: x + 1, (1,))
        yield Sleep(0.0)
        second = yield Blocking(lambda: first * 10)
        return second

    assert drive(twin, steps()) == 20


def test_a_steps_error_is_thrown_in_where_it_was_asked_for(twin: str) -> None:
    seen: list[str] = []

    def steps() -> Steps[str]:
        try:
            yield Blocking(fails)
        except KeyError:
            seen.append("caught")
        return (yield Blocking(lambda: "went on"))

    assert drive(twin, steps()) == "went on"
    assert seen == ["caught"]


def test_an_error_the_logic_does_not_handle_reaches_the_caller(twin: str) -> None:
    def steps() -> Steps[None]:
        yield Blocking(fails)

    with pytest.raises(KeyError):
        drive(twin, steps())


def test_a_blocking_step_runs_off_the_event_loop_when_async() -> None:
    def steps(where: Callable[[], Any]) -> Steps[bool]:
        return (yield Blocking(where))

    def in_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    assert asyncio.run(run_async(steps(in_loop))) is False
