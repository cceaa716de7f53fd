"""The manifest's ``feedback:`` parameters: defaults, per resource, round trip, clear refusals."""

from __future__ import annotations

from typing import Any

import pytest

from ray_quota._errors import ManifestError
from ray_quota._manifest import load_manifest
from ray_quota._spec import FeedbackSpec
from ray_quota._store import _spec_from_json, _spec_to_json

RATE = {"type": "rate", "value": 600, "period": "minute"}


def _load(resource: dict[str, Any]) -> Any:
    return load_manifest({"environments": {"e": {"r": resource}}}).environment("e")


def test_a_rate_without_feedback_gets_the_defaults() -> None:
    assert _load({"limit": RATE}).resources["r"].feedback == FeedbackSpec()


def test_feedback_parameters_are_read_per_resource_and_round_trip() -> None:
    env = _load({"limit": RATE, "feedback": {"decrease": 0.5, "increase": 0.1,
                                             "interval": "10s", "floor": 0.2, "margin": 0}})
    spec = env.resources["r"]
    assert spec.feedback == FeedbackSpec(0.5, 0.1, 10.0, 0.2, 0.0)
    manifest = load_manifest({"environments": {"e": {"r": {"limit": RATE,
                                                             "feedback": {"decrease": 0.5}}}}})
    assert load_manifest(manifest.to_dict()) == manifest
    assert _spec_from_json(_spec_to_json(spec)) == spec  # as the store keeps it


@pytest.mark.parametrize("feedback,words", [
    ({"decrease": 1.0}, "feedback.decrease: must be less than 1"),
    ({"decrease": 0}, "feedback.decrease: must be greater than 0"),
    ({"increase": 2}, "feedback.increase"),
    ({"floor": 0}, "feedback.floor"),
    # rate x floor underflowed to 0: a division by zero in the wait estimate (adversary 7, 11)
    ({"floor": 5e-324}, "feedback.floor: must be greater than or equal to 0.0001"),
    ({"margin": 1}, "feedback.margin"),
    ({"interval": "soon"}, "feedback.interval"),
    ({"speed": 1}, "feedback.speed: unknown field"),
])
def test_bad_feedback_parameters_are_refused_naming_the_field(feedback: dict[str, Any],
                                                              words: str) -> None:
    with pytest.raises(ManifestError, match=words.replace(".", r"\.")):
        _load({"limit": RATE, "feedback": feedback})


def test_feedback_on_a_capacity_or_concurrency_limit_is_refused() -> None:
    for kind in ("capacity", "concurrency"):
        with pytest.raises(ManifestError, match="rate limits only"):
            _load({"limit": {"type": kind, "value": 5}, "feedback": {}})
