"""Fairness through the whole system (service, store, processes' lease sets), on a fake clock:
the workloads that broke 0.1 — one-shot token streams against a backlogged token, concurrency with
weights, mixed request sizes — each against its fair share, from the processes' own counts."""

from __future__ import annotations

from pathlib import Path

import pytest
from system_world import World, backlog

from bench.check import jain


def shares(units: list[int]) -> list[float]:
    total = sum(units)
    return [u / total for u in units]


@pytest.mark.parametrize("resource, weights, amount, hold_s, parallel", [
    ("rate", [5, 10, 20], None, 0.0, 1),  # requests sized by weight
    ("rate", [5, 10, 20], 5, 0.0, 1),  # equal requests, unequal weights
    ("conc", [1, 2, 4], 1, 0.1, 4),  # slots held equally long, four threads a token
], ids=["rate-by-weight", "rate-equal-sizes", "concurrency"])
def test_backlogged_tokens_share_in_proportion_to_expected_use(
        tmp_path: Path, resource: str, weights: list[int], amount: int | None,
        hold_s: float, parallel: int) -> None:
    world = World(tmp_path / "state.sqlite")
    units, longest, _ = backlog(world, resource, weights, seconds=60, amount=amount,
                                hold_s=hold_s, parallel=parallel)
    fair = shares(weights)
    got = shares(units)
    assert all(abs(g - f) <= 0.05 * f for g, f in zip(got, fair)), (got, fair, units)
    assert jain([g / f for g, f in zip(got, fair)]) >= 0.99
    assert max(longest) < 5.0, longest


def test_a_long_holder_pays_for_its_hold(tmp_path: Path) -> None:
    """Concurrency is charged by slot-seconds: of two equal tokens, one holding each slot
    twice as long gets about half as many grants."""
    world = World(tmp_path / "state.sqlite")
    # Six threads each for three slots: both always have requests queued when a slot frees.
    units, _, _ = backlog(world, "conc", [2, 2], seconds=60, amount=1, hold_s=[0.1, 0.2],
                          parallel=6)
    assert units[0] == pytest.approx(2 * units[1], rel=0.1), units


@pytest.mark.parametrize("stream", [1, 2, 4])
def test_a_stream_of_one_shot_tokens_never_starves_a_backlogged_token(tmp_path: Path,
                                                                      stream: int) -> None:
    """What ``@quota`` does with no token in scope: a fresh token per call. The backlogged
    token keeps its weight's share: 20 against ``stream`` fresh tokens of weight 2 waiting."""
    world = World(tmp_path / "state.sqlite")
    units, longest, served = backlog(world, "rate", [20], seconds=60, one_shot=(stream, 2))
    total = units[0] + 2 * served
    fair = 20 / (20 + 2 * stream)
    assert abs(units[0] / total - fair) <= 0.05 * fair, (units, served, fair)
    assert longest[0] < 5.0


def test_mixed_request_sizes_keep_their_shares(tmp_path: Path) -> None:
    """Equal weights, one token asking 20 at a time and one asking 2: equal units; small
    requests pass a blocked large one only within its bypass budget."""
    world = World(tmp_path / "state.sqlite")
    units, longest, _ = backlog(world, "rate", [10, 10], seconds=60, amount=[20, 2])
    assert units[0] == pytest.approx(units[1], rel=0.05), units
    assert max(longest) < 5.0, longest


def test_idle_tokens_with_empty_live_leases_do_not_slow_virtual_time(tmp_path: Path) -> None:
    """Tokens used once and then left idle keep renewing their (now empty) leases. They must
    not count as active: if they did, virtual time would lag the backlogged tokens' passes and
    a stream of fresh one-shot tokens, entering at it, would take far more than its weight."""
    world = World(tmp_path / "state.sqlite")
    idler = world.processes[0]
    idle = []
    for _ in range(3):
        info = world.token_call("open_token", "rate", 20, idler.claimant, None)
        handle = idler.adopt_handle(info.id, "rate", 0, 20, None)
        idler.reserve(handle, 5)
        world.advance(0.1)
        idler.commit(len(idler.held) - 1, 5)
        idle.append(handle)
    world.advance(2.0)  # renewals keep the idle tokens' leases live
    sched = world.executor.service.scheduler
    assert all(list(handle.leases) for handle in idle)
    assert all(lease.active and sched.held(handle.token_id, lease.key) == 0
               for handle in idle for lease in handle.leases)  # live, and empty
    units, _, served = backlog(world, "rate", [5, 10, 20], seconds=30, one_shot=(1, 2))
    backlogged = sum(units) / (sum(units) + 2 * served)
    fair = 35 / 37
    assert abs(backlogged - fair) <= 0.05 * fair, (units, served)


def test_a_token_holding_an_open_reservation_does_not_slow_virtual_time(tmp_path: Path) -> None:
    """A token holding units in a reservation it keeps open, asking for nothing more, stops
    counting as active once its credit is full: counted for as long as it holds, it made
    virtual time lag the backlogged tokens, and newcomers entering at it took more than
    their weight (backlogged 63 % instead of 95 %)."""
    world = World(tmp_path / "state.sqlite")
    holder = world.processes[0]
    info = world.token_call("open_token", "rate", 20, holder.claimant, None)
    holder.reserve(holder.adopt_handle(info.id, "rate", 0, 20, None), 5)  # kept open throughout
    world.advance(0.2)
    units, _, served = backlog(world, "rate", [5, 10, 20], seconds=30, one_shot=(1, 2))
    backlogged = sum(units) / (sum(units) + 2 * served)
    assert abs(backlogged - 35 / 37) <= 0.05 * 35 / 37, (units, served)
