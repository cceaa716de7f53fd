"""The scale model (bench/scale_model/) on its quick size: 4 nodes x 8 processes, 150 s.

What must hold in the model: with brokers the executor's renewals scale with nodes, without them
with processes; nobody is admitted beyond the limit; tenants get their weighted shares in both
modes; every unit is accounted for after the drain. The checks come from the model itself
(``check_runs``), and one test shows they fail when brokers stop batching renewals.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench import scale_model
from bench.scale_model import (
    EXECUTOR,
    Params,
    Stats,
    Window,
    admission,
    check_runs,
    quick,
    run,
    run_all,
)
from ray_quota._spec import Enforcement, Kind, ResourceSpec

QUICK = quick(Params())
Runs = dict[str, dict[str, Any]]


@pytest.fixture(scope="module")
def contended() -> Runs:
    return run_all(QUICK, ["contended"])["contended"]


def test_the_quick_model_runs_both_modes_in_well_under_30_seconds(contended: Runs) -> None:
    assert set(contended) == {"direct", "brokers"}
    assert sum(result["wall_s"] for result in contended.values()) < 30
    assert all(result["simulated_s"] >= QUICK.warmup_s + QUICK.seconds
               for result in contended.values())


def test_with_brokers_executor_renewals_scale_with_nodes_without_them_with_processes(
        contended: Runs) -> None:
    nodes, processes = QUICK.nodes, QUICK.processes
    assert contended["brokers"]["executor"]["calls_per_s"]["renew"] <= nodes * 1.2
    assert contended["direct"]["executor"]["calls_per_s"]["renew"] >= processes * 0.8
    assert contended["brokers"]["executor"]["calls_per_s"]["watch"] <= nodes * 1.2 / 2


def test_nobody_is_admitted_beyond_the_limit_in_either_mode(contended: Runs) -> None:
    for result in contended.values():
        assert result["admission"]["windows"] > 100
        assert result["admission"]["excess"] <= 1.0  # units over burst + rate x T + leases
        assert result["held_over_leased"] == 0  # samples where holders held more
        assert 0.9 <= result["tenants"]["limit_use"] <= 1.05  # the limit binds, and holds


def test_tenants_get_their_weighted_shares_within_10_percent_in_both_modes(
        contended: Runs) -> None:
    for result in contended.values():
        assert result["tenants"]["share_error"] <= 0.10
        assert result["tenants"]["jain"] >= 0.99


def test_every_unit_is_accounted_for_after_the_drain(contended: Runs) -> None:
    for result in contended.values():
        accounting = result["accounting"]
        assert accounting["drained"]
        assert accounting["leased_at_end"] == 0
        assert accounting["broker_leases_at_end"] == 0
        assert accounting["live_tokens_at_end"] == len(QUICK.weights)  # every task token closed
        assert accounting["units_out"] >= accounting["units_used"] > 0  # nothing used uncharged
    direct = contended["direct"]["accounting"]
    assert direct["units_out"] == direct["units_used"]  # and nothing charged that went unused
    assert direct["lease_expiries"] == 0


def test_the_models_own_checks_pass_on_the_quick_size(contended: Runs) -> None:
    assert check_runs(contended) == []


def test_the_checks_fail_when_brokers_stop_batching_renewals(contended: Runs) -> None:
    unbatched = run(replace(QUICK, batch_renewals=False), brokers=True)
    failures = check_runs({"direct": contended["direct"], "brokers": unbatched})
    assert unbatched["executor"]["calls_per_s"]["renew"] > QUICK.processes * 0.8
    assert any(failure.startswith("brokers on:") for failure in failures)


def test_brokers_cut_the_executors_calls(contended: Runs) -> None:
    direct, brokers = (contended[mode]["executor"]["calls_per_s"] for mode in ("direct", "brokers"))
    assert brokers["total"] < direct["total"] / 2
    assert contended["brokers"]["brokers"]["forwarded"] > 0


@pytest.mark.parametrize("units, outstanding, over", [
    (190, 0, False),  # burst 100 + 0.9 s of refill: exactly the bound
    (500, 0, True),  # 310 units too many
    (500, 310, False),  # unless 310 units were out in leases when the window opened
])
def test_the_admission_check_finds_units_used_beyond_the_bound(units: int, outstanding: int,
                                                                over: bool) -> None:
    spec = ResourceSpec("tok", Kind.RATE, value=6000, period_s=60.0, burst=100,
                        enforcement=Enforcement.THROTTLE)
    stats = Stats(Window(0.0, 10.0))
    for i in range(10):  # ten reservations admitted from t=0 to t=0.9, all used
        index = stats.reservation(0, 0.1 * i, 0.1 * i, units // 10, EXECUTOR)
        stats.used[index] = units // 10
    stats.net_out.append((0.0, float(outstanding)))
    excess = admission(stats, spec)["excess"]
    assert (excess > 1.0) is over


def test_with_brokers_no_sub_lease_ends_while_its_process_runs() -> None:
    """Long waits at the executor and grants that land while a renewal is out must not cut a
    broker's trust short: its sub-leases would end, charged in full (two bugs the model found)."""
    result = run(replace(QUICK, core_time_s=20e-6), brokers=True)  # no clock in the loop
    assert result["lease_restarts"] == 0
    assert result["accounting"]["units_out"] == result["accounting"]["units_used"]


def test_the_command_writes_the_results_the_table_and_the_chart(tmp_path: Path) -> None:
    assert scale_model.main(["--quick", "--quiet", "--jobs", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "scale_results.json").read_text())
    assert set(report["runs"]) == {"contended", "uncontended"}
    assert report["checks"] == {"contended": [], "uncontended": []}
    table = (tmp_path / "scale_model.md").read_text()
    assert "python -m bench.scale_model --quick" in table
    assert "| executor calls/s (total) |" in table
    assert (tmp_path / "scale_model.png").stat().st_size > 10_000
