"""Regressions from issue 13 (an outside review driving the pure core on a fake clock): each test
failed before its fix. Fairness shares, wait estimates, bounded bookkeeping, debt and settling.
"""

from __future__ import annotations

import copy
import itertools
import random

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

from ray_quota._core.scheduler import Ticket
from ray_quota._errors import FailedReservation, InvalidAmountError
from ray_quota._spec import MAX_UNITS, Enforcement

# ============================================================================ settling reports


@pytest.mark.parametrize("bad", [
    {"returned": 20.0}, {"returned": MAX_UNITS + 1},
    {"returned": 20, "used": -1}, {"returned": 20, "debt": 1.5},
], ids=["float", "too-large", "bad-used", "bad-debt"])
def test_a_rejected_settlement_report_changes_nothing(bad: dict[str, object]) -> None:
    env = Env(capacity(value=100))
    token = env.token("c", 10)
    granted(env.acquire(token, 20))
    totals = {"returned": 0, "used": 0, "debt": 0, **bad}
    before = env.snapshot([token])
    with pytest.raises(InvalidAmountError):
        env.sched.settle(token, HOLDER, **totals)  # type: ignore[arg-type]
    assert env.snapshot([token]) == before
    env.sched.settle(token, HOLDER, returned=20, used=0, debt=0)  # the corrected report
    assert env.status("c").available == 100


# ====================================================================== bounded bookkeeping


def test_deadlines_of_granted_waiters_are_not_kept() -> None:
    env = Env(capacity(value=100, wait_limit_s=3600.0))
    holder, waiter = env.token("c", 1), env.token("c", 1)
    for i in range(10_000):
        granted(env.acquire(holder, 100, holder="h"))
        ticket = env.acquire(waiter, 1, holder="w")  # waits, with an hour's deadline
        env.sched.give_back(holder, "h", 100)
        granted(ticket)
        env.sched.give_back(waiter, "w", 1)
    assert env.sched._resources["c"].watched <= 100  # bounded by live waiters, not history


@pytest.mark.parametrize("reports", [66, 100, 1000])
def test_reports_for_a_waiting_token_do_not_hide_who_may_pass_a_blocked_head(
        reports: int) -> None:
    # Each report re-keys the token; the entries it leaves behind must not fill the scan for
    # requests allowed past a blocked head.
    env = Env(rate(value=1, burst=10))
    granted(env.acquire(env.token("r", 1), 10, holder="drain"))  # the bucket is empty at 0
    head, big, small = env.token("r", 1), env.token("r", 1), env.token("r", 1)
    env.acquire(head, 10)  # blocked until t=10
    env.acquire(big, 10)  # behind the head, and too large to fit before it does
    ticket = env.acquire(small, 5)  # may pass the head: granted at t=5
    for _ in range(reports):
        env.sched.give_back(big, "elsewhere")  # a report: re-keys the waiting token
    assert env.wait_for(ticket) == pytest.approx(5.0)


def test_the_queue_heap_stays_bounded_while_a_token_waits() -> None:
    env = Env(rate(value=1, burst=10))
    granted(env.acquire(env.token("r", 1), 10, holder="drain"))
    head, waiting = env.token("r", 1), env.token("r", 1)
    env.acquire(head, 10)  # the head: the waiting token's old entries stay below it
    env.acquire(waiting, 10)
    for _ in range(10_000):
        env.sched.give_back(waiting, "elsewhere", debt=1)  # each report moves its pass
    assert env.sched._resources["r"].queue.entries <= 100


# ==================================================================================== debt


@pytest.mark.parametrize("kind", ["c", "r"])
def test_overuse_on_a_token_whose_expected_use_was_split_off_is_its_debt(kind: str) -> None:
    env = Env(capacity(value=100), rate(value=100, burst=100))
    token = env.token(kind, 10)
    granted(env.acquire(token, 5))
    child = env.sched.split(token, 0, ME, 10).id  # all of it: the token weighs nothing now
    assert env.sched.describe(token, 0, ME) == (0, 0.0)
    env.sched.give_back(token, HOLDER, used=5, debt=20)
    assert env.sched.credit(token) == pytest.approx(-20.0)  # charged to the token...
    charged = env.sched.credit(child)  # the 5 units granted before the split went with it
    env.sched.merge_back(child, 0, ME, token)
    assert env.sched.describe(token, 0, ME) == (10, pytest.approx(charged - 20.0))  # ...kept


# ======================================================================= fresh token streams


def _share_against_one_shots(streams: int, big_sizes: tuple[int, ...],
                             seconds: float = 200.0) -> tuple[float, float]:
    """A weight-100 token kept backlogged on a 100/s rate, against ``streams`` one-shot tokens
    of weight 10 asking 10 each, every one closed once granted and replaced by a fresh one (what
    ``@quota`` does per call with no token in scope). Returns its share of the units granted and
    its weight share."""
    env = Env(rate(value=100, burst=100))
    rng = random.Random(streams)
    big = env.token("r", 100)
    units = {"big": 0, "fresh": 0}
    ticket = env.acquire(big, rng.choice(big_sizes), holder="big")
    fresh: list[tuple[str, str, Ticket]] = []
    for n in itertools.count():
        while ticket.outcome is not None:
            units["big"] += granted(ticket)
            env.commit(big, granted(ticket), holder="big")
            ticket = env.acquire(big, rng.choice(big_sizes), holder="big")
        for entry in list(fresh):
            token, key, one_shot = entry
            if one_shot.outcome is not None:
                units["fresh"] += granted(one_shot)
                env.commit(token, granted(one_shot), holder=key)
                env.sched.close_token(token, 0, ME)
                fresh.remove(entry)
        if len(fresh) < streams:
            token = env.token("r", 10)
            fresh.append((token, f"p{n}", env.acquire(token, 10, holder=f"p{n}")))
            continue
        if env.now >= seconds:
            break
        env.sched.renew("big")
        env.step()
    return units["big"] / (units["big"] + units["fresh"]), 100 / (100 + 10 * streams)


@pytest.mark.parametrize("big_sizes", [(50,), (10, 30, 90)], ids=["asks-50", "mixed-sizes"])
@pytest.mark.parametrize("streams", [1, 2, 4])
def test_fresh_one_shot_tokens_do_not_starve_a_backlogged_token(
        streams: int, big_sizes: tuple[int, ...]) -> None:
    share, fair = _share_against_one_shots(streams, big_sizes)
    assert share == pytest.approx(fair, rel=0.05)


# ============================================================================ concurrency


def _slot_grants(weights: tuple[int, ...], holds: tuple[float, ...], slots: int,
                 seconds: float = 60.0) -> list[int]:
    """Slot grants per token, each token kept backlogged by three processes that hold a slot
    for the token's hold time, commit it and ask again at once (polled every 10 ms)."""
    env = Env(concurrency(value=slots))
    tokens = [env.token("k", w) for w in weights]
    grants = [0] * len(tokens)
    procs = [(i, f"t{i}p{j}") for i in range(len(tokens)) for j in range(3)]
    tickets: dict[tuple[int, str], Ticket | None] = {
        p: env.acquire(tokens[p[0]], 1, holder=p[1]) for p in procs}
    since: dict[tuple[int, str], float] = {}
    while env.now < seconds:
        for proc, ticket in tickets.items():
            if ticket is not None and ticket.outcome is not None:
                granted(ticket)
                grants[proc[0]] += 1
                since[proc], tickets[proc] = env.now, None
        for (i, key), ticket in tickets.items():
            if ticket is None and env.now - since[(i, key)] >= holds[i] - 1e-9:
                env.commit(tokens[i], 1, holder=key)
                tickets[(i, key)] = env.acquire(tokens[i], 1, holder=key)
        for _, key in procs:
            env.sched.renew(key)
        env.clock.advance(0.01)
        env.sched.poll()
    return grants


@pytest.mark.parametrize("slots", [1, 2])
def test_equal_holds_get_slot_grants_in_proportion_to_expected_use(slots: int) -> None:
    grants = _slot_grants((1, 2, 4), (0.1, 0.1, 0.1), slots)
    assert min(grants) >= 50
    assert [g / grants[0] for g in grants] == pytest.approx([1, 2, 4], rel=0.05)


@pytest.mark.parametrize("slots", [1, 2])
def test_a_token_holding_twice_as_long_gets_half_the_slot_grants(slots: int) -> None:
    short, long = _slot_grants((1, 1), (0.1, 0.2), slots)
    assert long >= 50
    assert long / short == pytest.approx(0.5, rel=0.05)
    light_short, heavy_long = _slot_grants((1, 2), (0.1, 0.2), slots)
    assert heavy_long / light_short == pytest.approx(1.0, rel=0.05)  # weight pays for it


# ========================================================================== wait estimates


def _random_queue(seed: int) -> tuple[Env, str, int]:
    """A rate resource with a random queue (tokens of mixed weights, requests of mixed sizes,
    some with their own wait limits) part-way through, and a request to estimate."""
    rng = random.Random(seed)
    env = Env(rate(value=10, burst=20, enforcement=Enforcement.REJECT, wait_limit_s=1e4))
    tokens = [env.token("r", rng.choice([1, 2, 5, 10])) for _ in range(rng.randint(1, 5))]
    for i in range(rng.randint(0, 10)):
        timeout = rng.choice([None, None, rng.uniform(0.2, 6.0)])
        env.acquire(rng.choice(tokens), rng.randint(1, 20), holder=f"h{i}", timeout=timeout)
        env.clock.advance(rng.choice([0.0, 0.0, rng.uniform(0.0, 1.0)]))
        env.sched.poll()
    target = rng.choice([*tokens, env.token("r", rng.choice([1, 5]))])
    return env, target, rng.randint(1, 20)


@pytest.mark.parametrize("seed", range(300))
def test_wait_estimates_agree_with_when_the_same_request_is_granted(seed: int) -> None:
    # The estimate (asked before, and given with a refusal) against the time the same request
    # is granted if it waits, in a copy of the same world. No one else arrives and the
    # executor polls at its wake-ups, which is what the estimate assumes: so it must be exact,
    # up to float rounding of the bucket's refill (1e-6 s).
    env, target, amount = _random_queue(seed)
    asked = env.sched.estimate_wait(target, amount)
    waiting = copy.deepcopy(env)
    refused = env.acquire(target, amount, holder="x", timeout=0.0)
    ticket = waiting.acquire(target, amount, holder="x")
    start = waiting.now
    granted_after = waiting.wait_for(ticket) - start
    granted(ticket)
    assert asked == pytest.approx(granted_after, abs=1e-6)
    if isinstance(refused.outcome, FailedReservation):
        assert refused.outcome.estimated_wait_s == pytest.approx(granted_after, abs=1e-6)
    else:
        assert granted_after == 0.0
