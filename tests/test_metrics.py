"""Metrics without Ray: the worker accumulator, its merge into the registry, label capping, gauges
read from a real scheduler, the scrape endpoint and the dashboard built from the metric names."""

from __future__ import annotations

import asyncio
import re
import threading
import urllib.request
from collections.abc import Callable, Iterator

import pytest
import yaml
from fakes import FakeClock
from prometheus_client import CollectorRegistry

from ray_quota._observability import dashboard as _dashboard
from ray_quota._observability import metrics as _metrics
from ray_quota._observability import observe as _observe
from ray_quota._errors import FailedReservation, QuotaTerminated
from ray_quota._observability.metrics import ExecutorMetrics, Metrics, Snapshot, prometheus_scrape_config
from ray_quota._observability.observe import BUCKETS, EXECUTOR, GRANTED, LOCAL, Accumulator
from ray_quota._core.scheduler import Scheduler
from ray_quota._spec import Enforcement, Kind, ResourceSpec

CLUSTER = "cluster-1"
ENV = "test"


def fresh(*, max_labels: int = _metrics.MAX_LABELS,
          snapshot: Callable[[], Snapshot | None] | None = None) -> Metrics:
    return Metrics(CollectorRegistry(), ENV, resources=["tok", "budget"], snapshot=snapshot,
                   max_labels=max_labels)


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"environment": ENV, **labels})


# ------------------------------------------------------------------------------ accumulator


def test_accumulator_counts_buckets_units_and_drains_once() -> None:
    acc = Accumulator()
    acc.reserved(CLUSTER, "tok", "a", LOCAL, GRANTED, 10, 0.000004)
    acc.reserved(CLUSTER, "tok", "a", LOCAL, GRANTED, 5, BUCKETS[3])  # on a bound: that bucket
    acc.committed(CLUSTER, "tok", "a", 10, 7)
    acc.committed(CLUSTER, "tok", "a", 5, 9)
    batch = acc.drain()
    assert batch is not None and acc.drain() is None
    latency, units = batch
    record = latency[(CLUSTER, "tok", "a", LOCAL, GRANTED)]
    assert record[0] == 1 and record[3] == 1 and sum(record[:len(BUCKETS) + 1]) == 2
    assert record[_observe.UNITS] == 15
    assert record[_observe.SUM] == pytest.approx(0.000004 + BUCKETS[3])
    assert units[(CLUSTER, "tok", "a")] == [16, 3, 4]  # committed, refunded, overused


def test_restored_batch_is_carried_by_the_next_drain() -> None:
    acc = Accumulator()
    acc.committed(CLUSTER, "tok", None, 10, 10)
    first = acc.drain()
    acc.committed(CLUSTER, "tok", None, 10, 4)
    acc.restore(first)  # the renewal that carried it failed
    batch = acc.drain()
    assert batch is not None
    assert batch[1][(CLUSTER, "tok", None)] == [14, 6, 0]


def test_accumulator_loses_nothing_under_concurrent_drains() -> None:
    acc = Accumulator()
    per_thread, threads = 20_000, 4
    drained: list[_observe.Batch] = []
    stop = threading.Event()

    def drainer() -> None:
        while not stop.is_set():
            if (batch := acc.drain()) is not None:
                drained.append(batch)

    def worker() -> None:
        for _ in range(per_thread):
            acc.committed(CLUSTER, "tok", None, 2, 1)

    drain_thread = threading.Thread(target=drainer)
    drain_thread.start()
    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    drain_thread.join()
    if (batch := acc.drain()) is not None:
        drained.append(batch)
    assert sum(b[1][(CLUSTER, "tok", None)][0] for b in drained if b[1]) == per_thread * threads


def test_counts_of_a_finished_thread_are_drained_once_and_then_forgotten() -> None:
    acc = Accumulator()
    thread = threading.Thread(target=acc.committed, args=(CLUSTER, "tok", None, 3, 3))
    thread.start()
    thread.join()
    acc.committed(CLUSTER, "tok", None, 2, 1)
    batch = acc.drain()
    assert batch is not None and batch[1][(CLUSTER, "tok", None)] == [4, 1, 0]
    assert len(acc._stores) == 1  # only this thread's records are kept
    assert acc.drain() is None


# ----------------------------------------------------------------------------------- merge


def test_merge_adds_counters_and_histogram_buckets() -> None:
    metrics = fresh()
    for _ in range(2):  # two renewals of one worker
        acc = Accumulator()
        acc.reserved(CLUSTER, "tok", "a", LOCAL, GRANTED, 10, 0.00002)
        acc.reserved(CLUSTER, "tok", "a", EXECUTOR, GRANTED, 30, 0.003)
        acc.committed(CLUSTER, "tok", "a", 10, 4)
        acc.committed(CLUSTER, "tok", "a", 30, 35)
        metrics.merge(acc.drain(), CLUSTER)
    labels = {"resource": "tok", "label": "a"}
    assert sample(metrics, _metrics.UNITS_RESERVED, **labels) == 80
    assert sample(metrics, _metrics.UNITS_COMMITTED, **labels) == 78
    assert sample(metrics, _metrics.UNITS_REFUNDED, **labels) == 12
    assert sample(metrics, _metrics.UNITS_OVERUSED, **labels) == 10
    name = _metrics.RESERVE_LATENCY
    local = {**labels, "path": LOCAL, "outcome": GRANTED}
    assert sample(metrics, f"{name}_count", **local) == 2
    assert sample(metrics, f"{name}_bucket", **local, le="1e-05") == 0
    assert sample(metrics, f"{name}_bucket", **local, le="2.5e-05") == 2
    assert sample(metrics, f"{name}_bucket", **local, le="+Inf") == 2
    remote = {**labels, "path": EXECUTOR, "outcome": GRANTED}
    assert sample(metrics, f"{name}_bucket", **remote, le="0.0025") == 0
    assert sample(metrics, f"{name}_bucket", **remote, le="0.005") == 2
    assert sample(metrics, f"{name}_sum", **remote) == pytest.approx(0.006)


def test_metrics_can_be_built_twice_and_every_counter_starts_at_zero() -> None:
    first, second = fresh(), fresh()
    first.merge(({}, {(CLUSTER, "tok", None): [5, 0, 0]}), CLUSTER)
    assert sample(first, _metrics.UNITS_COMMITTED, resource="tok", label="") == 5
    assert sample(second, _metrics.UNITS_COMMITTED, resource="tok", label="") == 0
    for name in (_metrics.REJECTIONS, _metrics.TERMINATIONS, _metrics.THROTTLED_SECONDS):
        assert sample(second, name, resource="budget", label="") == 0


def test_observations_of_another_cluster_or_resource_are_dropped() -> None:
    metrics = fresh()
    bad_record = [0.0] * (len(BUCKETS) + 3)
    bad_record[0] = -1
    metrics.merge((
        {("other-cluster", "tok", None, LOCAL, GRANTED): [1.0] * (len(BUCKETS) + 3),
         (CLUSTER, "nope", None, LOCAL, GRANTED): [1.0] * (len(BUCKETS) + 3),
         (CLUSTER, "tok", None, "teleport", GRANTED): [1.0] * (len(BUCKETS) + 3),
         (CLUSTER, "tok", None, LOCAL, GRANTED): bad_record},
        {("other-cluster", "tok", None): [5, 0, 0]}), CLUSTER)
    assert sample(metrics, _metrics.UNITS_COMMITTED, resource="tok", label="") == 0
    assert metrics.registry.get_sample_value(_metrics.OBSERVATIONS_DROPPED) == 5
    assert sample(metrics, f"{_metrics.RESERVE_LATENCY}_count", resource="tok", label="",
                  path=LOCAL, outcome=GRANTED) is None


def test_executor_side_failures_count_rejections_terminations_and_throttled_time() -> None:
    metrics = fresh()
    metrics.failed("tok", "a", _observe.REJECTED, 0.2)
    metrics.failed("tok", "a", _observe.TIMEOUT, 1.0)
    metrics.failed("budget", None, _observe.TERMINATED, 0.5)
    metrics.throttled("tok", "a", 1.0)
    metrics.throttled("tok", "a", 0.25)
    assert sample(metrics, _metrics.REJECTIONS, resource="tok", label="a") == 2
    assert sample(metrics, _metrics.TERMINATIONS, resource="budget", label="") == 1
    assert sample(metrics, _metrics.THROTTLED_SECONDS, resource="tok", label="a") == 1.25
    assert sample(metrics, f"{_metrics.RESERVE_LATENCY}_count", resource="tok", label="a",
                  path=EXECUTOR, outcome=_observe.TIMEOUT) == 1


# -------------------------------------------------------------------------------- labels


def test_labels_are_capped_per_resource_and_the_rest_count_as_other() -> None:
    metrics = fresh(max_labels=3)
    batch: _observe.Batch = ({}, {(CLUSTER, resource, f"team-{i}"): [1.0, 0.0, 0.0]
                                  for resource in ("tok", "budget") for i in range(5)})
    batch[1][(CLUSTER, "tok", None)] = [7.0, 0.0, 0.0]
    metrics.merge(batch, CLUSTER)
    for resource in ("tok", "budget"):
        for i in range(3):
            assert sample(metrics, _metrics.UNITS_COMMITTED, resource=resource,
                          label=f"team-{i}") == 1
        assert sample(metrics, _metrics.UNITS_COMMITTED, resource=resource, label="team-3") \
            is None
        assert sample(metrics, _metrics.UNITS_COMMITTED, resource=resource,
                      label=_metrics.OTHER) == 2
    assert sample(metrics, _metrics.UNITS_COMMITTED, resource="tok", label="") == 7
    assert metrics.label("tok", "team-1") == "team-1"  # admitted labels stay
    assert metrics.label("tok", "team-9") == _metrics.OTHER


def test_expected_use_gauge_folds_capped_labels_and_sums_them() -> None:
    snap = Snapshot(status=[], by_label={("tok", "a"): (1, 10), ("tok", "b"): (2, 20),
                                         ("tok", "c"): (1, 5), ("tok", None): (1, 1)})
    metrics = fresh(max_labels=1, snapshot=lambda: snap)
    assert sample(metrics, _metrics.EXPECTED_USE, resource="tok", label="a") == 10
    assert sample(metrics, _metrics.EXPECTED_USE, resource="tok", label=_metrics.OTHER) == 25
    assert sample(metrics, _metrics.EXPECTED_USE, resource="tok", label="") == 1


# --------------------------------------------------------------- the executor's side, no Ray


SPECS = {
    "tok": ResourceSpec("tok", Kind.RATE, value=100, period_s=1.0, burst=50,
                        enforcement=Enforcement.REJECT),
    "conn": ResourceSpec("conn", Kind.CONCURRENCY, value=2),
}


@pytest.fixture
def sched() -> Scheduler:
    return Scheduler(SPECS, clock=FakeClock())


def test_scheduler_reports_tokens_and_expected_use_per_label(sched: Scheduler) -> None:
    a = sched.open_token("tok", 10, claimant="me", label="team-a")
    sched.open_token("tok", 5, claimant="me", label="team-a")
    sched.open_token("conn", 1, claimant="me")
    sched.split(a.id, 0, "me", 4)
    assert sched.expected_use_by_label() == {("tok", "team-a"): (3, 15), ("conn", None): (1, 1)}
    assert sched.token_key(a.id) == ("tok", "team-a")
    sched.close_token(a.id, 0, "me")
    assert sched.token_key(a.id) is None
    assert sched.expected_use_by_label()[("tok", "team-a")] == (2, 9)


def test_executor_metrics_read_gauges_from_the_scheduler(sched: Scheduler) -> None:
    token = sched.open_token("conn", 3, claimant="me", label="x")
    sched.acquire(token.id, 0, "me", "proc-1", 2)
    em = ExecutorMetrics(lambda: sched, ENV, CLUSTER)
    metrics = em.metrics
    assert sample(metrics, _metrics.LIMIT, resource="conn", kind="concurrency") == 2
    assert sample(metrics, _metrics.IN_USE, resource="conn") == 2
    assert sample(metrics, _metrics.AVAILABLE, resource="conn") == 0
    assert sample(metrics, _metrics.LEASED_UNITS, resource="conn") == 2
    assert sample(metrics, _metrics.LEASES, resource="conn") == 1
    assert sample(metrics, _metrics.LIVE_TOKENS, resource="conn") == 1
    assert sample(metrics, _metrics.WAITERS, resource="tok") == 0
    assert sample(metrics, _metrics.EXPECTED_USE, resource="conn", label="x") == 3
    assert metrics.registry.get_sample_value(_metrics.LEASE_EXPIRIES, {"environment": ENV}) == 0


def test_executor_metrics_classify_failures_by_enforcement(sched: Scheduler) -> None:
    token = sched.open_token("tok", 3, claimant="me", label="x")
    em = ExecutorMetrics(lambda: sched, ENV, CLUSTER)
    em.acquired(token.id, FailedReservation("tok", 60, 0.1), 0.001, waited=False)
    em.acquired(token.id, QuotaTerminated("conn", 1), 0.2, waited=True)
    em.acquired(token.id, object(), 0.5, waited=True)  # a grant that waited
    metrics = em.metrics
    assert sample(metrics, _metrics.REJECTIONS, resource="tok", label="x") == 1
    assert sample(metrics, _metrics.TERMINATIONS, resource="conn", label="x") == 1
    assert sample(metrics, _metrics.THROTTLED_SECONDS, resource="tok", label="x") == 0.5
    assert sample(metrics, _metrics.THROTTLED_SECONDS, resource="conn", label="x") == 0.2
    em.renewed(("not", "a batch"))  # type: ignore[arg-type]
    assert metrics.registry.get_sample_value(_metrics.OBSERVATIONS_DROPPED) == 1


def test_a_scrape_reads_the_scheduler_on_the_actor_loop(sched: Scheduler) -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        em = ExecutorMetrics(lambda: sched, ENV, CLUSTER)
        asyncio.run_coroutine_threadsafe(_call_renewed(em), loop).result(5)
        seen: list[threading.Thread] = []
        real = sched.status

        def status() -> list:
            seen.append(threading.current_thread())
            return real()

        sched.status = status  # type: ignore[method-assign]
        assert sample(em.metrics, _metrics.LIMIT, resource="tok", kind="rate") == 100
        assert seen == [thread]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


async def _call_renewed(em: ExecutorMetrics) -> None:
    em.renewed(None)


@pytest.fixture
def served(sched: Scheduler) -> Iterator[ExecutorMetrics]:
    em = ExecutorMetrics(lambda: sched, ENV, CLUSTER, port=0, calls=lambda: {"open_token": 1})
    yield em
    em.close()


def test_endpoint_serves_every_family_on_the_bound_port(served: ExecutorMetrics,
                                                       sched: Scheduler) -> None:
    sched.open_token("tok", 1, claimant="me")
    served.metrics.failed("tok", None, _observe.REJECTED, 0.1)
    assert served.address is not None
    port = served.address.rpartition(":")[2]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    names = set(re.findall(r"^(ray_quota_\w+)[{ ]", text, re.MULTILINE))
    assert _metrics.SERIES <= names
    assert 'ray_quota_executor_calls_total{environment="test",method="open_token"} 1.0' in text


def test_scrape_config_is_a_yaml_job_for_the_address() -> None:
    text = prometheus_scrape_config("10.0.0.5:9464", scrape_interval="5s")
    (job,) = yaml.safe_load(text)
    assert job == {"job_name": "ray_quota", "scrape_interval": "5s",
                   "static_configs": [{"targets": ["10.0.0.5:9464"]}]}
    with pytest.raises(ValueError, match="host:port"):
        prometheus_scrape_config("10.0.0.5")


# ------------------------------------------------------------------------------- dashboard


def test_committed_dashboard_is_generated_from_the_panel_definitions() -> None:
    assert _dashboard.PATH.read_text() == _dashboard.render(), (
        "dashboards/ray_quota.json is stale: run `python -m ray_quota._observability.dashboard`")


def test_every_dashboard_query_names_only_declared_metrics() -> None:
    used = set()
    for expr in _dashboard.queries():
        names = set(re.findall(r"\bray_quota_\w+", expr))
        assert names and names <= _metrics.SERIES, expr
        used |= names
    # Every metric is on some panel, but the troubleshooting counter of dropped observations.
    assert _metrics.SERIES - used == {f"{_metrics.RESERVE_LATENCY}_sum",
                                      _metrics.OBSERVATIONS_DROPPED}


def test_dashboard_has_datasource_environment_and_resource_variables() -> None:
    model = _dashboard.dashboard()
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("environment", "resource"):
        assert variables[name]["query"]["query"].startswith(f"label_values({_metrics.LIMIT}")
    assert "__inputs" not in model
    titles = [p["title"] for p in model["panels"] if p["type"] == "row"]
    assert titles == ["Overview", "Latency", "Enforcement", "Fairness", "Leases"]
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))
