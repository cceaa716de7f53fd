"""The ``ray-quota`` command, driven in-process by click's CliRunner against the session Ray."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from click.testing import CliRunner, Result

import ray_quota
from ray_quota import QuotaToken, cli
from tests.conftest import TEST_MANIFEST


@pytest.fixture(scope="module", autouse=True)
def _stopped_after_module(ray_cluster: None) -> Any:
    yield
    ray_quota.shutdown()


@pytest.fixture
def unchanged_executor(ray_cluster: None) -> Any:
    """The TEST_MANIFEST executor for tests that change no limit: started by the first that asks
    (or after a test that used the fresh ``executor`` fixture), reused by the next."""
    return ray_quota.init(manifest=TEST_MANIFEST, environment="test",
                          policy=ray_quota.Policy(lease_ttl_s=3.0), metrics_port=0)


def run(*args: str) -> Result:
    result = CliRunner().invoke(cli.main, list(args))
    # Whatever happened, no Python traceback: only SystemExit (click's exit) may end a command.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result


def status_json() -> dict[str, Any]:
    result = run("status", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in doc["resources"]}


def write_manifest(path: Path, manifest: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(manifest), encoding="utf-8")
    return path


def changed_manifest(**values: int) -> dict[str, Any]:
    """TEST_MANIFEST with some resources' limit values changed."""
    manifest = json.loads(json.dumps(TEST_MANIFEST))
    for name, value in values.items():
        manifest["environments"]["test"][name]["limit"]["value"] = value
    return manifest


# -------------------------------------------------------------------------------------- status


@pytest.mark.usefixtures("unchanged_executor")
def test_status_prints_a_table_row_per_resource() -> None:
    result = run("status", "--address", ray.get_runtime_context().gcs_address)
    assert result.exit_code == 0, result.output
    assert "environment 'test'" in result.output
    for header in ("limit", "available", "in use", "waiters", "live tokens", "leases",
                   "leased units"):
        assert header in result.output
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines()
             if line.count("│") > 2}
    assert set(TEST_MANIFEST["environments"]["test"]) <= set(lines)
    assert "rate/second, burst 200" in lines["tok"] and "1,000" in lines["tok"]
    assert "capacity" in lines["budget"] and "10,000" in lines["budget"]


@pytest.mark.usefixtures("unchanged_executor")
def test_status_json_reports_limits_and_live_use() -> None:
    doc = status_json()
    assert doc["environment"] == "test"
    rows = by_name(doc)
    assert set(rows) == set(TEST_MANIFEST["environments"]["test"])
    assert rows["tok"] | {"available": None} == rows["tok"] | {
        "name": "tok", "kind": "rate", "limit": 1000, "period_s": 1.0, "burst": 200,
        "unit": "token", "enforcement": "throttle", "waiters": 0, "tokens": 0,
        "available": None}
    assert rows["conn"]["wait_limit_s"] == 20.0 and rows["conn"]["period_s"] is None

    token = QuotaToken("conn", expected_use=1)
    with token.reserve(1):
        rows = by_name(status_json())
        assert rows["conn"]["tokens"] == 1
        assert rows["conn"]["in_use"] + rows["conn"]["leased_units"] >= 1
        assert rows["conn"]["available"] == 3
    token.close()
    assert by_name(status_json())["conn"]["tokens"] == 0


def stop_after(calls: int, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Make the watch loop's sleep end the loop as Ctrl-C does, on its ``calls``-th call."""
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == calls:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_sleep", sleep)
    return slept


@pytest.mark.usefixtures("unchanged_executor")
def test_status_watch_refreshes_until_ctrl_c(monkeypatch: pytest.MonkeyPatch) -> None:
    slept = stop_after(3, monkeypatch)
    result = run("status", "--watch", "0.5")
    assert result.exit_code == 0, result.output
    assert slept == [0.5, 0.5, 0.5]
    assert result.output.count("environment 'test'") == 3


@pytest.mark.usefixtures("unchanged_executor")
def test_status_watch_json_prints_one_document_per_refresh(
        monkeypatch: pytest.MonkeyPatch) -> None:
    stop_after(2, monkeypatch)
    result = run("status", "--json", "--watch", "1")
    assert result.exit_code == 0, result.output
    docs = [json.loads(line) for line in result.output.splitlines()]
    assert len(docs) == 2 and all(doc["environment"] == "test" for doc in docs)


# --------------------------------------------------------------------------- apply, set-limit


@pytest.mark.usefixtures("executor")
def test_apply_prints_what_changed_and_the_limits_change(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "quota.yaml", changed_manifest(tok=2000, conn=6))
    result = run("apply", "--manifest", str(path), "--environment", "test")
    assert result.exit_code == 0, result.output
    changed = [line for line in result.output.splitlines() if line]
    assert len(changed) == 2
    assert {line.split(":")[0] for line in changed} == {"tok", "conn"}
    rows = by_name(status_json())
    assert rows["tok"]["limit"] == 2000 and rows["conn"]["limit"] == 6

    again = run("apply", "--manifest", str(path))  # the environment defaults to the running one
    assert again.exit_code == 0 and "no changes" in again.output


@pytest.mark.usefixtures("executor")
def test_set_limit_changes_status() -> None:
    result = run("set-limit", "conn", "7")
    assert result.exit_code == 0, result.output
    assert "conn: limit 4 -> 7" in result.output
    assert by_name(status_json())["conn"]["limit"] == 7
    assert run("set-limit", "tok", "60_000").exit_code == 0
    assert by_name(status_json())["tok"]["limit"] == 60_000


def malformed(tmp_path: Path) -> Path:
    path = tmp_path / "broken.yaml"
    path.write_text("environments: {test: [1, 2\n", encoding="utf-8")
    return path


def invalid(tmp_path: Path) -> Path:
    return write_manifest(tmp_path / "invalid.yaml", changed_manifest(tok=-5))


def two_environments(tmp_path: Path) -> Path:
    manifest = json.loads(json.dumps(TEST_MANIFEST))
    manifest["environments"]["other"] = manifest["environments"]["test"]
    return write_manifest(tmp_path / "two.yaml", manifest)


def added_resource(tmp_path: Path) -> Path:
    manifest = json.loads(json.dumps(TEST_MANIFEST))
    manifest["environments"]["test"]["new"] = {"limit": {"type": "capacity", "value": 5}}
    return write_manifest(tmp_path / "added.yaml", manifest)


def other_manifest(tmp_path: Path) -> Path:
    return write_manifest(tmp_path / "other.yaml", changed_manifest(budget=5))


BAD_INPUTS = {
    "unknown resource": (lambda p: ["set-limit", "nope", "10"], ["'nope'", "known:", "tok"]),
    "negative limit": (lambda p: ["set-limit", "tok", "-5"], ["VALUE", "-5"]),
    "zero limit": (lambda p: ["set-limit", "tok", "0"], ["VALUE", "not 0"]),
    "float limit": (lambda p: ["set-limit", "tok", "1.5"], ["VALUE", "whole number", "1.5"]),
    "word limit": (lambda p: ["set-limit", "tok", "lots"], ["VALUE", "'lots'"]),
    "missing manifest": (lambda p: ["apply", "--manifest", str(p / "nowhere.yaml")],
                         ["--manifest", "nowhere.yaml", "does not exist"]),
    "manifest not given": (lambda p: ["apply"], ["--manifest"]),
    "malformed manifest": (lambda p: ["apply", "--manifest", str(malformed(p))],
                           ["broken.yaml:", "YAML syntax error"]),
    "invalid manifest": (lambda p: ["apply", "--manifest", str(invalid(p))],
                         ["invalid.yaml:", "environments.test.tok.limit.value",
                          "greater than 0"]),
    "unknown environment": (lambda p: ["apply", "--manifest", str(other_manifest(p)), "-e", "prod"],
                            ["environments.prod", "unknown environment"]),
    "not the running environment": (
        lambda p: ["apply", "--manifest", str(two_environments(p)), "-e", "other"],
        ["--environment", "'test'", "not 'other'"]),
    "resource added by apply": (lambda p: ["apply", "--manifest", str(added_resource(p))],
                                ["cannot add or remove", "new"]),
    "start with another manifest": (
        lambda p: ["start", "--manifest", str(other_manifest(p)), "-e", "test"],
        ["already running", "ray-quota apply"]),
    "start on an unknown environment": (
        lambda p: ["start", "--manifest", str(other_manifest(p)), "-e", "prod"],
        ["unknown environment"]),
    "both metrics options": (
        lambda p: ["start", "-m", str(other_manifest(p)), "-e", "test", "--no-metrics",
                   "--metrics-port", "0"], ["--no-metrics", "not both"]),
    "metrics port out of range": (
        lambda p: ["start", "-m", str(other_manifest(p)), "-e", "test", "--metrics-port", "70000"],
        ["--metrics-port", "70000"]),
    "status --watch 0": (lambda p: ["status", "--watch", "0"], ["--watch", "0.1"]),
    "a local address": (lambda p: ["status", "--address", "local"], ["--address", "'local'"]),
    "demo where an executor runs": (lambda p: ["demo", "--address", "auto"],
                                    ["--address", "already runs"]),
    "demo for no time": (lambda p: ["demo", "--duration", "0"], ["--duration"]),
    "scrape target with no port": (lambda p: ["prometheus-config", "--target", "localhost"],
                                   ["--target", "'localhost' is not HOST:PORT"]),
    "scrape job name with a quote": (
        lambda p: ["prometheus-config", "--target", "h:1", "--job-name", 'a"b'], ["--job-name"]),
    "scrape interval in words": (lambda p: ["prometheus-config", "--scrape-interval", "often"],
                                 ["--scrape-interval", "'often'"]),
}


@pytest.mark.usefixtures("unchanged_executor")
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_names_the_problem_and_changes_nothing(
        case: str, tmp_path: Path) -> None:
    args, expected = BAD_INPUTS[case]
    before = status_json()
    result = run(*args(tmp_path))
    assert result.exit_code == 2, result.output
    for text in expected:
        assert text in result.output, (text, result.output)
    assert status_json() == before


# -------------------------------------------------------------------------------- start, stop


@pytest.mark.usefixtures("executor")
def test_stop_then_status_says_no_executor_and_start_brings_it_back(tmp_path: Path) -> None:
    stopped = run("stop")
    assert stopped.exit_code == 0 and "stopped the ray_quota executor" in stopped.output
    for command in (["status"], ["status", "--json"], ["set-limit", "tok", "5"]):
        result = run(*command)
        assert result.exit_code == 1
        assert "no ray_quota executor is running" in result.output
        assert "ray-quota start" in result.output
    assert "nothing to stop" in run("stop").output

    path = write_manifest(tmp_path / "quota.yaml", TEST_MANIFEST)
    started = run("start", "--manifest", str(path), "--environment", "test",
                  "--metrics-port", "0", "--brokers")
    assert started.exit_code == 0, started.output
    assert "executor started: environment 'test', 7 resources" in started.output
    assert "node brokers: on" in started.output and ray_quota.info().brokers
    assert f"metrics: http://{ray_quota.metrics_address()}/metrics" in started.output
    assert "budget" in started.output  # and the status table
    again = run("start", "-m", str(path), "-e", "test")
    assert again.exit_code == 0 and "already running" in again.output
    assert ray_quota.info().environment == "test"


# ------------------------------------------------------------------------- prometheus, demo


@pytest.mark.usefixtures("unchanged_executor")
def test_prometheus_config_prints_a_scrape_job_for_the_metrics_endpoint() -> None:
    try:
        metrics = importlib.import_module("ray_quota._observability.metrics")
    except ImportError:
        metrics = None
    if not hasattr(metrics, "prometheus_scrape_config"):
        pytest.skip("metrics module not present yet")
    result = run("prometheus-config", "--target", "127.0.0.1:9464", "--job-name", "quotas")
    assert result.exit_code == 0, result.output
    job = yaml.safe_load(result.output)
    assert job[0]["job_name"] == "quotas"
    assert job[0]["static_configs"][0]["targets"] == ["127.0.0.1:9464"]

    asked = run("prometheus-config")  # where the running executor says it serves metrics
    assert asked.exit_code == 0, asked.output
    targets = yaml.safe_load(asked.output)[0]["static_configs"][0]["targets"]
    assert targets == [ray_quota.metrics_address()]


@pytest.mark.usefixtures("unchanged_executor")
def test_demo_runs_the_demo_with_its_options(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    import ray_quota.demo

    calls: list[list[str]] = []
    monkeypatch.setattr(ray_quota.demo, "main", calls.append)
    monkeypatch.setenv("RAY_ADDRESS", "restored-after-the-test")
    chart = tmp_path / "chart.png"
    result = run("demo", "--duration", "1.5", "--workers", "2", "--chart", str(chart))
    assert result.exit_code == 0, result.output
    assert calls == [["--duration", "1.5", "--workers", "2", "--chart", str(chart)]]
    assert os.environ["RAY_ADDRESS"] == "local"  # a private Ray, not the cluster `ray start` began


def test_no_ray_cluster_exits_1_with_how_to_start_one(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_cluster(**kwargs: Any) -> None:
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(cli.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cli.ray, "init", no_cluster)
    result = run("status", "--address", "auto")
    assert result.exit_code == 1
    assert "cannot connect to a Ray cluster at --address 'auto'" in result.output
    assert "ray start --head" in result.output
