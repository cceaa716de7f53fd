"""A catalogue of bad input: each gets a clear error naming what was wrong and changes nothing."""

from __future__ import annotations

import contextlib
import gc
import math
import pickle
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_MANIFEST

import ray_quota
from ray_quota._runtime import renewer as _renewer
from ray_quota import (
    FailedReservation,
    ForgedTokenError,
    IncompatibleTokensError,
    InvalidAmountError,
    ManifestError,
    QuotaToken,
    TokenClosedError,
    TokenMovedError,
    TokenStateError,
    UnknownResourceError,
)
from ray_quota._token import _rebuild

pytestmark = pytest.mark.usefixtures("executor")


def snapshot() -> list[tuple[Any, ...]]:
    """What must not change: everything but the refilling level of rate pools."""
    return [(s.name, s.limit, s.waiters, s.tokens, s.leases, s.leased_units,
             None if s.kind == "rate" else s.in_use) for s in ray_quota.status()]


class World:
    """Tokens and reservations each case may misuse, made before the snapshot is taken."""

    def __init__(self) -> None:
        self.tok = QuotaToken("tok", expected_use=100)
        self.budget = QuotaToken("budget", expected_use=100)
        self.committed = self.budget.reserve(10)
        self.committed.commit(5)  # the 5 unused go back at once
        self.open = self.budget.reserve(1)  # for the bad commits: reserved before the snapshot
        self.closed = QuotaToken("tok", expected_use=10)
        self.closed_reservation = self.closed.reserve(1)
        self.closed.close()
        self.moved = QuotaToken("tok", expected_use=10)
        self.moved_bytes = pickle.dumps(self.moved)
        self.merged = QuotaToken("tok", expected_use=10)
        self.tok_twin = QuotaToken("tok", expected_use=10)
        self.tok_twin.merge(self.merged)

    def forged(self, **change: Any) -> QuotaToken:
        fields = dict(token_id=secrets.token_urlsafe(16), spec=self.tok.spec,
                      environment="test", cluster=self.tok._cluster, generation=1, label=None,
                      expected_use=5, parent=None)
        fields.update(change)
        return _rebuild(**fields)

    def tampered(self) -> QuotaToken:
        raw = pickle.dumps(QuotaToken("tok", expected_use=3))
        token_id = pickle.loads(raw)._id  # the receiving end of a move, in this process
        return pickle.loads(raw.replace(token_id.encode(), token_id[::-1].encode()))


CASES: dict[str, tuple[Callable[[World], Any], type[Exception], str]] = {
    "unknown resource": (lambda w: QuotaToken("nope", 1), UnknownResourceError, "nope"),
    "expected use zero": (lambda w: QuotaToken("tok", 0), InvalidAmountError, "expected_use"),
    "expected use negative": (lambda w: QuotaToken("tok", -5), InvalidAmountError, "-5"),
    "expected use float": (lambda w: QuotaToken("tok", 2.5), InvalidAmountError, "2.5"),
    "expected use huge": (lambda w: QuotaToken("tok", 2**60), InvalidAmountError, "from 1"),
    "label not a string": (lambda w: QuotaToken("tok", 1, label=7), TypeError, "label"),
    "amount zero": (lambda w: w.tok.reserve(0), InvalidAmountError, "amount"),
    "amount negative": (lambda w: w.tok.reserve(-1), InvalidAmountError, "-1"),
    "amount float": (lambda w: w.tok.reserve(1.5), InvalidAmountError, "1.5"),
    "amount string": (lambda w: w.tok.reserve("10"), InvalidAmountError, "'10'"),
    "amount bool": (lambda w: w.tok.reserve(True), InvalidAmountError, "True"),
    "amount huge": (lambda w: w.tok.reserve(2**60), InvalidAmountError, "from 1"),
    "amount above the limit": (lambda w: w.tok.reserve(201), InvalidAmountError, "ever grant"),
    "amount above the budget": (lambda w: w.budget.reserve(10_001), InvalidAmountError,
                                "10000"),
    "timeout negative": (lambda w: w.tok.reserve(1, timeout=-1), ValueError, "timeout"),
    "timeout NaN": (lambda w: w.tok.reserve(1, timeout=math.nan), InvalidAmountError,
                    "timeout"),
    "timeout infinite": (lambda w: w.tok.reserve(1, timeout=math.inf), InvalidAmountError,
                         "finite"),
    "label too long": (lambda w: QuotaToken("tok", 1, label="x" * 65), InvalidAmountError,
                       "label"),
    "timeout a string": (lambda w: w.tok.reserve(1, timeout="1"), InvalidAmountError,
                         "timeout"),
    "commit twice": (lambda w: w.committed.commit(1), TokenStateError, "already committed"),
    "commit negative": (lambda w: w.open.commit(-1), InvalidAmountError, "used"),
    "commit float": (lambda w: w.open.commit(0.5), InvalidAmountError, "0.5"),
    "commit after release": (lambda w: w.closed_reservation.commit(1), TokenClosedError,
                             "closed"),
    "use after close": (lambda w: w.closed.reserve(1), TokenClosedError, "closed"),
    "use after transfer": (lambda w: w.moved.reserve(1), TokenMovedError, "split it first"),
    "use after merge": (lambda w: w.merged.reserve(1), TokenClosedError, "merged"),
    "merge across resources": (lambda w: w.tok.merge(w.budget), IncompatibleTokensError,
                               "budget"),
    "self-merge": (lambda w: w.tok.merge(w.tok), IncompatibleTokensError, "itself"),
    "merge a non-token": (lambda w: w.tok.merge("token"), TypeError, "QuotaToken"),
    "split above expected use": (lambda w: w.tok.split(101), InvalidAmountError, "100"),
    "split zero": (lambda w: w.tok.split(0), InvalidAmountError, "child_expected_use"),
    "forged token": (lambda w: w.forged().reserve(1), ForgedTokenError, "never issued"),
    "tampered token bytes": (lambda w: w.tampered().reserve(1), ForgedTokenError,
                             "never issued"),
    "token from another cluster": (lambda w: w.forged(cluster="elsewhere").reserve(1),
                                   ForgedTokenError, "another cluster"),
    "set_limit negative": (lambda w: ray_quota.set_limit("conn", -1), InvalidAmountError, "-1"),
    "set_limit float": (lambda w: ray_quota.set_limit("conn", 2.5), InvalidAmountError, "2.5"),
    "set_limit unknown": (lambda w: ray_quota.set_limit("nope", 3), UnknownResourceError,
                          "nope"),
    "malformed manifest": (lambda w: ray_quota.init(manifest={"environments": {"test": {
        "tok": {"limit": {"type": "rate", "value": 0, "period": "second"}}}}},
        environment="test", apply=True), ManifestError, "limit.value"),
    "unknown environment": (lambda w: ray_quota.init(manifest=TEST_MANIFEST,
                                                     environment="prod"), ManifestError, "prod"),
    "other manifest without apply": (lambda w: ray_quota.init(manifest={"environments": {
        "test": {"x": {"limit": {"type": "capacity", "value": 5}}}}}, environment="test"),
        ManifestError, "apply=True"),
    "apply adding a resource": (lambda w: ray_quota.apply({"environments": {"test": {
        **TEST_MANIFEST["environments"]["test"],
        "new": {"limit": {"type": "capacity", "value": 5}}}}}, environment="test"),
        ManifestError, "add or remove"),
    "brokers not a bool": (lambda w: ray_quota.init(manifest=TEST_MANIFEST, environment="test",
                                                    brokers="yes"), TypeError, "brokers"),
    "manifest file missing": (lambda w: ray_quota.init(manifest=Path("/nonexistent.yaml"),
                                                       environment="test"), ManifestError,
                              "nonexistent"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_a_clear_error_and_changes_nothing(case: str) -> None:
    gc.collect()  # earlier cases' handles close now, not in the middle of this one
    world = World()
    action, error, words = CASES[case]
    with renewals_paused():  # a renewal giving spare units back is not the case's doing
        before = snapshot()
        credit_before = world.tok.describe()
        with pytest.raises(error) as failure:
            action(world)
        assert words in str(failure.value), f"{case}: {failure.value!r} does not say {words!r}"
        assert snapshot() == before, f"{case} changed the executor's state"
        assert world.tok.describe()[0] == credit_before[0]


@contextlib.contextmanager
def renewals_paused() -> Iterator[None]:
    """Hold this process's renewer between renewals (it renews under this lock)."""
    renewer = _renewer.current()
    if renewer is None:
        yield
        return
    with renewer._flush_lock:
        yield


def test_a_nan_timeout_is_refused_even_when_the_local_lease_could_serve_it() -> None:
    """Issue 13, item 10: NaN compares as neither negative nor positive; it is refused before
    anything changes, also on the local path, which never asks the executor."""
    token = QuotaToken("tok", expected_use=100)
    with renewals_paused():  # a renewal could give the spare back
        for _ in range(2):  # the second grant brings prefetched spare
            token.reserve(1).commit(1)
        lease = token._leases.current
        spare = lease.spare
        assert spare > 0, "no local spare: the case would not test the local path"
        with pytest.raises(InvalidAmountError, match="timeout"):
            token.reserve(1, timeout=math.nan)
        assert (lease.spare, lease.reserved) == (spare, 0)
        with pytest.raises(InvalidAmountError, match="finite"):  # issue 14: finite numbers
            token.reserve(1, timeout=math.inf)
        assert (lease.spare, lease.reserved) == (spare, 0)
        token.reserve(1, timeout=None).commit(1)  # None: as long as the resource allows
    token.close()


def test_calls_before_init_say_to_call_init() -> None:
    ray_quota.shutdown()
    with pytest.raises(ray_quota.NotInitializedError, match="init"):
        QuotaToken("tok", expected_use=1)
    with pytest.raises(ray_quota.NotInitializedError, match="init"):
        ray_quota.status()


def test_reject_with_no_wait_changes_nothing() -> None:
    token = QuotaToken("budget", expected_use=10)
    token.reserve(10_000).commit(10_000)
    before = snapshot()
    with pytest.raises(FailedReservation, match="budget"):
        token.reserve(1)
    assert snapshot() == before


def test_a_commit_beyond_max_overuse_raises_and_charges_only_the_cap() -> None:
    """Issue 14: ``reserve(1).commit(2**53)`` used to block a pool for ages; the manifest's
    ``max_overuse`` (default: the limit) caps what one commit charges."""

    def spent() -> int:
        return next(s.in_use for s in ray_quota.status() if s.name == "budget")

    token = QuotaToken("budget", expected_use=10)
    before = spent()
    reservation = token.reserve(1)
    with pytest.raises(InvalidAmountError, match="max_overuse"):
        reservation.commit(2**53)
    assert reservation.committed
    token.close()
    assert token.spec.overuse_cap == 10_000  # the default: the limit
    assert spent() <= before + 1 + 10_000  # not 2**53
