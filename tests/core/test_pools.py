"""Unit pools: continuous refill, burst cap, debt, budgets that never refill, slots."""

from __future__ import annotations

import pytest

from ray_quota._core.pools import CapacityPool, ConcurrencyPool, RatePool, make_pool
from ray_quota._spec import Kind, ResourceSpec


def rate_spec(value: int = 10, period_s: float = 1.0, burst: int = 20) -> ResourceSpec:
    return ResourceSpec("r", Kind.RATE, value=value, period_s=period_s, burst=burst)


def capacity_spec(value: int = 100) -> ResourceSpec:
    return ResourceSpec("c", Kind.CAPACITY, value=value)


def concurrency_spec(value: int = 4) -> ResourceSpec:
    return ResourceSpec("k", Kind.CONCURRENCY, value=value)


# ------------------------------------------------------------------------------------------- rate


def test_rate_pool_starts_full_at_burst() -> None:
    pool = RatePool(rate_spec(burst=20), now=0.0)
    assert pool.available(0.0) == 20
    assert pool.level(0.0) == 20.0
    assert pool.in_use(0.0) == 0


def test_rate_refill_is_continuous_not_whole_periods() -> None:
    # 10 units a minute: a whole-period limiter would add nothing until t=60.
    pool = RatePool(rate_spec(value=10, period_s=60.0, burst=10), now=0.0)
    pool.take(10, 0.0)
    assert pool.available(0.0) == 0
    assert pool.level(15.0) == pytest.approx(2.5)
    assert pool.available(15.0) == 2  # partial units are not grantable yet
    assert pool.available(18.0) == 3
    assert pool.in_use(18.0) == 7


def test_rate_refill_is_capped_at_burst() -> None:
    pool = RatePool(rate_spec(value=10, burst=20), now=0.0)
    pool.take(5, 0.0)
    assert pool.available(1000.0) == 20
    assert pool.level(1000.0) == 20.0


def test_rate_give_back_never_fills_past_burst() -> None:
    pool = RatePool(rate_spec(value=10, burst=20), now=0.0)
    pool.take(20, 0.0)
    pool.give_back(20, 100.0)  # already refilled to the top: the returned units are dropped
    assert pool.level(100.0) == 20.0
    assert pool.available(100.0) == 20


def test_rate_give_back_returns_unused_units() -> None:
    pool = RatePool(rate_spec(value=10, burst=20), now=0.0)
    pool.take(20, 0.0)
    pool.give_back(7, 0.5)
    assert pool.level(0.5) == pytest.approx(5.0 + 7.0)
    assert pool.available(0.5) == 12


def test_rate_debt_makes_level_negative_and_refill_pays_it_off() -> None:
    pool = RatePool(rate_spec(value=10, burst=20), now=0.0)
    pool.take(20, 0.0)
    pool.charge_debt(30, 0.0)
    assert pool.level(0.0) == -30.0
    assert pool.available(0.0) == 0
    assert pool.time_until(1, 0.0) == pytest.approx(3.1)
    assert pool.available(2.9) == 0
    assert pool.level(3.0) == pytest.approx(0.0)
    assert pool.available(3.5) == 5
    assert pool.available(6.0) == 20


def test_rate_time_until_is_exact() -> None:
    pool = RatePool(rate_spec(value=8, period_s=2.0, burst=16), now=0.0)  # 4 units/s
    assert pool.time_until(16, 0.0) == 0.0
    pool.take(16, 0.0)
    wait = pool.time_until(6, 0.0)
    assert wait == pytest.approx(1.5)
    assert pool.available(wait - 1e-6) == 5
    assert pool.available(wait) == 6
    # From a partial level the wait counts only the missing part.
    fresh = RatePool(rate_spec(value=8, period_s=2.0, burst=16), now=0.0)
    fresh.take(16, 0.0)
    assert fresh.time_until(6, 0.5) == pytest.approx(1.0)


def test_rate_time_until_beyond_burst_counts_the_whole_shortfall() -> None:
    # Asked for more than the bucket holds (a queue of waiters): the wait is for the total refill.
    pool = RatePool(rate_spec(value=10, burst=20), now=0.0)
    assert pool.time_until(50, 0.0) == pytest.approx(3.0)


def test_rate_resize_lowering_burst_lowers_level_and_raising_does_not_refill() -> None:
    pool = RatePool(rate_spec(value=10, burst=20), now=0.0)
    pool.resize(rate_spec(value=10, burst=5), 0.0)
    assert pool.available(0.0) == 5
    pool.resize(rate_spec(value=10, burst=50), 0.0)
    assert pool.available(0.0) == 5  # a higher burst does not hand out units at once
    assert pool.available(4.5) == 50


def test_rate_resize_keeps_the_elapsed_refill_at_the_old_rate() -> None:
    pool = RatePool(rate_spec(value=10, burst=100), now=0.0)
    pool.take(100, 0.0)
    pool.resize(rate_spec(value=1, burst=100), 2.0)  # 20 units refilled at the old rate
    assert pool.level(2.0) == pytest.approx(20.0)
    assert pool.level(4.0) == pytest.approx(22.0)


# --------------------------------------------------------------------------------------- capacity


def test_capacity_never_refills() -> None:
    pool = CapacityPool(capacity_spec(100))
    pool.take(60, 0.0)
    assert pool.available(0.0) == 40
    assert pool.available(1e9) == 40
    assert pool.time_until(50, 1e9) is None
    assert pool.time_until(40, 1e9) == 0.0


def test_capacity_give_back_returns_unused_and_debt_is_spent() -> None:
    pool = CapacityPool(capacity_spec(100))
    pool.take(60, 0.0)
    pool.give_back(10, 1.0)
    pool.charge_debt(25, 1.0)
    assert pool.in_use(1.0) == 75
    assert pool.available(1.0) == 25


def test_capacity_resize_never_refills_spent_budget() -> None:
    pool = CapacityPool(capacity_spec(100))
    pool.take(80, 0.0)
    pool.resize(capacity_spec(50), 0.0)
    assert pool.available(0.0) == 0
    pool.resize(capacity_spec(100), 0.0)  # back to the old value: still only what was never spent
    assert pool.available(0.0) == 20
    pool.resize(capacity_spec(150), 0.0)  # a higher value adds exactly the difference
    assert pool.available(0.0) == 70


def test_capacity_pool_can_start_with_budget_already_spent() -> None:
    pool = CapacityPool(capacity_spec(100), spent=90)
    assert pool.available(0.0) == 10


# ------------------------------------------------------------------------------------ concurrency


def test_concurrency_slots_come_back_on_give_back() -> None:
    pool = ConcurrencyPool(concurrency_spec(4))
    pool.take(3, 0.0)
    assert pool.available(0.0) == 1
    assert pool.in_use(0.0) == 3
    pool.give_back(2, 5.0)
    assert pool.available(5.0) == 3
    pool.give_back(1, 5.0)
    assert pool.available(5.0) == 4


def test_concurrency_slots_never_come_back_by_time_alone() -> None:
    pool = ConcurrencyPool(concurrency_spec(2))
    pool.take(2, 0.0)
    assert pool.available(1e9) == 0
    assert pool.time_until(1, 1e9) is None


def test_concurrency_debt_takes_no_slot() -> None:
    pool = ConcurrencyPool(concurrency_spec(2))
    pool.charge_debt(5, 0.0)
    assert pool.available(0.0) == 2


def test_concurrency_resize_keeps_slots_in_use() -> None:
    pool = ConcurrencyPool(concurrency_spec(4))
    pool.take(3, 0.0)
    pool.resize(concurrency_spec(2), 0.0)
    assert pool.available(0.0) == 0
    pool.give_back(2, 0.0)
    assert pool.available(0.0) == 1


@pytest.mark.parametrize(
    ("spec", "cls"),
    [(rate_spec(), RatePool), (capacity_spec(), CapacityPool), (concurrency_spec(), ConcurrencyPool)],
)
def test_make_pool_builds_a_full_pool_of_the_right_kind(spec: ResourceSpec, cls: type) -> None:
    pool = make_pool(spec, 0.0)
    assert type(pool) is cls
    assert pool.available(0.0) == spec.ceiling
