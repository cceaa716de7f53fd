"""Where a lease call goes when the node's broker does not answer (no cluster: the steps are
driven by hand). Only a broker that died is taken over; one that is out of reach for the moment
(Ray's ActorUnavailableError, a RayActorError too) lives on with the process's sub-leases, and
taking them over then would let it give their units back upstream later (review finding A)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import ray.exceptions

from ray_quota._errors import ExecutorUnavailableError
from ray_quota._runtime import routing
from ray_quota._runtime.steps import Blocking, Remote, Sleep


class _Handle:
    """Stands for the broker's actor handle: each method is a name to call."""

    def __getattr__(self, method: str) -> str:
        return method


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Handle]:
    # No cluster here; the calls must still look like they go to a running Ray (rpc refuses
    # calls after ray.shutdown()).
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    handle = _Handle()
    routing._Routing.broker = handle
    yield handle
    routing._Routing.broker = None


def _unavailable() -> Exception:
    return ray.exceptions.ActorUnavailableError("connection lost", None)


def _drive(steps: Any, errors: list[Exception]) -> list[Any]:
    """Run ``steps``, failing each broker call with the next of ``errors`` (then answering
    "ok"); returns the steps taken (a :class:`Blocking` step is not run)."""
    taken: list[Any] = []
    answer: Any = None
    error: Exception | None = None
    while True:
        try:
            step = steps.send(answer) if error is None else steps.throw(error)
        except StopIteration as stop:
            taken.append(("returned", stop.value))
            return taken
        taken.append(step)
        answer, error = None, None
        if isinstance(step, Remote):
            if errors:
                error = errors.pop(0)
            else:
                answer = "ok"
        elif isinstance(step, Blocking):
            return taken  # the failover: stop here


def test_a_broker_out_of_reach_for_the_moment_is_asked_again_not_taken_over(
        broker: _Handle) -> None:
    taken = _drive(routing.leasing("renew", "holder", []), [_unavailable(), _unavailable()])
    assert not any(isinstance(step, Blocking) for step in taken)
    assert sum(isinstance(step, Sleep) for step in taken) == 2
    assert taken[-1] == ("returned", "ok")


def test_an_acquire_the_broker_may_have_served_is_not_repeated_nor_taken_over(
        broker: _Handle) -> None:
    with pytest.raises(ExecutorUnavailableError):
        _drive(routing.leasing("acquire", "t", 0, "c", "k:0", 1, 0, None, resource="r"),
               [_unavailable()])


def test_a_broker_that_died_is_taken_over(broker: _Handle) -> None:
    taken = _drive(routing.leasing("renew", "holder", []), [ray.exceptions.ActorDiedError()])
    assert isinstance(taken[-1], Blocking) and taken[-1].fn is routing._broker_failed
