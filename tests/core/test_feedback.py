"""Effective limits that learn from the provider (DESIGN 8), on a fake clock: the controller
alone, against a simulated provider with a hidden limit, and through the executor's service."""

from __future__ import annotations

import math

import pytest
from fakes import FakeClock

from ray_quota._core.credentials import holder_id
from ray_quota._core.feedback import Feedback, controller_for
from ray_quota._core.pools import RatePool
from ray_quota._core.protocol import ProviderSignal
from ray_quota._core.service import ExecutorService
from ray_quota._errors import InvalidAmountError, ProtocolError, QuotaError, TokenMovedError
from ray_quota._spec import FeedbackSpec, Kind, ResourceSpec, check_feedback

SECRET = "test-secret"
KEY = holder_id("proc", SECRET) + ":0"


def _controller(**params: float) -> Feedback:
    return Feedback(FeedbackSpec(**params), ceiling=1000, interval_s=1.0, now=0.0)


def test_a_refusal_cuts_the_limit_and_holds_until_the_retry_after() -> None:
    ctl = _controller()
    ctl.refused(5.0, retry_after_s=2.0)
    assert ctl.limit == 700.0 and ctl.hold_until == 7.0


def test_refusals_of_requests_sent_before_a_cut_do_not_cut_again() -> None:
    ctl = _controller()
    ctl.refused(5.0)
    ctl.refused(5.2)  # within half an interval: the same overload
    assert ctl.limit == 700.0
    ctl.refused(5.6)
    assert ctl.limit == pytest.approx(490.0)


def test_the_limit_never_falls_below_the_floor() -> None:
    ctl = _controller(floor=0.1)
    for i in range(50):
        ctl.refused(float(i))
    assert ctl.limit == 100.0


def test_quiet_intervals_probe_back_up_never_above_the_manifest_limit() -> None:
    ctl = _controller()
    ctl.refused(0.0)
    limits = []
    for i in range(1, 400):
        ctl.tick(i * 0.5)
        limits.append(ctl.limit)
    assert limits == sorted(limits) and limits[-1] == 1000.0
    assert max(limits) <= 1000.0
    assert ctl.next_tick(500.0) is None


def test_recovery_is_fast_below_the_last_refusal_and_slow_above_it() -> None:
    ctl = _controller(increase=0.01, margin=0.05)
    ctl.refused(0.0)  # cut at 1000 -> 700; safe point 950
    ctl.tick(1.0)
    assert ctl.limit == 825.0  # half the gap
    for t in (2.0, 3.0, 4.0, 5.0, 6.0):
        ctl.tick(t)
    assert ctl.limit == pytest.approx(950.0, abs=5.0)
    before = ctl.limit
    ctl.tick(7.0)
    assert ctl.limit - before == pytest.approx(10.0, abs=1e-6) or ctl.limit <= 950.0


def test_little_remaining_and_falling_backs_off_by_the_margin_and_none_holds_until_the_reset(
        ) -> None:
    ctl = _controller()
    assert ctl.remaining(1.0, 900) == 900.0 and ctl.limit == 1000.0  # plenty left
    ctl.remaining(2.0, 100)
    assert ctl.limit == 950.0
    ctl.remaining(3.0, 150)  # little, but refilling: no cut
    assert ctl.limit == 950.0
    ctl.remaining(4.0, 0, reset_s=3.0)
    assert ctl.hold_until == 7.0


@pytest.mark.parametrize("call", [
    lambda c: c.refused(1.0, retry_after_s=-1.0),
    lambda c: c.refused(1.0, retry_after_s=math.nan),
    lambda c: c.refused(1.0, retry_after_s=1e9),
    lambda c: c.refused(1.0, retry_after_s="1"),
    lambda c: c.remaining(1.0, -1),
    lambda c: c.remaining(1.0, 1.5),
    lambda c: c.remaining(1.0, 0, reset_s=math.inf),
])
def test_bad_input_is_refused_and_changes_nothing(call: object) -> None:
    ctl = _controller()
    before = (ctl.limit, ctl.hold_until, ctl.next_tick(0.0))
    with pytest.raises(InvalidAmountError):
        call(ctl)  # type: ignore[operator]
    assert (ctl.limit, ctl.hold_until, ctl.next_tick(0.0)) == before


@pytest.mark.parametrize("field,value", [("decrease", 1.0), ("decrease", 0.0),
                                         ("increase", 0.0), ("increase", 1.5),
                                         ("floor", -0.1), ("margin", 1.0),
                                         ("margin", math.nan), ("interval_s", 0.0),
                                         ("decrease", True)])
def test_feedback_parameters_out_of_range_are_refused(field: str, value: object) -> None:
    with pytest.raises(QuotaError, match=field):
        check_feedback(FeedbackSpec(**{field: value}))  # type: ignore[arg-type]


def _simulate(true_rate: float, manifest: int, seconds: float,
              report_remaining: bool = True) -> tuple[list[tuple[float, float]], int, int, float]:
    """A pool granting against the effective limit, clients sending every unit it grants to a
    provider whose own bucket holds one second of its hidden ``true_rate``; each answer comes
    back 0.1 s later and is reported. Returns (time, effective limit) samples, requests sent
    and refused after the first half, and the goodput of the second half."""
    spec = ResourceSpec("tpm", Kind.RATE, manifest, period_s=1.0, burst=manifest)
    ctl = controller_for(spec, 0.0)
    assert ctl is not None
    pool, cost, step = RatePool(spec, 0.0), 50, 0.01
    provider, stamp = true_rate, 0.0
    answers: list[tuple[float, bool, float, float]] = []
    samples, sent, refused, served = [], 0, 0, 0.0
    t = 0.0
    while t < seconds:
        for answer in [a for a in answers if a[0] <= t]:
            answers.remove(answer)
            _, ok, retry, left = answer
            cap = math.inf
            if not ok:
                ctl.refused(t, retry)
                cap = 0.0
            elif report_remaining:
                cap = ctl.remaining(t, int(left))
            pool.throttle(ctl.scale, t)
            pool.hold(ctl.hold_until, cap, t)
        if ctl.tick(t):
            pool.throttle(ctl.scale, t)
        while pool.available(t) >= cost:
            pool.take(cost, t)
            provider = min(true_rate, provider + (t - stamp) * true_rate)
            stamp = t
            ok = provider >= cost
            provider -= cost if ok else 0
            late = t >= seconds / 2
            sent += late
            refused += late and not ok
            served += cost if late and ok else 0
            answers.append((t + 0.1, ok, (cost - provider) / true_rate, provider))
        samples.append((t, ctl.limit))
        t += step
    return samples, sent, refused, served / (seconds / 2)


def test_the_effective_limit_converges_to_a_hidden_true_limit() -> None:
    samples, sent, refused, goodput = _simulate(true_rate=1000.0, manifest=2000, seconds=120.0)
    late = [limit for t, limit in samples if t >= 60.0]
    assert all(900.0 <= limit <= 1100.0 for limit in late), (min(late), max(late))
    assert refused <= 0.01 * sent
    assert goodput >= 0.9 * 1000.0
    assert max(limit for _, limit in samples) <= 2000.0


def test_refusals_alone_still_bring_the_limit_down_to_the_true_one() -> None:
    samples, _, _, goodput = _simulate(true_rate=1000.0, manifest=2000, seconds=120.0,
                                       report_remaining=False)
    late = [limit for t, limit in samples if t >= 60.0]
    assert max(late) <= 1250.0 and goodput >= 0.75 * 1000.0


# ------------------------------------------------------------------------ through the service


class _Sly(int):
    def __float__(self) -> float:
        return -1e18


def _service(kind: Kind = Kind.RATE) -> tuple[ExecutorService, FakeClock, str]:
    clock = FakeClock()
    spec = (ResourceSpec("tpm", kind, 1000, period_s=1.0, burst=1000) if kind is Kind.RATE
            else ResourceSpec("tpm", kind, 1000))
    service = ExecutorService({"tpm": spec}, clock=clock)
    info = service.open_token("tpm", 100, "me", None)
    assert not isinstance(info, QuotaError)
    return service, clock, info.id


def _effective(service: ExecutorService) -> float | None:
    return service.status()[0].effective_limit


def test_a_refusal_through_the_service_lowers_the_effective_limit_and_holds_grants() -> None:
    service, clock, token = _service()
    answer = service.feedback(token, 0, "me", KEY, ProviderSignal(True, 2.0), secret=SECRET)
    assert answer is None and _effective(service) == 700.0
    ticket = service.acquire(token, 0, "me", KEY, 10, 0, None, secret=SECRET)
    assert not isinstance(ticket, QuotaError) and ticket.outcome is None  # held
    clock.advance(2.05)
    service.tick()
    assert ticket.outcome is not None


@pytest.mark.parametrize("call,error", [
    (lambda s, t: s.feedback(t, 0, "intruder", KEY, ProviderSignal(True), secret=SECRET),
     TokenMovedError),
    (lambda s, t: s.feedback(t, 0, "me", KEY, ProviderSignal(True), secret="guess"),
     QuotaError),
    (lambda s, t: s.feedback(t, 0, "me", KEY, (True, 1.0), secret=SECRET), ProtocolError),
    (lambda s, t: s.feedback(t, 0, "me", KEY, ProviderSignal(), secret=SECRET),
     InvalidAmountError),
    (lambda s, t: s.feedback(t, 0, "me", KEY, ProviderSignal(True, -1.0), secret=SECRET),
     InvalidAmountError),
    (lambda s, t: s.feedback(t, 0, "me", KEY, ProviderSignal("yes"), secret=SECRET),  # type: ignore[arg-type]
     ProtocolError),
    # A refusal whose reset is beyond a day: refused before the refusal cut the limit
    # (adversary 7, 01: the cut stayed though the call was refused).
    (lambda s, t: s.feedback(t, 0, "me", KEY, ProviderSignal(True, None, 5, 2e5),
                             secret=SECRET), InvalidAmountError),
    (lambda s, t: s.feedback(t, 0, "me", KEY, ProviderSignal(True, 2e5), secret=SECRET),
     InvalidAmountError),
    # An int subclass decides what float() of it is (adversary 7, 02).
    (lambda s, t: s.feedback(t, 0, "me", KEY, ProviderSignal(False, None, _Sly(5)),
                             secret=SECRET), ProtocolError),
])
def test_only_the_tokens_holder_may_report_and_bad_reports_change_nothing(
        call: object, error: type[QuotaError]) -> None:
    service, _, token = _service()
    answer = call(service, token)  # type: ignore[operator]
    assert isinstance(answer, error)
    assert _effective(service) == 1000.0 and service.status()[0].available == 1000


def test_feedback_on_a_capacity_resource_is_refused() -> None:
    service, _, token = _service(Kind.CAPACITY)
    answer = service.feedback(token, 0, "me", KEY, ProviderSignal(True), secret=SECRET)
    assert isinstance(answer, InvalidAmountError) and "rate" in str(answer)


def test_a_back_off_on_what_remains_does_not_swallow_the_next_refusal() -> None:
    ctl = _controller()
    ctl.remaining(1.0, 900)
    ctl.remaining(1.1, 100)  # low and falling: 1000 -> 950
    ctl.refused(1.2)
    assert ctl.limit == pytest.approx(665.0)
