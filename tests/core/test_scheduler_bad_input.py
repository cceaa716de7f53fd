"""Bad input is refused with a clear error and changes nothing."""

from __future__ import annotations

import pytest
from scheduler_world import (
    HOLDER,
    ME,
    Env,
    capacity,
    concurrency,
    granted,
    rate,
)

from ray_quota._core.credentials import claim_value, make_claim
from ray_quota._core.scheduler import Policy
from ray_quota._errors import (
    IncompatibleTokensError,
    InvalidAmountError,
    TokenClosedError,
    TokenStateError,
)
from ray_quota._spec import MAX_UNITS, ResourceSpec

# ================================================================================== bad input


BAD_AMOUNTS = [0, -1, 1.5, True, "3", None, MAX_UNITS + 1]


@pytest.mark.parametrize("amount", BAD_AMOUNTS + [101], ids=repr)
def test_bad_acquire_amount_is_refused_and_changes_nothing(amount: object) -> None:
    env = Env(rate(value=100, burst=100))
    token = env.token("r", 10)
    granted(env.acquire(token, 30))
    before = env.snapshot([token])
    with pytest.raises(InvalidAmountError):
        env.acquire(token, amount)  # type: ignore[arg-type]
    assert env.snapshot([token]) == before


@pytest.mark.parametrize("spec", [capacity(value=10), concurrency(value=10)])
def test_amount_above_the_ceiling_is_refused(spec: ResourceSpec) -> None:
    env = Env(spec)
    token = env.token(spec.name, 1)
    with pytest.raises(InvalidAmountError, match="ever"):
        env.acquire(token, 11)
    granted(env.acquire(token, 10))


@pytest.mark.parametrize("expected_use", [0, -5, 2.0, False])
def test_bad_expected_use_is_refused_and_changes_nothing(expected_use: object) -> None:
    env = Env(capacity(value=100))
    before = env.snapshot()
    with pytest.raises(InvalidAmountError):
        env.sched.open_token("c", expected_use, claimant=ME)  # type: ignore[arg-type]
    assert env.snapshot() == before


@pytest.mark.parametrize(("field", "value"), [("units", -1), ("used", 1.5), ("debt", True)])
def test_bad_give_back_is_refused_and_changes_nothing(field: str, value: object) -> None:
    env = Env(capacity(value=100))
    token = env.token("c", 10)
    env.acquire(token, 20)
    before = env.snapshot([token])
    kwargs = {"units": 0, "used": 0, "debt": 0, field: value}
    with pytest.raises(InvalidAmountError):
        env.sched.give_back(token, HOLDER, kwargs.pop("units"), **kwargs)  # type: ignore[arg-type]
    assert env.snapshot([token]) == before


def credit_history(env: Env, token: str, other: str) -> None:
    """Give ``token`` some debt and ``other`` some credit, so conservation checks have teeth."""
    env.commit(token, granted(env.acquire(token, 60)))
    env.clock.advance(5.0)
    env.commit(other, granted(env.acquire(other, 5)))


@pytest.mark.parametrize("child", [11, 0, -1, 2.5, True])
def test_bad_split_is_refused_and_changes_nothing(child: object) -> None:
    env = Env(rate(value=10, burst=100))
    token, other = env.token("r", 10), env.token("r", 10)
    credit_history(env, token, other)
    before = env.snapshot([token, other])
    with pytest.raises(InvalidAmountError):
        env.sched.split(token, 0, ME, child)  # type: ignore[arg-type]
    assert env.snapshot([token, other]) == before


def test_split_of_all_expected_use_while_waiting_is_refused() -> None:
    env = Env(concurrency(value=1))
    filler, token = env.token("k", 1), env.token("k", 4)
    env.acquire(filler, 1)
    env.acquire(token, 1)
    before = env.snapshot([token])
    with pytest.raises(TokenStateError):
        env.sched.split(token, 0, ME, 4)
    assert env.snapshot([token]) == before


def test_merge_with_itself_is_refused_and_changes_nothing() -> None:
    env = Env(rate(value=10, burst=100))
    token, other = env.token("r", 10), env.token("r", 10)
    credit_history(env, token, other)
    before = env.snapshot([token, other])
    with pytest.raises(IncompatibleTokensError):
        env.sched.merge(token, 0, ME, token, 0)
    assert env.snapshot([token, other]) == before


def test_merge_across_resources_is_refused_and_changes_nothing() -> None:
    env = Env(rate(value=10, burst=100), rate(name="r2", value=10, burst=100))
    token, other = env.token("r", 10), env.token("r2", 10)
    before = env.snapshot([token, other])
    with pytest.raises(IncompatibleTokensError):
        env.sched.merge(token, 0, ME, other, 0)
    with pytest.raises(IncompatibleTokensError):
        env.sched.merge(other, 0, ME, token, 0)
    assert env.snapshot([token, other]) == before
    assert env.status("r").tokens == env.status("r2").tokens == 1


def test_merge_of_a_waiting_token_is_refused_and_changes_nothing() -> None:
    env = Env(concurrency(value=1))
    filler, token, other = env.token("k", 1), env.token("k", 2), env.token("k", 2)
    env.acquire(filler, 1)
    env.acquire(other, 1)
    before = env.snapshot([token, other])
    with pytest.raises(TokenStateError):
        env.sched.merge(token, 0, ME, other, 0)
    assert env.snapshot([token, other]) == before


def test_merge_back_returns_a_childs_expected_use_and_credit_to_its_parent() -> None:
    env = Env(rate(value=10, burst=100), policy=Policy(credit_factor=10.0))
    parent, busy = env.token("r", 20), env.token("r", 10)
    child = env.sched.split(parent, 0, ME, 5).id
    env.commit(busy, granted(env.acquire(busy, 50)))
    env.commit(busy, granted(env.acquire(busy, 50)))
    total = env.sched.credit(parent) + env.sched.credit(child)
    # The child's own process, which it was moved to.
    claim = make_claim("task:9", "k9", [claim_value(ME, child, 0)])
    assert env.sched.merge_back(child, 1, claim, parent) is True
    assert env.sched.describe(parent, 0, ME) == (20, pytest.approx(total))
    with pytest.raises(TokenClosedError):
        env.acquire(child, 1)


def test_merge_back_into_a_closed_parent_just_closes_the_child() -> None:
    env = Env(capacity(value=100))
    parent = env.token("c", 10)
    child = env.sched.split(parent, 0, ME, 4).id
    env.sched.close_token(parent, 0, ME)
    assert env.sched.merge_back(child, 0, ME, parent) is False
    assert env.status("c").tokens == 0


def test_merge_into_a_waiting_token_keeps_the_debt_it_takes_on() -> None:
    env = Env(concurrency(value=1))
    filler = env.token("k", 1)
    granted(env.acquire(filler, 1))
    waiting, indebted = env.token("k", 4), env.token("k", 1)
    env.sched.give_back(indebted, HOLDER, debt=3)
    assert env.acquire(waiting, 1).outcome is None
    total = env.sched.credit(waiting) + env.sched.credit(indebted)
    assert total < 0
    env.sched.merge(waiting, 0, ME, indebted, 0)
    assert env.sched.credit(waiting) == pytest.approx(total)


def test_token_with_no_expected_use_left_cannot_acquire() -> None:
    env = Env(capacity(value=100))
    token = env.token("c", 5)
    child = env.sched.split(token, 0, ME, 5)
    with pytest.raises(TokenStateError):
        env.acquire(token, 1)
    env.sched.merge(token, 0, ME, child.id, 0)
    granted(env.acquire(token, 1))


def test_two_emptied_tokens_can_still_merge() -> None:
    env = Env(capacity(value=100))
    a, b = env.token("c", 5), env.token("c", 5)
    env.sched.split(a, 0, ME, 5)
    env.sched.split(b, 0, ME, 5)
    env.sched.merge(a, 0, ME, b, 0)
    assert env.sched.credit(a) == 0.0


# ============================================================================ debt with a cap


def test_a_report_declaring_more_overuse_than_max_overuse_charges_only_the_cap() -> None:
    """Issue 14 / DESIGN 2: a hostile or broken client reporting debt of 2**53 on a 10-per-
    second pool must not block it for ages: one report adds at most ``max_overuse``."""
    spec = ResourceSpec("r", rate(value=10, burst=20).kind, 10, period_s=1.0, burst=20,
                        max_overuse=5)
    env = Env(spec)
    token = env.token("r", 10)
    granted(env.acquire(token, 1))
    env.sched.settle(token, HOLDER, 0, 1, MAX_UNITS)
    assert env.sched.pool("r").available(env.clock()) == 20 - 1 - 5
    env.sched.settle(token, HOLDER, 0, 1, MAX_UNITS, final=True)  # its rest: one cap more
    env.sched.settle(token, HOLDER, 0, 1, MAX_UNITS, final=True)  # late: one cap more
    assert env.sched.pool("r").available(env.clock()) >= 20 - 1 - 5 * 3


def test_a_commit_beyond_max_overuse_is_charged_the_cap_and_says_so() -> None:
    from ray_quota._core.holder import capped_use

    spec = capacity(value=100)
    assert capped_use(spec, 1, 50) == (50, None)
    charged, error = capped_use(spec, 1, 2**53)
    assert charged == 1 + spec.overuse_cap == 101
    assert isinstance(error, InvalidAmountError) and "max_overuse" in str(error)
