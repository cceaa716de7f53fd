"""Spent budgets survive `ray-quota stop`/`start` and a new Ray cluster; `reset` refills them; a
Ray restart that cannot find its state refuses; a process exits quietly after Ray is gone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from click.testing import CliRunner, Result
from conftest import ROOT, forget_state

import ray_quota
from ray_quota import cli
from ray_quota._core.protocol import EXECUTOR_NAME, NAMESPACE

MANIFEST: dict[str, Any] = {"environments": {"durable": {
    "budget": {"limit": {"type": "capacity", "value": 50_000}, "enforcement": "reject"},
    "conn": {"limit": {"type": "concurrency", "value": 2}},
}}}


def run(*args: str) -> Result:
    result = CliRunner().invoke(cli.main, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return result


def budget_available() -> int:
    status = run("status", "--json")
    assert status.exit_code == 0, status.output
    return next(r["available"] for r in json.loads(status.output)["resources"]
                if r["name"] == "budget")


def subprocess_env(state_dir: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_QUOTA_STATE_DIR": str(state_dir)}
    env.pop("RAY_ADDRESS", None)
    return env


# A new Ray cluster on this machine (its own local instance), on the same state directory.
NEW_CLUSTER = textwrap.dedent("""
    import json, sys, ray, ray_quota
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    ray_quota.init(manifest=json.loads(sys.argv[1]), environment="durable", metrics_port=None)
    before = next(s.available for s in ray_quota.status() if s.name == "budget")
    lines = ray_quota.reset("budget")
    after = next(s.available for s in ray_quota.status() if s.name == "budget")
    ray_quota.shutdown()
    ray.shutdown()
    print(json.dumps({"before": before, "lines": lines, "after": after}))
""")


def test_spent_budget_survives_stop_start_and_a_new_cluster_until_reset(
        ray_cluster: None, state_dir: Path, tmp_path: Path) -> None:
    ray_quota.shutdown()
    forget_state(state_dir, "durable")
    path = tmp_path / "quota.yaml"
    path.write_text(yaml.safe_dump(MANIFEST), encoding="utf-8")
    assert run("start", "-m", str(path), "-e", "durable", "--no-metrics").exit_code == 0
    token = ray_quota.QuotaToken("budget", expected_use=30_000)
    with token.reserve(30_000) as reservation:
        reservation.commit(30_000)
    token.close()
    assert budget_available() == 20_000

    assert run("stop").exit_code == 0
    assert run("start", "-m", str(path), "-e", "durable", "--no-metrics").exit_code == 0
    assert budget_available() == 20_000  # `stop` and `start` refilled nothing
    assert run("stop").exit_code == 0

    other = subprocess.run([sys.executable, "-c", NEW_CLUSTER, json.dumps(MANIFEST)],
                           capture_output=True, text=True, timeout=300,
                           env=subprocess_env(state_dir))
    assert other.returncode == 0, other.stderr[-3000:]
    seen = json.loads(other.stdout.strip().splitlines()[-1])
    assert seen == {"before": 20_000, "lines": ["budget: 30,000 refilled, 50,000 available"],
                    "after": 50_000}

    assert run("start", "-m", str(path), "-e", "durable", "--no-metrics").exit_code == 0
    assert budget_available() == 50_000  # the other cluster's reset was saved too
    unknown = run("reset", "nope")
    assert unknown.exit_code == 2 and "'nope'" in unknown.output
    neither = run("reset")
    assert neither.exit_code == 2 and "--all" in neither.output
    refilled = run("reset", "--all")
    assert refilled.exit_code == 0
    assert refilled.output.splitlines() == ["budget: 0 refilled, 50,000 available",
                                            "conn: 0 refilled, 2 available"]
    ray_quota.shutdown()


def pid_of(handle: Any) -> int:
    return int(ray.get(handle.__ray_call__.remote(lambda _self: os.getpid()), timeout=30))


def refusal(handle: Any, killed_pid: int) -> str:
    """The error the restarted executor answers with, once it has tried to start.

    `ray.kill` returns before the process is gone, so an answer from the killed process itself
    (same pid) means only that the kill has not landed yet."""
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, "the executor never finished restarting"
        try:
            pid = pid_of(handle)
        except ray.exceptions.ActorUnavailableError:
            time.sleep(0.5)  # still restarting
        except ray.exceptions.RayActorError as exc:
            return str(exc)
        else:
            if pid != killed_pid:
                raise AssertionError("the executor restarted afresh without its state")
            time.sleep(0.2)  # the kill has not landed yet


def test_a_ray_restart_without_its_state_file_refuses_to_start_afresh(
        ray_cluster: None, state_dir: Path) -> None:
    ray_quota.shutdown()
    forget_state(state_dir, "durable")
    ray_quota.init(manifest=MANIFEST, environment="durable", metrics_port=None)
    handle = ray.get_actor(EXECUTOR_NAME, namespace=NAMESPACE)
    ray.get(handle.close_state.remote())
    forget_state(state_dir, "durable")  # as if Ray restarted it on a node without the file
    killed_pid = pid_of(handle)
    ray.kill(handle, no_restart=False)  # its process dies; Ray restarts it
    assert "StateMissingError" in refusal(handle, killed_pid)
    ray_quota.shutdown()  # a deliberate stop: now a fresh start is what is asked for
    info = ray_quota.init(manifest=MANIFEST, environment="durable", metrics_port=None)
    assert info.environment == "durable"
    ray_quota.shutdown()


EXIT = textwrap.dedent("""
    import sys, ray, ray_quota
    from ray_quota._core.protocol import EXECUTOR_NAME, NAMESPACE
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    ray_quota.init(manifest={"environments": {"t": {"conn": {"limit": {
        "type": "concurrency", "value": 4}}}}}, environment="t", metrics_port=None)
    token = ray_quota.QuotaToken("conn", expected_use=1)
    reservation = token.reserve(1)  # still open at exit: the flush has something to send
    if sys.argv[1] == "kill":
        ray.kill(ray.get_actor(EXECUTOR_NAME, namespace=NAMESPACE), no_restart=True)
    else:
        ray.shutdown()
    print("done")
""")


@pytest.mark.parametrize("gone", ["ray-shutdown", "kill"])
def test_a_clean_exit_prints_nothing_when_the_executor_or_ray_is_gone(
        gone: str, tmp_path: Path) -> None:
    ended = subprocess.run([sys.executable, "-c", EXIT, gone], capture_output=True, text=True,
                           timeout=300, env=subprocess_env(tmp_path))
    assert ended.returncode == 0, ended.stderr[-3000:]
    assert ended.stdout.strip().endswith("done")
    assert "Traceback" not in ended.stderr and "Exception" not in ended.stderr, ended.stderr
