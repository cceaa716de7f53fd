"""The public surface: one sorted __all__, and errors that survive pickling (they cross Ray)."""

from __future__ import annotations

import pickle

import pytest

import ray_quota
from ray_quota import _errors


def test_all_is_sorted_and_every_name_exists() -> None:
    assert ray_quota.__all__ == sorted(ray_quota.__all__)
    for name in ray_quota.__all__:
        assert hasattr(ray_quota, name), name


@pytest.mark.parametrize("error", [
    _errors.FailedReservation("tok", 5, 0.25),
    _errors.FailedReservation("budget", 5),
    _errors.QuotaTerminated("doomed", 1),
    _errors.UnknownResourceError("no resource 'x'"),
    _errors.TokenMovedError("moved"),
    _errors.LeaseEndedError("ended"),
    _errors.ManifestError("quota.yaml:3: environments.local: bad"),
], ids=lambda e: type(e).__name__)
def test_every_error_pickles_and_keeps_its_type_and_fields(error: Exception) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    assert isinstance(copy, ray_quota.QuotaError)
    assert getattr(copy, "estimated_wait_s", None) == getattr(error, "estimated_wait_s", None)
