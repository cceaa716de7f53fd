"""End to end: a real Prometheus scrapes the executor while worker processes reserve and commit,
then every query of every dashboard panel must return data, and the totals must match what the
workers recorded themselves.

Needs the ``prometheus`` server binary (Debian package ``prometheus``); without it the test tries
to install it and fails, never skips.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

import ray_quota
from ray_quota import FailedReservation, QuotaTerminated, QuotaToken
from ray_quota._runtime import renewer
from ray_quota._observability import dashboard as _dashboard
from ray_quota._observability.metrics import (
    LIMIT,
    REJECTIONS,
    TERMINATIONS,
    UNITS_COMMITTED,
    UNITS_RESERVED,
    prometheus_scrape_config,
)

SCRAPE_S = 1.0
RATE_INTERVAL = "30s"  # what Grafana's $__rate_interval stands for here
WORKLOAD_S = 3.0

Record = dict[str, Counter[str]]  # reserved / committed / rejections -> resource -> total


# ---------------------------------------------------------------------------- Prometheus


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None)
    if found:
        return found
    errors = []
    for command in (["apt-get", "install", "-y", "-qq", "prometheus"],
                    ["sh", "-c", "apt-get update -qq && apt-get install -y -qq prometheus"]):
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False,
                                  env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{' '.join(command)}: {exc}")
            continue
        if done.returncode == 0 and (found := shutil.which("prometheus")):
            return found
        errors.append(f"{' '.join(command)}: exit {done.returncode}: {done.stderr[-500:]}")
    pytest.fail("this test needs the Prometheus server (`apt-get install prometheus`, as root); "
                "installing it failed:\n" + "\n".join(errors))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Prometheus:
    """A Prometheus server of our own, and its HTTP API."""

    def __init__(self, binary: str, target: str, workdir: Path) -> None:
        config = workdir / "prometheus.yml"
        config.write_text(f"global:\n  scrape_interval: {SCRAPE_S:g}s\n"
                          f"  evaluation_interval: {SCRAPE_S:g}s\nscrape_configs:\n"
                          + prometheus_scrape_config(target, scrape_interval=f"{SCRAPE_S:g}s"))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = workdir / "prometheus.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address={self.url.removeprefix('http://')}",
                 "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        pytest.fail(f"prometheus not ready after {timeout_s}s: {self.log.read_text()[-2000:]}")

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                body = json.load(answer)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{path} {params}: {exc.read().decode()}") from exc
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.get("query", query=expr)["result"]

    def by_resource(self, expr: str) -> dict[str, float]:
        return {s["metric"].get("resource", ""): float(s["value"][1]) for s in self.query(expr)}

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def prometheus(executor: ray_quota.ExecutorInfo, tmp_path: Path) -> Iterator[Prometheus]:
    binary = prometheus_binary()
    assert executor.metrics_address, "the executor serves no metrics endpoint"
    server = Prometheus(binary, executor.metrics_address, tmp_path)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


# ------------------------------------------------------------------------------ workload


@ray.remote(num_cpus=0)
class Worker:
    """Reserves and commits on several resources and records, by itself, what it did."""

    def __init__(self, renew_only_at_exit: bool) -> None:
        if renew_only_at_exit:  # everything it observes must then travel in the exit flush
            renewer.RENEW_INTERVAL_S = 3600.0

    def ready(self) -> bool:
        return True

    def run(self, tokens: dict[str, QuotaToken], start_at: float, duration_s: float,
            seed: int) -> Record:
        rng = random.Random(seed)
        record: Record = {"reserved": Counter(), "committed": Counter(), "rejections": Counter()}

        def attempt(resource: str, amount: int, used: int) -> None:
            try:
                with tokens[resource].reserve(amount) as reservation:
                    reservation.commit(used)
            except FailedReservation:
                record["rejections"][resource] += 1
                return
            record["reserved"][resource] += amount
            record["committed"][resource] += used

        while time.time() < start_at:
            time.sleep(0.005)
        stop = time.monotonic() + duration_s
        while time.monotonic() < stop:
            for _ in range(20):  # the local path
                attempt("fast", 10, rng.randint(0, 12))
            attempt("tok", 20, rng.randint(10, 20))  # contended: throttled in the queue
            attempt("tok-reject", 30, 30)  # more than 100/s between workers: rejections
            if rng.random() < 0.3:
                attempt("budget", 50, rng.randint(0, 60))
        return record

    def finish(self) -> None:
        ray.actor.exit_actor()  # a normal end: atexit flushes what was not sent yet


def driver_termination(record: Record) -> int:
    """One reservation on a terminate resource that cannot be granted in time."""
    holder = QuotaToken("doomed", expected_use=1)
    other = QuotaToken("doomed", expected_use=1)
    held = holder.reserve(1)
    record["reserved"]["doomed"] += 1
    with pytest.raises(QuotaTerminated):
        other.reserve(1)
    held.commit(1)
    record["committed"]["doomed"] += 1
    holder.close()
    other.close()
    return 1


def run_workload() -> tuple[Record, int, list[QuotaToken]]:
    """Three workers (one sends its observations only when it exits); returns their records,
    the terminations, and the parent tokens kept open for the fairness gauges."""
    weights = {"team-a": 1, "team-b": 2, "team-c": 4}
    parents = [QuotaToken("tok", expected_use=100 * w, label=team) for team, w in weights.items()]
    workers = [Worker.remote(renew_only_at_exit=(i == 2)) for i in range(3)]
    ray.get([w.ready.remote() for w in workers], timeout=120)
    start_at = time.time() + 0.5
    refs = []
    for i, (worker, parent) in enumerate(zip(workers, parents)):
        tokens = {"tok": parent.split(50),
                  "fast": QuotaToken("fast", expected_use=10, label=parent.label),
                  "tok-reject": QuotaToken("tok-reject", expected_use=10, label=parent.label),
                  "budget": QuotaToken("budget", expected_use=50)}
        refs.append(worker.run.remote(tokens, start_at, WORKLOAD_S, i))
    records = ray.get(refs, timeout=120)
    total: Record = {"reserved": Counter(), "committed": Counter(), "rejections": Counter()}
    for record in records:
        for kind in total:
            total[kind].update(record[kind])
    terminations = driver_termination(total)
    for worker in workers:
        worker.finish.remote()
    return total, terminations, parents


def wait_for_totals(prom: Prometheus, expected: Record, terminations: int,
                    timeout_s: float = 25.0) -> None:
    env = 'environment="test"'
    queries = {"reserved": f"sum by (resource) ({UNITS_RESERVED}{{{env}}})",
               "committed": f"sum by (resource) ({UNITS_COMMITTED}{{{env}}})",
               "rejections": f"sum by (resource) ({REJECTIONS}{{{env}}})"}
    deadline = time.monotonic() + timeout_s
    while True:
        seen = {kind: {r: v for r, v in prom.by_resource(q).items() if v}
                for kind, q in queries.items()}
        seen_terminations = sum(prom.by_resource(f"{TERMINATIONS}{{{env}}}").values())
        want = {kind: {r: float(v) for r, v in expected[kind].items() if v} for kind in queries}
        if seen == want and seen_terminations == terminations:
            return
        if time.monotonic() > deadline:
            targets = [(t["scrapeUrl"], t["health"], t["lastError"])
                       for t in prom.get("targets")["activeTargets"]]
            raise AssertionError(f"Prometheus totals never matched the workers' records:\n"
                                 f"seen     {seen} terminations={seen_terminations}\n"
                                 f"recorded {want} terminations={terminations}\n"
                                 f"targets  {targets}; executor now serves at "
                                 f"{ray_quota.metrics_address()}")
        time.sleep(SCRAPE_S / 2)


# ---------------------------------------------------------------------------------- test


def grafana_values(prom: Prometheus, variable: dict[str, Any],
                   substitutions: dict[str, str]) -> list[str]:
    """Evaluate a ``label_values(selector, label)`` variable as Grafana would."""
    query = variable["query"]["query"]
    for name, value in substitutions.items():
        query = query.replace(f"${name}", value)
    match = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
    assert match, query
    return sorted(prom.get(f"label/{match[2]}/values", **{"match[]": match[1]}))


def regex_of(values: list[str]) -> str:
    """A multi-value variable as Grafana formats it for a Prometheus regex matcher: special
    characters escaped with a backslash, itself escaped inside the PromQL string."""
    return "(" + "|".join(re.sub(r"([\\^$*+?.()|\[\]{}])", r"\\\\\1", v)
                          for v in values) + ")"


def test_every_dashboard_query_returns_data_and_totals_match_the_workload(
        prometheus: Prometheus) -> None:
    expected, terminations, parents = run_workload()
    wait_for_totals(prometheus, expected, terminations)
    time.sleep(2 * SCRAPE_S)  # series that appeared last need two samples for rate()

    variables = {v["name"]: v for v in _dashboard.dashboard()["templating"]["list"]}
    environments = grafana_values(prometheus, variables["environment"], {})
    assert environments == ["test"]
    substitutions = {"environment": regex_of(environments)}
    resources = grafana_values(prometheus, variables["resource"], substitutions)
    assert resources == sorted(ray_quota.info().resources)
    substitutions["resource"] = regex_of(resources)

    empty = []
    for expr in _dashboard.queries():
        query = expr.replace("$__rate_interval", RATE_INTERVAL)
        for name, value in substitutions.items():
            query = query.replace(f"${name}", value)
        assert "$" not in query, query
        values = [float(s["value"][1]) for s in prometheus.query(query)]
        if not any(math.isfinite(v) for v in values):
            empty.append(f"{query} -> {values}")
    assert not empty, "queries without data:\n" + "\n".join(empty)

    limits = prometheus.by_resource(f'{LIMIT}{{environment="test"}}')
    assert limits["tok"] == 1000 and limits["budget"] == 10_000
    for parent in parents:
        parent.close()
