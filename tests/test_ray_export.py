"""Mirroring the executor's registry into Ray's metrics: same names after Ray's prefix, same
values, only what changed each time. Against fakes of ``ray.util.metrics``; the real pipeline is
tests/ray/test_ray_metrics_e2e.py."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from ray_quota._core.resource import ResourceStatus
from ray_quota._observability.metrics import SERIES, Metrics, Snapshot
from ray_quota._observability.observe import REJECTED, TIMEOUT
from ray_quota._observability.ray_export import RAY_PREFIX, Mirror, ray_name

Tags = tuple[tuple[str, str], ...]


class FakeRay:
    """What Ray was told: counters' totals, gauges' last values, histograms' observations."""

    def __init__(self) -> None:
        self.made: dict[str, tuple[str, tuple[str, ...], list[float] | None]] = {}
        self.counted: dict[tuple[str, Tags], float] = defaultdict(float)
        self.gauged: dict[tuple[str, Tags], float] = {}
        self.observed: dict[tuple[str, Tags], list[float]] = defaultdict(list)

    def factory(self, kind: str, name: str, doc: str, tag_keys: tuple[str, ...],
                boundaries: list[float] | None) -> Any:
        assert name not in self.made, f"{name} made twice"
        self.made[name] = (kind, tag_keys, boundaries)
        fake = self

        class Metric:
            def inc(self, value: float, tags: dict[str, str]) -> None:
                assert kind == "counter" and value > 0 and set(tags) == set(tag_keys)
                fake.counted[name, tuple(sorted(tags.items()))] += value

            def set(self, value: float, tags: dict[str, str]) -> None:
                assert kind == "gauge" and set(tags) == set(tag_keys)
                fake.gauged[name, tuple(sorted(tags.items()))] = value

            def observe(self, value: float, tags: dict[str, str]) -> None:
                assert kind == "histogram" and set(tags) == set(tag_keys)
                fake.observed[name, tuple(sorted(tags.items()))].append(value)

        return Metric()

    def exported(self) -> set[str]:
        """The names Ray's agent shows for what was made (its prefix, a counter's _total)."""
        names = set()
        for name, (kind, _, _) in self.made.items():
            full = RAY_PREFIX + name
            if kind == "counter":
                names.add(f"{full}_total")
            elif kind == "histogram":
                names |= {f"{full}_bucket", f"{full}_sum", f"{full}_count"}
            else:
                names.add(full)
        return names


def status(waiters: int) -> ResourceStatus:
    return ResourceStatus(name="tok", kind="rate", limit=100, available=50, in_use=50,
                          waiters=waiters, tokens=2, leases=1, leased_units=10)


def samples(registry: CollectorRegistry, suffix: str) -> dict[tuple[str, Tags], float]:
    return {(sample.name.removeprefix(RAY_PREFIX).removesuffix(suffix),
             tuple(sorted(sample.labels.items()))): sample.value
            for family in registry.collect() for sample in family.samples
            if sample.name.endswith(suffix) and family.type == "counter"}


def test_every_family_comes_out_of_ray_under_todays_name_with_the_same_values() -> None:
    snap = Snapshot(status=[status(3)], by_label={("tok", "team-a"): (2, 40)},
                    lease_expiries=4, calls={"acquire": 9})
    metrics = Metrics(CollectorRegistry(), "test", resources=["tok"], snapshot=lambda: snap)
    metrics.failed("tok", "team-a", REJECTED, seconds=0.003)
    metrics.failed("tok", "team-a", TIMEOUT, seconds=0.2)
    metrics.failed("tok", "team-a", TIMEOUT, seconds=120.0)  # past the last bucket
    metrics.throttled("tok", "team-a", 1.5)
    fake = FakeRay()
    Mirror(fake.factory).copy(metrics.registry.collect())

    # Names: every one Ray shows is one the dashboard knows. (A counter still at 0 is not
    # shown: Ray cannot be told an increase of 0.)
    assert fake.exported() <= SERIES
    assert {f"{RAY_PREFIX}quota_rejections_total", f"{RAY_PREFIX}quota_waiters",
            f"{RAY_PREFIX}quota_reserve_latency_seconds_bucket",
            f"{RAY_PREFIX}quota_executor_calls_total"} <= fake.exported()
    # Counters: the same totals, by the same labels.
    assert {key: value for key, value in fake.counted.items()} == {
        key: value for key, value in samples(metrics.registry, "_total").items() if value}
    assert fake.counted["quota_rejections", (("environment", "test"), ("label", "team-a"),
                                             ("resource", "tok"))] == 3
    # Gauges: the values read at this copy.
    assert fake.gauged["quota_waiters", (("environment", "test"), ("resource", "tok"))] == 3
    assert fake.gauged["quota_expected_use", (("environment", "test"), ("label", "team-a"),
                                              ("resource", "tok"))] == 40
    # The histogram: each observation in its bucket, under the same bounds.
    kind, _, bounds = fake.made["quota_reserve_latency_seconds"]
    assert kind == "histogram" and bounds is not None
    observed = fake.observed["quota_reserve_latency_seconds",
                             (("environment", "test"), ("label", "team-a"), ("outcome", TIMEOUT),
                              ("path", "executor"), ("resource", "tok"))]
    assert len(observed) == 2
    assert 0.1 < min(observed) <= 0.25 and max(observed) > bounds[-1]


def test_each_copy_tells_ray_only_what_changed() -> None:
    waiters = [5]
    metrics = Metrics(CollectorRegistry(), "test", resources=["tok"], snapshot=lambda: Snapshot(
        status=[status(waiters[0])], by_label={("tok", "a"): (1, 10)} if waiters[0] else {}))
    fake = FakeRay()
    mirror = Mirror(fake.factory)
    metrics.failed("tok", None, REJECTED, seconds=0.01)
    mirror.copy(metrics.registry.collect())
    mirror.copy(metrics.registry.collect())  # nothing new: nothing added
    metrics.failed("tok", None, REJECTED, seconds=0.01)
    metrics.throttled("tok", None, 2.0)
    waiters[0] = 0  # label "a"'s tokens all closed: its series is no longer shown
    mirror.copy(metrics.registry.collect())
    labels = (("environment", "test"), ("label", ""), ("resource", "tok"))
    assert fake.counted["quota_rejections", labels] == 2
    assert fake.counted["quota_throttled_seconds", labels] == 2.0
    latency = fake.observed["quota_reserve_latency_seconds",
                            (*labels[:2], ("outcome", REJECTED), ("path", "executor"),
                             ("resource", "tok"))]
    assert len(latency) == 2
    assert fake.gauged["quota_waiters", (("environment", "test"), ("resource", "tok"))] == 0
    assert fake.gauged["quota_expected_use", (("environment", "test"), ("label", "a"),
                                              ("resource", "tok"))] == 0


def test_a_name_ray_cannot_export_unchanged_is_refused() -> None:
    assert ray_name("ray_quota_waiters") == "quota_waiters"
    with pytest.raises(ValueError, match="ray_"):
        ray_name("quota_waiters")
