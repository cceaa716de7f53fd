"""The executor's metrics through Ray's own pipeline, so a Prometheus that scrapes the Ray
cluster has them with no scrape job of ours.

Ray exports every ``ray.util.metrics`` series of a worker through its node's metrics agent, under
the name given with ``ray_`` in front (and ``_total`` after a counter's). So each of our families
(``ray_quota_units_reserved``, ...) is given to Ray without its ``ray_`` and comes out under
today's name, with Ray's own labels (``NodeAddress``, ``SessionName``, ``WorkerId``, ...) beside
ours.

Nothing is declared twice: a thread reads the same prometheus_client registry the executor's
``/metrics`` endpoint serves, as a scrape would, and mirrors each sample into Ray's metric of the
same family: counters by their increase, gauges by value (a series that disappeared is set to 0),
histograms by one observation per new count, at the middle of its bucket (Ray's agent keeps only
bucket counts too, and rebuilds the sum from middles: a histogram's ``_sum`` is an estimate
there).

Example:
    >>> export = RayExport(metrics.registry)      # the executor's registry
    >>> export.start()                            # mirrors every EXPORT_INTERVAL_S from now on
"""

from __future__ import annotations

import math
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from ray_quota._errors import QuotaError

# What Ray's metrics agent puts in front of every name a worker gives it.
RAY_PREFIX = "ray_"
EXPORT_INTERVAL_S = 5.0  # Ray's agent reports every 10 s; twice that often loses nothing
_AGENT_CHECK_TIMEOUT_S = 1.0

Key = tuple[str, tuple[tuple[str, str], ...]]  # (family, sorted labels)


def ray_name(family: str) -> str:
    """The name to give Ray for ``family`` so that it exports it under ``family``.

    Raises:
        ValueError: ``family`` does not start with Ray's prefix, so no name comes out as it.
    """
    if not family.startswith(RAY_PREFIX):
        raise ValueError(f"{family!r} cannot come out of Ray's pipeline unchanged: Ray puts "
                         f"{RAY_PREFIX!r} in front of every name")
    return family.removeprefix(RAY_PREFIX)


def metrics_agent_running() -> bool:
    """Whether this node's Ray metrics agent takes metrics (its export port answers)."""
    import ray

    if not ray.is_initialized():
        return False
    here = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == here:
            port = int(node.get("MetricsExportPort") or 0)
            address = str(node.get("NodeManagerAddress") or "127.0.0.1")
            if port <= 0:
                return False
            try:
                with socket.create_connection((address, port), _AGENT_CHECK_TIMEOUT_S):
                    return True
            except OSError:
                return False
    return False


class Mirror:
    """Copies samples of prometheus_client families into ``ray.util.metrics`` (or the fakes a
    test gives): what each Ray metric was told last, so that it is told only what changed.

    Args:
        factory: makes a Ray metric: ``factory(kind, name, doc, tag_keys, boundaries)`` with
            ``kind`` one of ``"counter"``, ``"gauge"``, ``"histogram"``; None uses Ray's.
    """

    __slots__ = ("_buckets", "_counted", "_factory", "_gauged", "_metrics")

    def __init__(self, factory: Callable[..., Any] | None = None) -> None:
        self._factory = factory or _ray_metric
        self._metrics: dict[str, Any] = {}
        self._counted: dict[Key, float] = {}  # counters: the value mirrored so far
        self._gauged: dict[str, set[Key]] = {}  # gauges: the series set last time, by family
        self._buckets: dict[Key, list[float]] = {}  # histograms: cumulative counts so far

    def copy(self, families: Iterable[Metric]) -> None:
        """Tell Ray what changed in ``families`` since the last copy."""
        for family in families:
            if family.type == "counter":
                self._counter(family)
            elif family.type == "gauge":
                self._gauge(family)
            elif family.type == "histogram":
                self._histogram(family)

    def _metric(self, kind: str, family: Metric, tag_keys: tuple[str, ...],
                boundaries: list[float] | None = None) -> Any:
        metric = self._metrics.get(family.name)
        if metric is None:
            metric = self._metrics[family.name] = self._factory(
                kind, ray_name(family.name), family.documentation, tag_keys, boundaries)
        return metric

    def _counter(self, family: Metric) -> None:
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue  # _created: the time a series began, which Ray keeps itself
            key = (family.name, tuple(sorted(sample.labels.items())))
            before = self._counted.get(key, 0.0)
            self._counted[key] = sample.value
            if sample.value > before:
                metric = self._metric("counter", family, tuple(sorted(sample.labels)))
                metric.inc(sample.value - before, tags=dict(sample.labels))

    def _gauge(self, family: Metric) -> None:
        now: set[Key] = set()
        for sample in family.samples:
            key = (family.name, tuple(sorted(sample.labels.items())))
            now.add(key)
            metric = self._metric("gauge", family, tuple(sorted(sample.labels)))
            metric.set(sample.value, tags=dict(sample.labels))
        for gone in self._gauged.get(family.name, set()) - now:
            # Ray keeps a gauge's last value: a series no longer shown (a label whose tokens
            # all closed) reads 0 from now on, not what it was then.
            self._metrics[family.name].set(0.0, tags=dict(gone[1]))
        self._gauged[family.name] = now

    def _histogram(self, family: Metric) -> None:
        by_series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                series = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
                by_series.setdefault(series, []).append(
                    (float(sample.labels["le"]), sample.value))
        for labels, buckets in by_series.items():
            buckets.sort()
            bounds = [bound for bound, _ in buckets if not math.isinf(bound)]
            key = (family.name, labels)
            before = self._buckets.get(key, [0.0] * len(buckets))
            counts = [count for _, count in buckets]
            self._buckets[key] = counts
            metric = self._metric("histogram", family, tuple(name for name, _ in labels),
                                  bounds)
            for i in range(len(counts)):  # cumulative counts: this bucket's is the difference
                new = round((counts[i] - before[i]) - ((counts[i - 1] - before[i - 1]) if i
                                                       else 0.0))
                for _ in range(max(new, 0)):
                    metric.observe(_middle(bounds, i), tags=dict(labels))


def _middle(bounds: list[float], i: int) -> float:
    """A value inside bucket ``i`` (past the last bound: twice it, as Ray's agent takes)."""
    if i >= len(bounds):
        return bounds[-1] * 2.0 if bounds else 1.0
    low = bounds[i - 1] if i else 0.0
    return (low + bounds[i]) / 2.0


def _ray_metric(kind: str, name: str, doc: str, tag_keys: tuple[str, ...],
                boundaries: list[float] | None) -> Any:
    from ray.util import metrics

    if kind == "counter":
        return metrics.Counter(name, doc, tag_keys=tag_keys)
    if kind == "gauge":
        return metrics.Gauge(name, doc, tag_keys=tag_keys)
    return metrics.Histogram(name, doc, boundaries=boundaries or [], tag_keys=tag_keys)


class RayExport:
    """Mirrors ``registry`` into Ray's metrics every ``interval_s``, from a thread of its own.

    Args:
        registry: the executor's registry (the one its ``/metrics`` endpoint serves).
        only_if_agent: mirror only if this node's Ray metrics agent runs (the default, "on when
            Ray's metrics stack is there"); else always.
    """

    def __init__(self, registry: CollectorRegistry, *, interval_s: float = EXPORT_INTERVAL_S,
                 only_if_agent: bool = True) -> None:
        self._registry = registry
        self._interval_s = interval_s
        self._only_if_agent = only_if_agent
        self._mirror = Mirror()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ray_quota-ray-metrics",
                                        daemon=True)

    def start(self) -> RayExport:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        if self._only_if_agent and not metrics_agent_running():
            return
        said: set[type[BaseException]] = set()
        while not self._stop.wait(self._interval_s):
            try:
                self._mirror.copy(self._registry.collect())
            except QuotaError:
                return  # the executor stopped serving: nothing more to export
            except Exception as exc:  # noqa: BLE001 - metrics must never end the executor
                if type(exc) not in said:  # once per kind of failure, not every interval
                    said.add(type(exc))
                    print(f"ray_quota: cannot export metrics through Ray: {exc!r}",
                          file=sys.stderr, flush=True)
