"""The benchmark suite keeps running: its quick mode completes and reports every row.

No timing is asserted (the machine is shared and noisy); safety is: ray_quota never over-admits.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from bench import check
from bench.limiters import ALL, RAY_QUOTA, RAY_QUOTA_EXEC
from tests import records


def _brute_force_excess(spans: list[tuple[float, float, float]], rate: float) -> float:
    best = float("-inf")
    for t1 in {s for s, _, _ in spans}:
        for t2 in {e for _, e, _ in spans}:
            if t2 >= t1:
                inside = sum(u for s, e, u in spans if s >= t1 and e <= t2)
                best = max(best, inside - rate * (t2 - t1))
    return best


def test_rate_check_counts_only_grants_certainly_inside_a_window() -> None:
    rng = random.Random(7)
    for _ in range(200):
        spans = []
        for _ in range(rng.randint(1, 20)):
            sent = rng.uniform(0, 10)
            received = sent if rng.random() < 0.3 else sent + rng.uniform(0, 3)
            spans.append((sent, received, float(rng.randint(1, 5))))
        rate = rng.uniform(0, 5)
        assert check.max_rate_excess(spans, rate) == pytest.approx(
            _brute_force_excess(spans, rate))
        points = [(s, u) for s, _, u in spans]
        assert check.max_rate_excess([(s, s, u) for s, u in points], rate) == pytest.approx(
            records.max_rate_excess(points, rate))


def test_quick_benchmark_reports_every_scenario_and_limiter(ray_cluster: None,
                                                            tmp_path: Path) -> None:
    from bench import run

    run.run(run.QUICK, tmp_path, quick=True)

    table = (tmp_path / "results.md").read_text()
    doc: dict[str, Any] = json.loads((tmp_path / "results.json").read_text())
    for key, title in doc["meta"]["titles"].items():
        assert f"### {title}" in table, f"scenario {key} missing from results.md"
        rows = doc["results"][key]
        names = [row["limiter"] for row in rows]
        for name in ALL:
            assert name in names, f"{name} has no row in scenario {key}"
        section = table.split(f"### {title}", 1)[1].split("\n### ", 1)[0]
        for name in names:
            assert f"| {name} |" in section, f"{name} row missing from the {key} table"
        ours = [r for r in rows if r["limiter"] in (RAY_QUOTA, RAY_QUOTA_EXEC)]
        assert ours and all(r["status"] == "ok" for r in ours), ours
        assert all(r["over_admission"] == 0 for r in ours), f"ray_quota over-admitted in {key}"
    assert "## Targets" in table
    assert list(tmp_path.glob("*.png")), "no charts written"
