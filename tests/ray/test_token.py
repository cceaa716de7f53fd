"""The token API on a real local Ray: reserve, commit, split, merge, close, and local leases."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import ray

import ray_quota
from ray_quota import (
    FailedReservation,
    IncompatibleTokensError,
    InvalidAmountError,
    QuotaToken,
    Reservation,
    TokenClosedError,
    TokenStateError,
)
from ray_quota._core.protocol import Report
from ray_quota._runtime import identity, renewer, rpc

Reserve = Callable[..., Reservation]

pytestmark = pytest.mark.usefixtures("executor")


def executor_calls() -> int:
    return ray.get(rpc.executor().calls_served.remote())


def by_name(name: str) -> ray_quota.ResourceStatus:
    return next(s for s in ray_quota.status() if s.name == name)


@ray.remote
def child_task(token: QuotaToken, amount: int, used: int) -> tuple[str, int]:
    with token.reserve(amount) as reservation:
        reservation.commit(used)
    return token.resource, token.expected_use


def test_reference_example_with_a_child_task_receiving_a_split_token() -> None:
    token = QuotaToken("tok", expected_use=1000)
    with token.reserve(150) as reservation:
        reservation.commit(120)
    child = token.split(200)
    assert token.expected_use == 800 and child.expected_use == 200
    assert ray.get(child_task.remote(child, 50, 40)) == ("tok", 200)
    token.close()


def test_most_reserves_in_a_steady_loop_never_reach_the_executor() -> None:
    token = QuotaToken("fast", expected_use=10)
    before = executor_calls()
    loops = 5000
    for _ in range(loops):
        with token.reserve(10) as reservation:
            reservation.commit(10)
    calls = executor_calls() - before
    assert calls < loops * 0.05, f"{calls} executor calls for {loops} reservations"


def test_commit_under_returns_the_rest_and_over_is_charged_as_debt() -> None:
    token = QuotaToken("budget", expected_use=100)
    reservation = token.reserve(1000)
    reservation.commit(1500)  # 500 over: charged to the pool at once
    renewer.flush()
    assert by_name("budget").in_use == 1500
    with token.reserve(1000) as reservation:
        reservation.commit(400)
    token.close()
    assert by_name("budget").in_use == 1900


def test_commit_twice_is_an_error_and_changes_nothing() -> None:
    token = QuotaToken("budget", expected_use=100)
    reservation = token.reserve(100)
    reservation.commit(60)
    with pytest.raises(TokenStateError, match="already committed"):
        reservation.commit(10)
    token.close()
    assert by_name("budget").in_use == 60


def test_dropped_reservation_counts_as_commit_zero() -> None:
    token = QuotaToken("budget", expected_use=100)
    reservation = token.reserve(300)
    del reservation
    token.close()
    assert by_name("budget").in_use == 0


def test_closing_releases_the_lease_and_the_weight() -> None:
    token = QuotaToken("conn", expected_use=1)
    for _ in range(3):
        with token.reserve(1):
            pass
    assert by_name("conn").tokens == 1
    token.close()
    status = by_name("conn")
    assert (status.tokens, status.in_use, status.leases) == (0, 0, 0)
    with pytest.raises(TokenClosedError):
        token.reserve(1)


def test_split_and_merge_move_expected_use_and_refuse_bad_input() -> None:
    token = QuotaToken("tok", expected_use=100)
    child = token.split(40)
    with pytest.raises(InvalidAmountError, match="expected use is 60"):
        token.split(61)
    assert token.expected_use == 60
    with pytest.raises(IncompatibleTokensError):
        token.merge(token)
    other = QuotaToken("budget", expected_use=5)
    with pytest.raises(IncompatibleTokensError):
        token.merge(other)
    token.merge(child)
    assert token.expected_use == 100
    with pytest.raises(TokenClosedError):
        child.reserve(1)
    other.close()
    token.close()


# The tests that take ``reserve`` run twice: through reserve() and through reserve_async().


def test_reject_raises_failed_reservation_with_the_estimated_wait(reserve: Reserve) -> None:
    token = QuotaToken("tok-reject", expected_use=10)
    reserve(token, 50).commit(50)  # empty the burst
    with pytest.raises(FailedReservation) as failure:
        reserve(token, 40)
    # 40 units at 100/s, from an empty bucket: about 0.4 s, less what refilled meanwhile.
    assert failure.value.estimated_wait_s is not None
    assert 0.2 < failure.value.estimated_wait_s <= 0.4
    token.close()


def test_capacity_reject_has_no_estimated_wait(reserve: Reserve) -> None:
    token = QuotaToken("budget", expected_use=100)
    reserve(token, 10_000).commit(10_000)
    with pytest.raises(FailedReservation) as failure:
        reserve(token, 1)
    assert failure.value.estimated_wait_s is None
    token.close()


def test_throttle_with_timeout_fails_in_time(reserve: Reserve) -> None:
    holder = QuotaToken("solo", expected_use=1)
    held = holder.reserve(1)
    waiter = QuotaToken("solo", expected_use=1)
    started = time.monotonic()
    with pytest.raises(FailedReservation):
        reserve(waiter, 1, timeout=0.3)
    assert time.monotonic() - started >= 0.3
    held.commit()
    with reserve(waiter, 1, timeout=5):
        pass
    holder.close()
    waiter.close()


def test_a_reservation_under_a_lease_that_ended_goes_on_under_a_new_one(
        reserve: Reserve) -> None:
    token = QuotaToken("tok", expected_use=10)
    reserve(token, 5).commit(5)  # the lease's first grant: no spare to serve the next locally
    lease = token._leases.current
    paused = renewer.current()
    assert paused is not None
    with paused._flush_lock:  # no renewal tells the handle first that the lease is gone
        # The executor ends the lease behind the handle's back, as when it expires.
        totals = lease.totals()
        rpc.call("settle", [Report(token._id, lease.key, totals.returned, totals.used,
                                   totals.debt, True)], identity.SECRET)
        with reserve(token, 5) as reservation:
            assert reservation.amount == 5
        # Refused under the old key (LeaseEndedError), granted under a new one; the old lease
        # is not kept to settle, as it would be had the answer been lost.
        assert list(token._leases) == [token._leases.current]
        assert token._leases.current is not lease
    token.close()


def test_repr_never_shows_the_id() -> None:
    token = QuotaToken("tok", expected_use=7, label="team-a")
    assert token._id not in repr(token)
    assert "team-a" in repr(token)
    token.close()


async def test_reserve_async_and_async_context_manager() -> None:
    token = QuotaToken("conn", expected_use=1)
    async with await token.reserve_async(1) as reservation:
        assert reservation.amount == 1
    assert reservation.committed
    token.close()


def test_with_reservation_commits_what_the_function_says_it_used() -> None:
    token = QuotaToken("budget", expected_use=100)
    assert ray_quota.with_reservation(token, 300, lambda extra: 120 + extra, 5) == 125
    with pytest.raises(ZeroDivisionError):
        ray_quota.with_reservation(token, 300, lambda: 1 // 0)  # counts as unused
    token.close()
    assert by_name("budget").in_use == 125


async def test_with_reservation_async_commits_what_the_coroutine_used() -> None:
    token = QuotaToken("budget", expected_use=100)

    async def call() -> int:
        return 40

    assert await ray_quota.with_reservation_async(token, 100, call) == 40
    token.close()
    assert by_name("budget").in_use == 40


@pytest.fixture
def batches_held(monkeypatch: pytest.MonkeyPatch) -> None:
    """The give-back sender thread sends nothing (a busy machine may run it between two
    lines); a call of this process still sends the queued give-backs before it."""
    from ray_quota._runtime import giveback

    monkeypatch.setattr(giveback, "flush", lambda: None)


@pytest.mark.usefixtures("batches_held")
def test_a_one_shot_give_back_does_not_wait_and_the_process_next_call_sees_it() -> None:
    """Issue 15: a task's end releases a token ``@quota`` opened for it alone without a round
    trip (giveback.py); the handle is unusable at once, and any later call of this process
    reaches the executor after it. (An explicit ``close()`` waits: see ``_token._closing``.)"""
    from ray_quota._runtime import giveback

    before = by_name("tok").tokens
    token = QuotaToken("tok", expected_use=10)
    assert by_name("tok").tokens == before + 1
    token._end_cleanly(wait=False)
    assert giveback.pending() == 1  # sent within the batch window, not before it returned
    with pytest.raises(TokenClosedError):
        token.reserve(1)
    assert by_name("tok").tokens == before  # status() went after it


@pytest.mark.usefixtures("batches_held")
def test_unused_units_go_back_batched_and_a_closed_handle_reports_once() -> None:
    """Issue 15: a commit's unused units of an uncontended rate lease join the give-back
    batch (a task's end then sends them with its token's give-back in one call), and a closed
    handle's finaliser sends nothing: its close carried its final reports."""
    import gc

    from ray_quota._runtime import giveback

    def settles() -> int:
        return int(ray.get(rpc.executor().call_counts.remote()).get("settle", 0))

    before = settles()
    token = QuotaToken("tok", expected_use=10)
    with token.reserve(5) as reservation:
        reservation.commit(3)  # 2 unused: nobody waits for them
    assert giveback.pending() == 1
    token.close()
    del token, reservation  # (the reservation refers to its token)
    gc.collect()
    by_name("tok")  # any call of this process: the batch went before it
    assert settles() == before + 1
