"""Node brokers on a real 3-node cluster (``ray.cluster_utils.Cluster``) on this machine.

The scenario runs in its own process, since a multi-node cluster cannot share the session's
Ray instance; it prints what it observed as JSON, and the checks here read only that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from records import jain

SCENARIO = Path(__file__).parent / "scenarios" / "brokers.py"
TTL_S = 3.0


def run_scenario(*args: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(SCENARIO.parents[3])}
    run = subprocess.run([sys.executable, str(SCENARIO), *args], capture_output=True, text=True,
                         check=False, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    # Ray may print its own lines (a raylet's note on dead workers) after ours.
    result: dict[str, Any] = json.loads(next(line for line in reversed(run.stdout.splitlines())
                                             if line.startswith("{")))
    return result


def check(result: dict[str, Any], *, strict_shares: bool) -> None:
    assert result["brokers_enabled"], "brokers should be on by default on a multi-node cluster"

    fair = result["fairness"]
    assert fair["distinct_nodes"] == 3 and fair["brokers_on_tenant_nodes"]
    assert min(fair["grants"]) >= 50
    weights, units = fair["weights"], fair["units"]
    shares = [u / sum(units) for u in units]
    expected = [weight / sum(weights) for weight in weights]
    # Per tenant; one near a bare round trip was not kept queued at the executor.
    waits = fair["mean_wait_ms"]
    # Never starved, and more weight never gets less.
    assert all(share >= 0.5 * e for share, e in zip(shares, expected)), (shares, waits)
    assert shares == sorted(shares), (shares, waits)
    if strict_shares:
        # Within 10 % of 1:2:4 held in session 2, and in 2 of 3 quiet 30 s runs of session 3
        # (once 0.21 / 0.29 / 0.49: likely the heaviest tenant, with four reservations out,
        # asking for no more than 40 units a round trip; the scenario now keeps eight out).
        # To be made the default once two runs on a quiet machine pass.
        for share, e in zip(shares, expected):
            assert abs(share - e) <= 0.10 * e, (shares, waits)
        assert jain([u / w for u, w in zip(units, weights)]) >= 0.99, (shares, waits)

    killed = result["broker_killed"]
    assert killed["reservations"] > 0 and killed["adopt_calls"] >= 1
    # Nothing granted twice (all it used was charged), and nothing lost but the broker's spare.
    assert killed["used"] <= killed["spent"] <= killed["used"] + killed["prefetch_cap"]

    removed = result["node_removed"]
    assert removed["held_before"] == 4
    assert removed["held_after"] == 1  # only the survivor's slot is still held
    assert removed["reclaimed_after_s"] < 3 * TTL_S


def test_brokers_keep_shares_fair_across_nodes_and_survive_failures() -> None:
    check(run_scenario(), strict_shares=False)


@pytest.mark.slow
def test_brokers_on_three_nodes_for_longer() -> None:
    check(run_scenario("--long"), strict_shares=True)
