"""``ray-quota dashboard``: write the Grafana dashboard, or put it where Ray's Grafana finds it.

Ray's dashboard, when it starts on the head node, writes a Grafana set-up into the session
directory (``<session>/metrics/grafana/``): ``grafana.ini``, and a provisioning file that loads
every dashboard JSON in ``<session>/metrics/grafana/dashboards/``. ``install`` writes ours there.
Nothing here connects to Ray.

Example:
    $ ray-quota dashboard install                 # next to Ray's dashboards
    $ ray-quota dashboard export ray_quota.json   # for a Grafana of your own: import the file
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

FILE_NAME = "ray_quota.json"
# Ray's own overrides of where its Grafana set-up goes (ray.dashboard.modules.metrics).
_RAY_DASHBOARDS_ENV = "RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR"
_RAY_METRICS_ROOT_ENV = "RAY_METRICS_OUTPUT_ROOT"
_IMPORT_HINT = ("To import it by hand: `ray-quota dashboard export ray_quota.json`, then in "
                "Grafana open Dashboards > New > Import, upload the file and pick a Prometheus "
                "data source.")


def ray_temp_root() -> Path:
    """Where Ray keeps its sessions on this machine, chosen as Ray chooses it."""
    if "RAY_TMPDIR" in os.environ:
        return Path(os.environ["RAY_TMPDIR"]) / "ray"
    if sys.platform.startswith("linux") and "TMPDIR" in os.environ:
        return Path(os.environ["TMPDIR"]) / "ray"
    return Path("/tmp/ray")


def dashboards_dir(session_dir: Path | None) -> Path:
    """The folder Ray's Grafana provisioning loads dashboards from: under ``session_dir`` when
    given, else where Ray's environment variables put it, else the latest session's."""
    if session_dir is not None:
        return session_dir / "metrics" / "grafana" / "dashboards"
    if os.environ.get(_RAY_DASHBOARDS_ENV):
        return Path(os.environ[_RAY_DASHBOARDS_ENV])
    if os.environ.get(_RAY_METRICS_ROOT_ENV):
        return Path(os.environ[_RAY_METRICS_ROOT_ENV]) / "grafana" / "dashboards"
    return ray_temp_root() / "session_latest" / "metrics" / "grafana" / "dashboards"


def _write(path: Path, text: str) -> None:
    """Write through a temporary file, so a Grafana scanning the folder never reads half."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.replace(path)


def _render() -> str:
    from ray_quota._observability import dashboard  # the Grafana SDK loads only when asked

    return dashboard.render()


@click.group()
def dashboard() -> None:
    """Write the Grafana dashboard, or install it next to Ray's."""


@dashboard.command()
@click.argument("path", type=click.Path(path_type=Path, dir_okay=True), default=FILE_NAME,
                required=False)
def export(path: Path) -> None:
    """Write the dashboard's JSON to PATH (a file, a folder, or - for stdout).

    [default: ./ray_quota.json]
    """
    text = _render()
    if str(path) == "-":
        click.echo(text, nl=False)
        return
    if path.is_dir():
        path = path / FILE_NAME
    if not path.parent.is_dir():
        raise click.BadParameter(f"folder {str(path.parent)!r} does not exist",
                                 param_hint="'PATH'")
    _write(path, text)
    click.echo(f"wrote {path}")


@dashboard.command()
@click.option("--session-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="The Ray session's folder [default: the latest session on this machine, "
                   "/tmp/ray/session_latest].")
def install(session_dir: Path | None) -> None:
    """Put the dashboard where Ray's Grafana provisioning loads it.

    Run it on the head node after `ray start --head` (Ray rewrites the folder when the head
    starts again: install again then). Grafana started with Ray's grafana.ini shows it next to
    Ray's own dashboards.
    """
    if session_dir is not None and not session_dir.is_dir():
        raise click.BadParameter(f"{str(session_dir)!r} is not a folder",
                                 param_hint="'--session-dir'")
    folder = dashboards_dir(session_dir)
    if not folder.is_dir():
        raise click.ClickException(
            f"Ray's Grafana dashboards folder {folder} does not exist: Ray writes it when its "
            "dashboard starts on the head node (`ray start --head` with ray[default]); pass "
            f"--session-dir for another session. {_IMPORT_HINT}")
    target = folder / FILE_NAME
    _write(target, _render())
    grafana_ini = folder.parent / "grafana.ini"
    config = f" --config {grafana_ini}" if grafana_ini.is_file() else ""
    click.echo(f"installed {target}\nGrafana started with `grafana-server{config} web` lists it "
               "under Dashboards > Ray, next to Ray's own.")
