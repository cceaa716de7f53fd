"""The alerting rules in ``dashboards/alerts.yaml``, unit-tested with ``promtool test rules``: for
each alert, series on which it fires (with its labels and rendered annotations) and near misses on
which it stays quiet.

``promtool`` ships with Debian's ``prometheus`` package, which ``.ci/run`` installs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ray_quota._observability import metrics as _metrics

RULES = Path(__file__).resolve().parents[1] / "dashboards" / "alerts.yaml"
PROMTOOL = shutil.which("promtool") or (
    "/usr/bin/promtool" if os.access("/usr/bin/promtool", os.X_OK) else None)

pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package `prometheus`; .ci/run "
    "installs it)")

DAY = 24 * 60  # minutes
ENV = {"environment": "test"}


def alert_names() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}


def promtool_test(tmp_path: Path, alertname: str, cases: list[dict[str, Any]]) -> None:
    """Run ``cases`` through ``promtool test rules``. A case has ``series`` ({selector: values},
    one sample a minute) and either ``at`` (minutes) and ``alerts`` (the expected alerts' labels
    and annotations, [] for none) or ``checks``, a list of such (at, alerts) pairs on the same
    series (cheaper where the series span a day)."""
    tests = []
    for case in cases:
        checks = case.get("checks") or [(case["at"], case["alerts"])]
        tests.append({
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in case["series"].items()],
            "alert_rule_test": [{
                "eval_time": f"{at}m", "alertname": alertname,
                "exp_alerts": [{"exp_labels": labels, "exp_annotations": annotations}
                               for labels, annotations in alerts]} for at, alerts in checks],
        })
    spec = tmp_path / f"{alertname}_test.yaml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m",
                                    "tests": tests}, sort_keys=False))
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, "test", "rules", str(spec)], capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, f"promtool test rules failed:\n{done.stdout}\n{done.stderr}"


def series(name: str, **labels: str) -> str:
    return name + "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def budget(available: str, *, kind: str = "capacity", limit: int = 10_000,
           resource: str = "budget") -> dict[str, str]:
    return {series("ray_quota_available", resource=resource, **ENV): available,
            series("ray_quota_limit", resource=resource, kind=kind, **ENV): f"{limit}x{DAY}"}


def fired(resource: str | None, summary: str, description: str,
          severity: str = "warning", **labels: str) -> tuple[dict[str, str], dict[str, str]]:
    where = {**ENV, "resource": resource} if resource else {}
    return ({**where, "severity": severity, **labels},
            {"summary": summary, "description": description})


# --------------------------------------------------------------------------------- the file


def test_rules_file_is_valid_and_names_only_exported_metrics() -> None:
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    names = set(re.findall(r"\bray_quota_\w+", RULES.read_text()))
    assert names and names <= _metrics.SERIES, names - _metrics.SERIES


def test_every_alert_has_a_test() -> None:
    tested = {name.removeprefix("test_").replace("_", "") for name in globals()
              if name.startswith("test_")}
    untested = {a for a in alert_names()
                if a.lower().removeprefix("rayquota") not in tested}
    assert not untested, f"alerts without a test here: {sorted(untested)}"


# ------------------------------------------------------------------------------- each alert


def test_budget_nearly_spent(tmp_path: Path) -> None:
    summary = "ray_quota budget budget (test) is nearly spent"
    promtool_test(tmp_path, "RayQuotaBudgetNearlySpent", [
        {"series": budget("500x30"), "at": 10, "alerts": [fired(
            "budget", summary, "5% of the budget is left; raise it with `ray-quota set-limit` "
            "or `ray-quota reset`.")]},
        {"series": budget("500x30"), "at": 3, "alerts": []},  # not yet for 5 minutes
        {"series": budget("2000x30"), "at": 10, "alerts": []},  # a fifth left
        {"series": budget("0x30", kind="rate"), "at": 10, "alerts": []},  # a drained bucket
        {"series": budget("0x30", kind="concurrency"), "at": 10, "alerts": []},  # all slots busy
    ])


def test_budget_exhausted_soon(tmp_path: Path) -> None:
    # 50 units a minute: at 70 minutes 6,500 are left, spent in 7,800 s.
    promtool_test(tmp_path, "RayQuotaBudgetExhaustedSoon", [
        {"series": budget("10000-50x120"), "at": 70, "alerts": [fired(
            "budget", "ray_quota budget budget (test) runs out within 6 hours",
            "At the last hour's burn rate it is spent in 2h 10m 0s.")]},
        {"series": budget("10000-5x120"), "at": 70, "alerts": []},  # 21 hours left
        {"series": budget("6500x120"), "at": 70, "alerts": []},  # not being spent
        {"series": budget("10000-50x120", kind="rate"), "at": 70, "alerts": []},
    ])


def test_waiters_piling_up(tmp_path: Path) -> None:
    waiters = series("ray_quota_waiters", resource="tok", **ENV)
    promtool_test(tmp_path, "RayQuotaWaitersPilingUp", [
        # 2 more a minute: at 30 minutes, at least 40 waited all of the last 10.
        {"series": {waiters: "0+2x40"}, "at": 30, "alerts": [fired(
            "tok", "Reservations pile up on tok (test)", "40 reservations wait for at least "
            "10 minutes and the queue grows: demand is above the limit.")]},
        {"series": {waiters: "30x40"}, "at": 30, "alerts": []},  # long but steady
        {"series": {waiters: "60-1x40"}, "at": 30, "alerts": []},  # draining
        {"series": {waiters: "0x20 100x5 0x15"}, "at": 30, "alerts": []},  # a burst
    ])


def latency(resource: str, normal_s: float, slow_s: float, minutes: int) -> dict[str, str]:
    """60 granted reservations a minute on ``resource`` taking ``normal_s`` for a day, then
    ``slow_s`` for ``minutes``."""
    bounds = ("0.001", "0.01", "0.025", "0.1", "1", "+Inf")
    out = {}
    for le in bounds:
        normal = 60 if le == "+Inf" or normal_s <= float(le) else 0
        slow = 60 if le == "+Inf" or slow_s <= float(le) else 0
        name = series("ray_quota_reserve_latency_seconds_bucket", resource=resource, label="",
                      path="executor", outcome="granted", le=le, **ENV)
        out[name] = f"0+{normal}x{DAY} {normal * DAY + slow}+{slow}x{minutes}"
    return out


def test_reserve_latency_high(tmp_path: Path) -> None:
    # One day of series for four resources (a day of 1-minute evaluations is what costs).
    # p99 in the first bucket is 0.99 ms; in (0.1, 1] it is 991 ms; in (0.01, 0.025] 24.85 ms.
    slower = latency("slower", 0.0005, 0.5, 30)
    always = latency("always-slow", 0.5, 0.5, 30)  # as slow as usual
    small = latency("small", 0.0005, 0.02, 30)  # 25 times slower, but under 50 ms
    alert = fired("slower", "Reservations on slower (test) are slower than usual",
                  "p99 reserve latency is 991ms, over three times the day's median.")
    promtool_test(tmp_path, "RayQuotaReserveLatencyHigh", [
        {"series": {**slower, **always, **small},
         "checks": [(DAY + 20, [alert]), (DAY + 8, [])]},  # at +8: not 10 minutes yet
    ])


def test_executor_down(tmp_path: Path) -> None:
    up = series("up", job="ray_quota", instance="10.0.0.5:9464")
    promtool_test(tmp_path, "RayQuotaExecutorDown", [
        {"series": {up: "1x5 0x10"}, "at": 10, "alerts": [fired(
            None, "Prometheus cannot scrape the ray_quota executor at 10.0.0.5:9464",
            "The executor's /metrics endpoint does not answer: the executor or its node is "
            "down.", severity="critical", job="ray_quota", instance="10.0.0.5:9464")]},
        {"series": {up: "1x5 0x10"}, "at": 6, "alerts": []},  # down for one minute only
        {"series": {up: "1x15"}, "at": 10, "alerts": []},
        {"series": {series("up", job="node", instance="x:1"): "0x15"}, "at": 10, "alerts": []},
    ])


def test_metrics_absent(tmp_path: Path) -> None:
    limit = series("ray_quota_limit", resource="tok", kind="rate", **ENV)
    other = series("up", job="node", instance="x:1")
    promtool_test(tmp_path, "RayQuotaMetricsAbsent", [
        {"series": {limit: "1000x5 stale", other: "1x30"}, "at": 20, "alerts": [fired(
            None, "No ray_quota metrics for 10 minutes", "No executor is scraped: it is not "
            "running, serves no metrics, or no scrape job reaches it.", severity="critical")]},
        {"series": {other: "1x30"}, "at": 20, "alerts": [fired(
            None, "No ray_quota metrics for 10 minutes", "No executor is scraped: it is not "
            "running, serves no metrics, or no scrape job reaches it.", severity="critical")]},
        {"series": {limit: "1000x30", other: "1x30"}, "at": 20, "alerts": []},
        {"series": {limit: "1000x12 stale", other: "1x30"}, "at": 20, "alerts": []},  # 8 min
    ])


def test_lease_expiries_surging(tmp_path: Path) -> None:
    def expiries(environment: str) -> str:
        return series("ray_quota_lease_expiries_total", environment=environment)

    surge = fired(None, "Lease expiries surge in surge", "20 leases expired in 10 minutes: "
                  "processes that held quota stopped renewing.", environment="surge")
    promtool_test(tmp_path, "RayQuotaLeaseExpiriesSurging", [
        {"series": {expiries("surge"): f"0x{DAY} 2+2x30",  # a quiet day, then 2 a minute
                    expiries("usual"): f"0+1x{DAY + 30}",  # 1 a minute all day
                    expiries("one"): f"0x{DAY} 1x30"},  # a single expiry
         "checks": [(DAY + 20, [surge]), (DAY + 3, [])]},  # at +3: only just begun
    ])
