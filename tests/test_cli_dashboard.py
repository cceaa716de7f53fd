"""``ray-quota dashboard export|install`` without Ray: sessions are temporary folders laid out as
Ray's dashboard lays out its Grafana set-up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from ray_quota import _cli_dashboard, cli
from ray_quota._observability import dashboard as _dashboard


def run(*args: str) -> Result:
    result = CliRunner().invoke(cli.main, ["dashboard", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def session(root: Path) -> Path:
    """A session folder as Ray's dashboard leaves it."""
    grafana = root / "metrics" / "grafana"
    (grafana / "dashboards").mkdir(parents=True)
    (grafana / "grafana.ini").write_text("[paths]\n")
    return root


@pytest.fixture(autouse=True)
def _no_ray_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the machine's own Ray sessions and settings out of every test."""
    for name in ("RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR", "RAY_METRICS_OUTPUT_ROOT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "no-ray-here"))


def test_export_writes_the_dashboard_to_a_file_a_folder_or_stdout(tmp_path: Path) -> None:
    result = run("export", str(tmp_path / "board.json"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "board.json").read_text() == _dashboard.render()
    assert run("export", str(tmp_path)).exit_code == 0
    assert (tmp_path / "ray_quota.json").read_text() == _dashboard.render()
    result = run("export", "-")
    assert result.exit_code == 0 and json.loads(result.output)["uid"] == _dashboard.UID


def test_export_into_a_missing_folder_is_refused(tmp_path: Path) -> None:
    result = run("export", str(tmp_path / "missing" / "board.json"))
    assert result.exit_code == 2 and "does not exist" in result.output
    assert not (tmp_path / "missing").exists()


def test_install_writes_into_the_sessions_grafana_dashboards(tmp_path: Path) -> None:
    root = session(tmp_path / "session_1")
    result = run("install", "--session-dir", str(root))
    assert result.exit_code == 0, result.output
    installed = root / "metrics" / "grafana" / "dashboards" / "ray_quota.json"
    assert installed.read_text() == _dashboard.render()
    assert str(installed) in result.output
    assert str(root / "metrics" / "grafana" / "grafana.ini") in result.output
    assert sorted(p.name for p in installed.parent.iterdir()) == ["ray_quota.json"]


def test_install_finds_the_latest_session_under_rays_temp_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    latest = session(tmp_path / "ray" / "session_2")
    (tmp_path / "ray" / "session_latest").symlink_to(latest)
    assert run("install").exit_code == 0
    assert (latest / "metrics" / "grafana" / "dashboards" / "ray_quota.json").is_file()


def test_install_follows_rays_dashboard_folder_setting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR", str(tmp_path))
    assert run("install").exit_code == 0
    assert (tmp_path / "ray_quota.json").read_text() == _dashboard.render()


def test_install_without_rays_grafana_prints_the_path_and_how_to_import(tmp_path: Path) -> None:
    result = run("install", "--session-dir", str(tmp_path))  # a session without Ray's dashboard
    assert result.exit_code == 1
    assert str(tmp_path / "metrics" / "grafana" / "dashboards") in result.output
    assert "ray-quota dashboard export" in result.output and "Import" in result.output
    assert list(tmp_path.iterdir()) == []
    result = run("install")  # no Ray session at all on this machine
    assert result.exit_code == 1 and "session_latest" in result.output


def test_install_into_a_missing_session_is_refused(tmp_path: Path) -> None:
    result = run("install", "--session-dir", str(tmp_path / "nope"))
    assert result.exit_code == 2 and "is not a folder" in result.output


def test_rays_grafana_settings_are_named_as_ray_names_them() -> None:
    metrics_head = pytest.importorskip("ray.dashboard.modules.metrics.metrics_head",
                                       reason="Ray without its dashboard (ray[default])")
    assert metrics_head.GRAFANA_DASHBOARD_OUTPUT_DIR_ENV_VAR == _cli_dashboard._RAY_DASHBOARDS_ENV
    assert metrics_head.METRICS_OUTPUT_ROOT_ENV_VAR == _cli_dashboard._RAY_METRICS_ROOT_ENV
