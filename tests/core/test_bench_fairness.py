"""The fairness benchmark (``bench/fairness.py``) in its quick mode: every workload runs, and
every token's share is within 5% of its fair share, so the benchmark cannot silently rot."""

from __future__ import annotations

from pathlib import Path

from bench import fairness


def test_quick_fairness_bench_keeps_every_share_within_5_percent_of_fair(tmp_path: Path) -> None:
    out = tmp_path / "fairness.md"
    results = fairness.report(fairness.QUICK_S, out)
    assert len(results) == len(fairness.workloads(fairness.QUICK_S)) == 8
    for result in results:
        assert result.max_error <= 0.05, result
        assert result.jain >= 0.99, result
        assert result.longest_wait_s < 5.0, result
    text = out.read_text()
    assert all(f"| {result.workload} |" in text for result in results)
