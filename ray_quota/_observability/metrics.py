"""Every ray_quota metric, declared once, on a registry the caller gives.

The executor owns one :class:`Metrics` and serves it on one HTTP endpoint for the whole cluster.
Worker processes never touch prometheus_client: they count in :mod:`ray_quota._observability.observe` and their
counts reach :meth:`Metrics.merge` with each lease renewal. Gauges of the scheduler's state are read
at scrape time.

Example:
    >>> from prometheus_client import CollectorRegistry
    >>> metrics = Metrics(CollectorRegistry(), "local", resources=["llm-tokens"])
    >>> metrics.failed("llm-tokens", "team-a", REJECTED, seconds=0.1)
    >>> prometheus_scrape_config("10.0.0.5:9464").splitlines()[1]
    '- job_name: "ray_quota"'
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ray_quota._errors import FailedReservation, QuotaTerminated
from ray_quota._observability.observe import (
    BUCKETS,
    EXECUTOR,
    OUTCOMES,
    PATHS,
    REJECTED,
    SUM,
    TERMINATED,
    TIMEOUT,
    UNITS,
    Batch,
    clean,
)
from ray_quota._spec import Enforcement

if TYPE_CHECKING:
    from ray_quota._core.scheduler import ResourceStatus
    from ray_quota._spec import ResourceSpec

# The names PromQL sees (counters with their ``_total``). The dashboard is built from these.
RESERVE_LATENCY = "ray_quota_reserve_latency_seconds"  # histogram: _bucket, _sum, _count
UNITS_RESERVED = "ray_quota_units_reserved_total"
UNITS_COMMITTED = "ray_quota_units_committed_total"
UNITS_REFUNDED = "ray_quota_units_refunded_total"
UNITS_OVERUSED = "ray_quota_units_overused_total"
REJECTIONS = "ray_quota_rejections_total"
TERMINATIONS = "ray_quota_terminations_total"
THROTTLED_SECONDS = "ray_quota_throttled_seconds_total"
WAITERS = "ray_quota_waiters"
AVAILABLE = "ray_quota_available"
LIMIT = "ray_quota_limit"
EFFECTIVE_LIMIT = "ray_quota_effective_limit"  # gauge: the limit after provider feedback
IN_USE = "ray_quota_in_use"
LEASED_UNITS = "ray_quota_leased_units"
LEASES = "ray_quota_leases"
LIVE_TOKENS = "ray_quota_live_tokens"
EXPECTED_USE = "ray_quota_expected_use"
LEASE_EXPIRIES = "ray_quota_lease_expiries_total"
OBSERVATIONS_DROPPED = "ray_quota_observations_dropped_total"
EXECUTOR_CALLS = "ray_quota_executor_calls_total"

# Every series name a scrape may show, for checks that a query names a real metric.
SERIES = frozenset({
    f"{RESERVE_LATENCY}_bucket", f"{RESERVE_LATENCY}_sum", f"{RESERVE_LATENCY}_count",
    UNITS_RESERVED, UNITS_COMMITTED, UNITS_REFUNDED, UNITS_OVERUSED, REJECTIONS, TERMINATIONS,
    THROTTLED_SECONDS, WAITERS, AVAILABLE, LIMIT, EFFECTIVE_LIMIT, IN_USE, LEASED_UNITS, LEASES,
    LIVE_TOKENS, EXPECTED_USE, LEASE_EXPIRIES, OBSERVATIONS_DROPPED, EXECUTOR_CALLS,
})

MAX_LABELS = 50  # distinct token labels per resource; more are counted as OTHER
OTHER = "other"
_SNAPSHOT_TIMEOUT_S = 5.0

_LABELS = ("resource", "environment", "label")


def _family(name: str) -> str:
    """prometheus_client wants a counter's name without the ``_total`` it adds."""
    return name.removesuffix("_total")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The scheduler's state that gauges show, read once per scrape."""

    status: list[ResourceStatus]
    # (resource, label) -> (live tokens, their expected use)
    by_label: Mapping[tuple[str, str | None], tuple[int, int]] = field(default_factory=dict)
    lease_expiries: int = 0
    calls: Mapping[str, int] = field(default_factory=dict)  # executor calls served, by method


class Metrics:
    """The metrics of one environment's executor, on ``registry``.

    Args:
        registry: where the metrics are registered; tests pass a fresh one each time.
        environment: the value of every series' ``environment`` label.
        resources: the environment's resources; observations of others are dropped.
        snapshot: called at each scrape for the gauges; None shows no gauges.
        max_labels: distinct token labels kept per resource before folding into ``"other"``.
    """

    def __init__(self, registry: CollectorRegistry, environment: str, *,
                 resources: Iterable[str], snapshot: Callable[[], Snapshot | None] | None = None,
                 max_labels: int = MAX_LABELS) -> None:
        self.registry = registry
        self.environment = environment
        self._resources = frozenset(resources)
        self._snapshot = snapshot
        self._max_labels = max_labels
        self._labels: dict[str, set[str]] = {}
        self._lock = threading.Lock()  # merges run on the actor's loop, scrapes on a thread

        def counter(name: str, doc: str) -> Counter:
            return Counter(_family(name), doc, _LABELS, registry=registry)

        self.units_reserved = counter(UNITS_RESERVED, "Units granted to reservations.")
        self.units_committed = counter(UNITS_COMMITTED, "Units reservations committed as used.")
        self.units_refunded = counter(
            UNITS_REFUNDED, "Units reserved but committed as unused, given back.")
        self.units_overused = counter(
            UNITS_OVERUSED, "Units committed beyond what was reserved, charged as debt.")
        self.rejections = counter(
            REJECTIONS, "Reservations refused: a reject resource could not grant in time, or a "
            "wait limit or timeout ran out.")
        self.terminations = counter(
            TERMINATIONS, "Reservations that ended their task or actor (terminate resources).")
        self.throttled_seconds = counter(
            THROTTLED_SECONDS, "Seconds reservations spent waiting in the executor's queue.")
        self.dropped = Counter(
            _family(OBSERVATIONS_DROPPED), "Worker observations ignored: another executor's "
            "tokens, an unknown resource, path or outcome.", registry=registry)
        self._latency = _Latency(environment)
        registry.register(self._latency)
        registry.register(_StateCollector(self))
        for resource in sorted(self._resources):  # every series exists from the start, at 0
            for family in (self.units_reserved, self.units_committed, self.units_refunded,
                           self.units_overused, self.rejections, self.terminations,
                           self.throttled_seconds):
                family.labels(resource, environment, "")

    def label(self, resource: str, label: str | None) -> str:
        """The label value to export: ``""`` for none, ``"other"`` beyond the cap."""
        if not label:
            return ""
        label = str(label)
        with self._lock:
            seen = self._labels.setdefault(resource, set())
            if label in seen:
                return label
            if len(seen) < self._max_labels:
                seen.add(label)
                return label
        return OTHER

    def merge(self, batch: Batch | None, cluster: str) -> None:
        """Add a worker's drained observations; those of another cluster's tokens are dropped."""
        batch, dropped = clean(batch)  # malformed entries are counted as dropped, never added
        if not batch:
            if dropped:
                self.dropped.inc(dropped)
            return
        latency, units = batch
        env = self.environment
        for (where, resource, label, path, outcome), record in latency.items():
            if (where != cluster or resource not in self._resources or path not in PATHS
                    or outcome not in OUTCOMES or len(record) != len(BUCKETS) + 3
                    or min(record) < 0):
                dropped += 1
                continue
            value = self.label(resource, label)
            self._latency.add(resource, value, path, outcome, record)
            if record[UNITS]:
                self.units_reserved.labels(resource, env, value).inc(record[UNITS])
        for (where, resource, label), (used, refunded, overused) in units.items():
            if where != cluster or resource not in self._resources or min(used, refunded,
                                                                          overused) < 0:
                dropped += 1
                continue
            value = self.label(resource, label)
            if used:
                self.units_committed.labels(resource, env, value).inc(used)
            if refunded:
                self.units_refunded.labels(resource, env, value).inc(refunded)
            if overused:
                self.units_overused.labels(resource, env, value).inc(overused)
        if dropped:
            self.dropped.inc(dropped)

    def failed(self, resource: str, label: str | None, outcome: str, seconds: float) -> None:
        """A reservation via the executor failed after ``seconds`` there (timed by the executor,
        since the failure may end the process that asked)."""
        if resource not in self._resources:
            return
        value = self.label(resource, label)
        self._latency.observe(resource, value, EXECUTOR, outcome, seconds)
        family = self.terminations if outcome == TERMINATED else self.rejections
        family.labels(resource, self.environment, value).inc()

    def throttled(self, resource: str, label: str | None, seconds: float) -> None:
        """A reservation waited ``seconds`` in the executor's queue."""
        if resource in self._resources and seconds > 0:
            self.throttled_seconds.labels(resource, self.environment,
                                          self.label(resource, label)).inc(seconds)

    def _state(self) -> Iterator[Metric]:
        snap = self._snapshot() if self._snapshot is not None else None
        if snap is None:
            return
        env = self.environment
        per_resource = (
            (WAITERS, "Reservations waiting in the executor's queue.", "waiters"),
            (AVAILABLE, "Units that could be granted now.", "available"),
            (IN_USE, "Units granted and not yet back (rate: taken from the bucket).", "in_use"),
            (LEASED_UNITS, "Units held in processes' leases.", "leased_units"),
            (LEASES, "Leases held by processes.", "leases"),
            (LIVE_TOKENS, "Tokens open.", "tokens"),
        )
        for name, doc, attr in per_resource:
            gauge = GaugeMetricFamily(name, doc, labels=("resource", "environment"))
            for status in snap.status:
                gauge.add_metric((status.name, env), float(getattr(status, attr)))
            yield gauge
        # The limit carries the resource's kind, so rules can single out capacity budgets.
        limit = GaugeMetricFamily(LIMIT, "The resource's limit value (per period for rate "
                                  "resources).", labels=("resource", "environment", "kind"))
        for status in snap.status:
            limit.add_metric((status.name, env, status.kind), float(status.limit))
        yield limit
        gauge = GaugeMetricFamily(EFFECTIVE_LIMIT, "The limit the executor grants against: for "
                                  "a rate resource the manifest's, lowered by the provider's "
                                  "refusals and probed back up (DESIGN 8); else the limit.",
                                  labels=("resource", "environment"))
        for status in snap.status:
            effective = status.limit if status.effective_limit is None else status.effective_limit
            gauge.add_metric((status.name, env), float(effective))
        yield gauge
        expected: dict[tuple[str, str], float] = {}
        for (resource, label), (_, units) in snap.by_label.items():
            key = (resource, self.label(resource, label))
            expected[key] = expected.get(key, 0.0) + units
        gauge = GaugeMetricFamily(EXPECTED_USE, "Expected use of the open tokens, by label: "
                                  "each label's fair share of a contended resource.",
                                  labels=_LABELS)
        for (resource, value), total in sorted(expected.items()):
            gauge.add_metric((resource, env, value), total)
        yield gauge
        expiries = CounterMetricFamily(_family(LEASE_EXPIRIES), "Leases that expired because "
                                       "their process stopped renewing.", labels=("environment",))
        expiries.add_metric((env,), float(snap.lease_expiries))
        yield expiries
        calls = CounterMetricFamily(_family(EXECUTOR_CALLS), "Token and lease calls the executor "
                                    "served, by method: with node brokers, renewals and watches "
                                    "grow with nodes, not processes.",
                                    labels=("environment", "method"))
        for method, count in sorted(snap.calls.items()):
            calls.add_metric((env, method), float(count))
        yield calls


class _Latency:
    """The reservation latency histogram, fed with whole bucket counts merged from workers."""

    def __init__(self, environment: str) -> None:
        self._environment = environment
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str, str, str], list[float]] = {}

    def add(self, resource: str, label: str, path: str, outcome: str,
            record: list[float]) -> None:
        with self._lock:
            mine = self._records.setdefault((resource, label, path, outcome),
                                            [0.0] * (len(BUCKETS) + 2))
            for i in range(len(BUCKETS) + 2):  # the buckets, +Inf, and the sum
                mine[i] += record[i]

    def observe(self, resource: str, label: str, path: str, outcome: str,
                seconds: float) -> None:
        record = [0.0] * (len(BUCKETS) + 3)
        record[bisect_left(BUCKETS, seconds)] = 1
        record[SUM] = seconds
        self.add(resource, label, path, outcome, record)

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(RESERVE_LATENCY, "", labels=())]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            RESERVE_LATENCY, "Seconds a reservation took, from the caller's view for grants "
            "(outcome granted) and from the executor's for failures.",
            labels=("resource", "environment", "label", "outcome", "path"))
        bounds = [repr(b) for b in BUCKETS] + ["+Inf"]
        with self._lock:
            records = sorted((key, list(record)) for key, record in self._records.items())
        for (resource, label, path, outcome), record in records:
            total, buckets = 0.0, []
            for bound, count in zip(bounds, record):
                total += count
                buckets.append((bound, total))
            family.add_metric((resource, self._environment, label, outcome, path), buckets,
                              sum_value=record[-1])
        yield family


class _StateCollector:
    """Gauges read from the scheduler at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        names = (WAITERS, AVAILABLE, LIMIT, EFFECTIVE_LIMIT, IN_USE, LEASED_UNITS, LEASES,
                 LIVE_TOKENS, EXPECTED_USE)
        return [GaugeMetricFamily(name, "") for name in names] + [
            CounterMetricFamily(_family(LEASE_EXPIRIES), ""),
            CounterMetricFamily(_family(EXECUTOR_CALLS), "")]

    def collect(self) -> Iterator[Metric]:
        return self._metrics._state()


# ------------------------------------------------------------------------------ the executor


class SchedulerView(Protocol):
    """What the executor's metrics read from its scheduler."""

    lease_expiries: int

    def status(self) -> list[ResourceStatus]: ...
    def specs(self) -> dict[str, ResourceSpec]: ...
    def token_key(self, token_id: str) -> tuple[str, str | None] | None: ...
    def expected_use_by_label(self) -> dict[tuple[str, str | None], tuple[int, int]]: ...


class ExecutorMetrics:
    """The executor's side: its :class:`Metrics`, fed from its calls and its scheduler, and the
    endpoint that serves them.

    Every method but the scrape runs on the actor's event loop; a scrape hops onto that loop to
    read the scheduler, which is not thread-safe.

    Args:
        scheduler: returns the executor's current scheduler.
        environment: the environment the executor enforces.
        cluster_id: the executor's identity; observations on other executors' tokens are dropped.
        port: serve ``/metrics`` on this port (0: any free port); None serves nothing.
    """

    def __init__(self, scheduler: Callable[[], SchedulerView], environment: str,
                 cluster_id: str, port: int | None = None,
                 registry: CollectorRegistry | None = None,
                 calls: Callable[[], Mapping[str, int]] = dict) -> None:
        self._scheduler = scheduler
        self._calls = calls  # the executor's calls served so far, by method
        self._cluster_id = cluster_id
        self._loop: asyncio.AbstractEventLoop | None = None
        self.metrics = Metrics(registry or CollectorRegistry(), environment,
                               resources=scheduler().specs(), snapshot=self._snapshot)
        self.address: str | None = None
        self._server: Any = None
        if port is not None:
            try:
                self._server, self.address = serve(self.metrics.registry, port)
            except OSError as exc:  # the quota must work even where its metrics cannot
                print(f"ray_quota: cannot serve metrics on port {port}: {exc}", file=sys.stderr,
                      flush=True)

    def renewed(self, batch: Batch | None) -> None:
        """Merge a worker's observations, sent with its lease renewal. Never raises: a malformed
        batch is counted as dropped, and the renewal goes on."""
        self._remember_loop()
        try:
            self.metrics.merge(batch, self._cluster_id)
        except Exception:  # noqa: BLE001 - metrics must never fail a renewal
            self.metrics.dropped.inc()

    def acquired(self, token_id: str, outcome: object, seconds: float, waited: bool) -> None:
        """An acquire ended with ``outcome`` after ``seconds`` at the executor; ``waited`` says
        whether it queued (and for that long was throttled)."""
        self._remember_loop()
        try:
            sched = self._scheduler()
            key = sched.token_key(token_id)
            if isinstance(outcome, (FailedReservation, QuotaTerminated)):
                resource, label = outcome.resource, key[1] if key else None
                if isinstance(outcome, QuotaTerminated):
                    result = TERMINATED
                else:
                    spec = sched.specs().get(resource)
                    reject = spec is None or spec.enforcement is Enforcement.REJECT
                    result = REJECTED if reject else TIMEOUT
                self.metrics.failed(resource, label, result, seconds)
            elif key is not None:
                resource, label = key
            else:
                return
            if waited:
                self.metrics.throttled(resource, label, seconds)
        except Exception:  # noqa: BLE001 - metrics must never fail a reservation
            self.metrics.dropped.inc()

    def close(self) -> None:
        """Stop serving (the actor's process ending does it too)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _remember_loop(self) -> None:
        if self._loop is None:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                pass

    def _read(self) -> Snapshot:
        sched = self._scheduler()
        return Snapshot(sched.status(), sched.expected_use_by_label(), sched.lease_expiries,
                        dict(self._calls()))

    async def _read_async(self) -> Snapshot:
        return self._read()

    def _snapshot(self) -> Snapshot | None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return self._read()  # no call has come in yet: nothing else touches the scheduler
        try:
            if asyncio.get_running_loop() is loop:
                return self._read()
        except RuntimeError:
            pass
        future = asyncio.run_coroutine_threadsafe(self._read_async(), loop)
        try:
            return future.result(timeout=_SNAPSHOT_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a busy or stopping loop: this scrape shows no gauges
            future.cancel()
            return None


def serve(registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> tuple[Any, str]:
    """Serve ``registry`` at ``http://<host>:<port>/metrics``; returns the server and the
    address to scrape (this node's IP and the port actually bound)."""
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server, f"{_node_ip()}:{server.server_port}"


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return str(ray.util.get_node_ip_address())
    except Exception:  # noqa: BLE001 - any address that reaches this host will do
        pass
    return "127.0.0.1"


def prometheus_scrape_config(address: str, *, job_name: str = "ray_quota",
                             scrape_interval: str = "10s") -> str:
    """A Prometheus scrape job (YAML) for the executor's endpoint at ``address`` (host:port).

    Paste it under ``scrape_configs:`` of ``prometheus.yml``.

    Raises:
        ValueError: ``address`` is not ``host:port``.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected host:port, not {address!r}")
    return (f"# ray_quota: the executor's metrics endpoint; goes under scrape_configs:\n"
            f"- job_name: {json.dumps(job_name)}\n"
            f"  scrape_interval: {json.dumps(scrape_interval)}\n"
            f"  static_configs:\n"
            f"  - targets: [{json.dumps(address)}]\n")
