"""The ``ray-quota`` command: start, inspect, change and stop the cluster's executor.

Every command parses its arguments and calls the public API; nothing else lives here. Bad input
(an unknown resource, a limit that is not a whole number from 1, a missing or invalid manifest, an
unknown environment) ends with exit code 2 and a message that names it, and changes nothing. When
nothing is running (no Ray cluster, no executor) the exit code is 1.

Example:
    $ ray start --head
    $ ray-quota start --manifest examples/quota.yaml --environment local
    $ ray-quota status --watch 2
    $ ray-quota set-limit llm-tokens 90000
    $ ray-quota reset llm-tokens
    $ ray-quota stop
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
import ray
from rich.console import Console
from rich.live import Live
from rich.table import Table

import ray_quota
from ray_quota import (
    ExecutorInfo,
    IncompatibleTokensError,
    InvalidAmountError,
    ManifestError,
    NotInitializedError,
    QuotaError,
    ResourceSpec,
    ResourceStatus,
    UnknownResourceError,
)
from ray_quota._cli_dashboard import dashboard
from ray_quota._spec import PERIOD_WORDS

F = TypeVar("F", bound=Callable[..., Any])

_START_HINT = "start one with `ray-quota start --manifest FILE`"
_PERIODS = {seconds: word for word, seconds in PERIOD_WORDS.items()}

# The one place the watch loop waits; tests swap it for one that stops the loop.
_sleep: Callable[[float], None] = time.sleep


# ------------------------------------------------------------------------------ the CLI's edge


def _edge(fn: F) -> F:
    """Turn ray_quota's errors into click's: bad input exits 2, nothing running exits 1.

    No traceback reaches the user for either.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NotInitializedError as exc:
            raise click.ClickException(
                f"no ray_quota executor is running on this Ray cluster: {_START_HINT}") from exc
        except (ManifestError, UnknownResourceError, InvalidAmountError,
                IncompatibleTokensError) as exc:
            raise click.UsageError(str(exc)) from exc
        except QuotaError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper  # type: ignore[return-value]


@contextmanager
def _connected(address: str) -> Iterator[None]:
    """Connect this process to the Ray cluster at ``address`` for the command's duration.

    A process that is already connected (a script or a test calling the CLI in-process) keeps its
    connection and ``address`` is not used.
    """
    if address == "local":
        raise click.BadParameter(
            "'local' would start a private Ray that stops when this command exits, taking the "
            "executor with it; start a cluster with `ray start --head` and use 'auto' or its "
            "HOST:PORT", param_hint="'--address'")
    if ray.is_initialized():
        yield
        return
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    except ConnectionError as exc:
        raise click.ClickException(
            f"cannot connect to a Ray cluster at --address {address!r} ({exc}). Start one with "
            "`ray start --head`, or pass --address HOST:PORT of a running cluster; a cluster "
            "that uses token authentication also needs RAY_AUTH_MODE=token when its address is "
            "given") from exc
    except ValueError as exc:  # e.g. an address that is not HOST:PORT
        raise click.BadParameter(str(exc), param_hint="'--address'") from exc
    try:
        yield
    finally:
        ray.shutdown()  # disconnects; the detached executor keeps running in the cluster


def _address_option(fn: F) -> F:
    return click.option(
        "--address", default="auto", show_default=True, metavar="ADDRESS",
        help="The Ray cluster: 'auto' finds the one running on this machine (or the one "
             "RAY_ADDRESS names); else HOST:PORT of its head node.")(fn)


class _WholeNumber(click.ParamType):
    """An integer written in full ("60000" or "60_000"); the API checks its range."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return int(str(value).strip(), 10)
        except ValueError:
            self.fail(f"must be a whole number, not {value!r}", param, ctx)


class _HostPort(click.ParamType):
    """``host:port`` with a port from 1 to 65535."""

    name = "host:port"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        host, _, port = str(value).rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            self.fail(f"{value!r} is not HOST:PORT with a port from 1 to 65535", param, ctx)
        return str(value)


# ---------------------------------------------------------------------------------- rendering


def _kind(spec: ResourceSpec | None, status: ResourceStatus) -> str:
    if spec is None or status.kind != "rate":
        return status.kind
    period = _PERIODS.get(spec.period_s, f"{spec.period_s:g}s")
    return f"rate/{period}, burst {spec.burst:,}"


def _table(info: ExecutorInfo, statuses: list[ResourceStatus]) -> Table:
    table = Table(title=f"ray_quota executor: environment {info.environment!r}",
                  title_justify="left")
    table.add_column("resource", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    for header in ("limit", "available", "in use", "waiters", "live tokens", "leases",
                   "leased units"):
        table.add_column(header, justify="right", no_wrap=True)
    for s in statuses:
        table.add_row(s.name, _kind(info.resources.get(s.name), s), f"{s.limit:,}",
                      f"{s.available:,}", f"{s.in_use:,}", f"{s.waiters:,}", f"{s.tokens:,}",
                      f"{s.leases:,}", f"{s.leased_units:,}")
    return table


def _as_json(info: ExecutorInfo, statuses: list[ResourceStatus]) -> dict[str, Any]:
    resources = []
    for s in statuses:
        row = dataclasses.asdict(s)
        spec = info.resources.get(s.name)
        if spec is not None:
            row.update(unit=spec.unit, enforcement=spec.enforcement.value,
                       period_s=spec.period_s if spec.kind.value == "rate" else None,
                       burst=spec.burst if spec.kind.value == "rate" else None,
                       wait_limit_s=spec.wait_limit_s)
        resources.append(row)
    return {"environment": info.environment, "resources": resources}


def _snapshot() -> tuple[ExecutorInfo, list[ResourceStatus]]:
    return ray_quota.info(), ray_quota.status()


def _console() -> Console:
    console = Console()
    if not console.is_terminal:  # piped or captured: keep the table's columns on one line
        console = Console(width=max(console.width, 160))
    return console


# ----------------------------------------------------------------------------------- commands


@click.group(name="ray-quota", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ray_quota")
def main() -> None:
    """Fair quota tokens for Ray: start, inspect, change and stop the cluster's executor."""


@main.command()
@click.option("--manifest", "-m", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The YAML manifest that declares the resources.")
@click.option("--environment", "-e", default="local", show_default=True,
              help="Which of the manifest's environments to enforce.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None, metavar="PORT",
              help="Serve Prometheus metrics on PORT (0: any free port) [default: 9464].")
@click.option("--no-metrics", is_flag=True, help="Serve no metrics endpoint.")
@click.option("--state-path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Keep the executor's state (spent budgets, tokens) in this SQLite file, on "
                   "storage every node sees [default: one file per environment in this user's "
                   "state directory, or $RAY_QUOTA_STATE_DIR; the executor is then pinned to "
                   "this node].")
@click.option("--brokers/--no-brokers", default=None,
              help="Lease through a broker on each node, so the executor's load grows with "
                   "nodes, not processes [default: on if the cluster has several nodes].")
@_address_option
@_edge
def start(manifest: Path, environment: str, metrics_port: int | None, no_metrics: bool,
          state_path: Path | None, brokers: bool | None, address: str) -> None:
    """Start the executor on a manifest.

    Harmless if it already runs that manifest. The executor is a detached actor: it keeps
    running in the cluster after this command exits. The metrics and state options apply only
    when it starts.
    """
    if no_metrics and metrics_port is not None:
        raise click.BadParameter("give --metrics-port or --no-metrics, not both",
                                 param_hint="'--no-metrics'")
    options: dict[str, Any] = {}
    if no_metrics or metrics_port is not None:
        options["metrics_port"] = None if no_metrics else metrics_port
    if state_path is not None:
        options["state_path"] = state_path
    if brokers is not None:
        options["brokers"] = brokers
    ray_quota.load_manifest(manifest).environment(environment)  # bad input: stop before Ray
    with _connected(address):
        try:
            before: ExecutorInfo | None = ray_quota.info()
        except NotInitializedError:
            before = None
        try:
            info = ray_quota.init(manifest=manifest, environment=environment, **options)
        except ManifestError as exc:
            # The manifest itself is valid (checked above): it differs from the running one.
            raise click.UsageError(
                f"{exc}. From the command line: `ray-quota apply --manifest {manifest}`, or "
                "`ray-quota stop` and start again") from exc
        verb = "already running" if before is not None else "started"
        click.echo(f"ray_quota executor {verb}: environment {info.environment!r}, "
                   f"{len(info.resources)} resources from {manifest}")
        where = ray_quota.metrics_address()
        click.echo(f"metrics: http://{where}/metrics" if where else "metrics: none served")
        click.echo(f"node brokers: {'on' if info.brokers else 'off'}")
        _console().print(_table(info, ray_quota.status()))


@main.command()
@click.option("--watch", "-w", type=click.FloatRange(min=0.1), default=None, metavar="SECONDS",
              help="Refresh every SECONDS until Ctrl-C.")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON (one document per refresh with --watch).")
@_address_option
@_edge
def status(watch: float | None, as_json: bool, address: str) -> None:
    """Show each resource's limit and use.

    Per resource: limit, available, in use, waiters, live tokens, leases and leased units.
    """
    with _connected(address):
        if as_json:
            _json_status(watch)
        else:
            _table_status(watch)


def _json_status(watch: float | None) -> None:
    try:
        while True:
            click.echo(json.dumps(_as_json(*_snapshot()), sort_keys=True))
            if watch is None:
                return
            _sleep(watch)
    except KeyboardInterrupt:
        return


def _table_status(watch: float | None) -> None:
    console = _console()
    if watch is None:
        console.print(_table(*_snapshot()))
        return
    try:
        if console.is_terminal:
            with Live(_table(*_snapshot()), console=console, auto_refresh=False) as live:
                while True:
                    _sleep(watch)
                    live.update(_table(*_snapshot()), refresh=True)
        else:  # a log or a pipe: one table after the other, each with its time
            while True:
                console.print(f"-- {time.strftime('%H:%M:%S')}")
                console.print(_table(*_snapshot()))
                _sleep(watch)
    except KeyboardInterrupt:
        return


@main.command()
@click.option("--manifest", "-m", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The changed manifest.")
@click.option("--environment", "-e", default=None,
              help="Which environment of the manifest to apply [default: the running one].")
@_address_option
@_edge
def apply(manifest: Path, environment: str | None, address: str) -> None:
    """Apply a changed manifest's limits.

    Prints one line per changed resource.
    Limits take effect for running tasks within one renewal interval; a spent budget is never
    refilled. Adding or removing resources needs a restart (stop, then start).
    """
    loaded = ray_quota.load_manifest(manifest)  # bad input: stop before Ray
    if environment is not None:
        loaded.environment(environment)
    with _connected(address):
        running = ray_quota.info().environment
        if environment is None:
            environment = running
            loaded.environment(environment)
        elif environment != running:
            raise click.BadParameter(
                f"the running executor enforces environment {running!r}, not {environment!r}; "
                "`ray-quota stop` and start again to switch environments",
                param_hint="'--environment'")
        changes = ray_quota.apply(manifest, environment)
        if not changes:
            click.echo(f"no changes: the executor already enforces {manifest}'s "
                       f"{environment!r} limits")
        for line in changes:
            click.echo(line)


@main.command("set-limit", context_settings={"ignore_unknown_options": True})
@click.argument("resource")
@click.argument("value", type=_WholeNumber())
@_address_option
@_edge
def set_limit(resource: str, value: int, address: str) -> None:
    """Change one resource's limit.

    Sets RESOURCE's limit to VALUE units (per period, for a rate resource).
    A spent budget is never refilled: raising a capacity limit adds only the difference.
    """
    with _connected(address):
        spec = ray_quota.info().resources.get(resource)
        try:
            ray_quota.set_limit(resource, value)
        except UnknownResourceError as exc:
            raise click.BadParameter(str(exc), param_hint="'RESOURCE'") from exc
        except InvalidAmountError as exc:
            raise click.BadParameter(str(exc), param_hint="'VALUE'") from exc
        old = f"{spec.value:,}" if spec is not None else "?"
        click.echo(f"{resource}: limit {old} -> {value:,}")


@main.command()
@click.argument("resource", required=False)
@click.option("--all", "all_resources", is_flag=True, help="Refill every resource.")
@_address_option
@_edge
def reset(resource: str | None, all_resources: bool, address: str) -> None:
    """Refill a resource's spent budget.

    Spent budgets survive stop and start on purpose; this is the one way to give them back.
    A capacity budget is unspent again (except units in live leases), a rate pool is full.
    Prints one line per resource refilled.
    """
    if (resource is None) == (not all_resources):
        raise click.UsageError("name one RESOURCE to reset, or pass --all (not both)")
    with _connected(address):
        try:
            lines = ray_quota.reset(resource, all_resources=all_resources)
        except UnknownResourceError as exc:
            raise click.BadParameter(str(exc), param_hint="'RESOURCE'") from exc
        for line in lines:
            click.echo(line)


@main.command()
@_address_option
@_edge
def stop(address: str) -> None:
    """Stop the executor.

    Tokens still held stop working. Its state file is kept: the next start carries on with
    what was spent (`ray-quota reset` refills).
    """
    with _connected(address):
        try:
            environment = ray_quota.info().environment
        except NotInitializedError:
            click.echo("no ray_quota executor is running; nothing to stop")
            return
        ray_quota.shutdown()
        click.echo(f"stopped the ray_quota executor (environment {environment!r})")


@main.command()
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=20.0,
              show_default=True, help="Rough seconds to run.")
@click.option("--workers", type=click.IntRange(min=1), default=3, show_default=True,
              help="Tasks per team.")
@click.option("--chart", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("out/demo_usage.png"), show_default=True,
              help="Where to write the PNG chart.")
@click.option("--address", default="local", show_default=True, metavar="ADDRESS",
              help="'local' runs on a private Ray started for the demo; else a cluster "
                   "('auto' or HOST:PORT) where no executor runs yet: the demo starts its own "
                   "and stops it at the end.")
@_edge
def demo(duration: float, workers: int, chart: Path, address: str) -> None:
    """Run the demo: three teams share an LLM limit.

    A simulated workload (no network): teams with expected use 1:2:4 share a tokens-per-minute
    limit; prints their shares and reservation latency and writes a chart.
    """
    from ray_quota import demo as demo_module

    if address != "local":
        with _connected(address):
            try:
                ray_quota.info()
            except NotInitializedError:
                pass
            else:
                raise click.BadParameter(
                    "an executor already runs on that cluster, and the demo stops the executor "
                    "when it ends; run the demo on a private Ray (--address local) or "
                    "`ray-quota stop` first", param_hint="'--address'")
    # The demo's own ray.init() reads this; 'local' keeps it off any cluster `ray start` began.
    os.environ["RAY_ADDRESS"] = address
    demo_module.main(["--duration", str(duration), "--workers", str(workers),
                      "--chart", str(chart)])


@main.command("prometheus-config")
@click.option("--target", type=_HostPort(), metavar="HOST:PORT", default=None,
              help="The executor's metrics endpoint [default: ask the running executor].")
@click.option("--job-name", default="ray_quota", show_default=True,
              help="The scrape job's name.")
@click.option("--scrape-interval", default="10s", show_default=True,
              help="How often Prometheus scrapes, as a Prometheus duration (15s, 1m).")
@_address_option
@_edge
def prometheus_config(target: str | None, job_name: str, scrape_interval: str,
                      address: str) -> None:
    """Print a Prometheus scrape job for the metrics.

    The job scrapes the executor's /metrics endpoint.
    Paste it under scrape_configs: in prometheus.yml.
    """
    from ray_quota._observability.metrics import prometheus_scrape_config

    if not re.fullmatch(r"[A-Za-z0-9_.:-]+", job_name):
        raise click.BadParameter(f"{job_name!r}: use letters, digits and _ . : -",
                                 param_hint="'--job-name'")
    if not re.fullmatch(r"([0-9]+(ms|s|m|h|d|w|y))+", scrape_interval):
        raise click.BadParameter(f"{scrape_interval!r} is not a Prometheus duration such as "
                                 "'15s' or '1m'", param_hint="'--scrape-interval'")
    if target is None:
        with _connected(address):
            target = ray_quota.metrics_address()
        if target is None:
            raise click.ClickException(
                "the running executor serves no metrics endpoint (it was started with "
                "metrics_port=None); pass --target HOST:PORT of one that does")
    click.echo(prometheus_scrape_config(target, job_name=job_name,
                                        scrape_interval=scrape_interval).rstrip("\n"))


main.add_command(dashboard)

if __name__ == "__main__":
    main()
