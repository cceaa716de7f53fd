"""The executor's decisions (ExecutorService) on a fake clock: nothing here sleeps or starts Ray.

Waits are resolved by ticks, answers and refusals are values, and what a call set in motion comes
out of ``drain()`` in the order the actor acts on it: changes to write, then tickets to answer
and recalls to post.
"""

from __future__ import annotations

import functools
import math
import pickle
from collections.abc import Callable
from typing import Any, cast

import pytest
from fakes import FakeClock

from ray_quota._core.credentials import adoption_suffix, adoption_via, holder_id
from ray_quota._core.protocol import (
    IDLE_TICK_S,
    Adoption,
    Grant,
    LeaseAnswer,
    Report,
    TokenInfo,
)
from ray_quota._core.scheduler import Policy, SavedLease, SavedResource, Ticket
from ray_quota._core.service import ExecutorService, Outbox, Recall, describe_change
from ray_quota._errors import (
    FailedReservation,
    ForgedTokenError,
    IncompatibleTokensError,
    InvalidAmountError,
    LeaseEndedError,
    ManifestError,
    ProtocolError,
    QuotaError,
    TokenStateError,
    UnknownResourceError,
)
from ray_quota._spec import Enforcement, Kind, ResourceSpec

TTL = 10.0
SPECS = {
    "tok": ResourceSpec("tok", Kind.RATE, value=10, period_s=1.0, burst=10),
    "budget": ResourceSpec("budget", Kind.CAPACITY, value=100, enforcement=Enforcement.REJECT),
    "conn": ResourceSpec("conn", Kind.CONCURRENCY, value=2, wait_limit_s=5.0),
}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(100.0)


OPENED: list[str] = []  # the ids of the tokens the current test opened


# The test's holders, all proven by one secret, which every lease call below carries (what the
# secret guards is tested in test_credentials.py).
SECRET = "test-secret"
PROC, PROC_A, PROC_B, P = (holder_id(name, SECRET) for name in ("proc", "proc-a", "proc-b", "p"))


def H(name: str) -> str:  # short, as the literal keys it stands in for
    """A test holder id."""
    return holder_id(name, SECRET)
LEASE_CALLS = {"acquire", "settle", "renew", "watch", "adopt", "close", "merge", "merge_back"}


class Carrying:
    """The service, with every lease call carrying :data:`SECRET`."""

    def __init__(self, service: ExecutorService) -> None:
        self._service = service

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._service, name)
        return functools.partial(method, secret=SECRET) if name in LEASE_CALLS else method


@pytest.fixture
def service(clock: FakeClock) -> ExecutorService:
    OPENED.clear()
    made = ExecutorService(SPECS, clock=clock, policy=Policy(lease_ttl_s=TTL))
    made.drain()  # the initial state, written as the actor starts
    return cast(ExecutorService, Carrying(made))


def token(service: ExecutorService, resource: str = "tok", expected_use: int = 5,
          claimant: str = "me") -> TokenInfo:
    info = service.open_token(resource, expected_use, claimant, None)
    assert isinstance(info, TokenInfo), info
    OPENED.append(info.id)
    service.drain()
    return info


def grant(service: ExecutorService, info: TokenInfo, key: str, amount: int,
          prefetch: int = 0) -> Grant:
    ticket = service.acquire(info.id, 0, "me", key, amount, prefetch, None)
    assert isinstance(ticket, Ticket) and isinstance(ticket.outcome, Grant), ticket
    service.drain()
    return ticket.outcome


def waiting(service: ExecutorService, info: TokenInfo, key: str, amount: int,
            timeout: float | None = None) -> Ticket:
    ticket = service.acquire(info.id, 0, "me", key, amount, 0, timeout)
    assert isinstance(ticket, Ticket) and ticket.outcome is None, ticket
    return ticket


def lease_keys(outbox: Outbox) -> set[tuple[str, str]]:
    return {(lease.token_id, lease.key) for changes in outbox.changes
            for lease in changes.leases}


def held(service: ExecutorService, info: TokenInfo, key: str) -> int:
    return service.scheduler.held(info.id, key)


# ------------------------------------------------------------------------- outbox and ordering


def test_the_first_drain_holds_every_resources_initial_state(clock: FakeClock) -> None:
    fresh = ExecutorService(SPECS, clock=clock)
    first = fresh.drain()
    assert {saved.spec.name for changes in first.changes for saved in changes.resources} == \
        set(SPECS)
    assert not fresh.drain()


def test_after_a_restore_the_first_drain_writes_nothing(clock: FakeClock) -> None:
    fresh = ExecutorService(SPECS, clock=clock)
    saved = [SavedResource(SPECS["budget"], pool=60.0, vtime=0.0)]
    specs = fresh.restore(saved, [], [SavedLease("t", f"{P}:0", "budget", 40, 0, 0, 0)],
                          elapsed_s=5.0)
    assert specs == SPECS
    assert not fresh.drain()  # what is on disk already: the initial full pools must not win


def test_an_immediate_grant_is_drained_with_the_lease_it_made(service: ExecutorService) -> None:
    info = token(service)
    ticket = service.acquire(info.id, 0, "me", f"{PROC}:0", 3, 2, None)
    assert isinstance(ticket, Ticket) and isinstance(ticket.outcome, Grant)
    assert ticket.outcome.units >= 3 and ticket.outcome.waited_s == 0.0
    outbox = service.drain()
    assert (info.id, f"{PROC}:0") in lease_keys(outbox)
    assert outbox.resolved == ()  # answered by its own call, not by a later drain
    assert not service.drain()


def test_a_wait_is_resolved_by_a_tick_together_with_the_changes_that_granted_it(
        service: ExecutorService, clock: FakeClock) -> None:
    info = token(service)
    grant(service, info, f"{PROC}:0", 10)  # the whole burst
    ticket = waiting(service, info, f"{PROC}:1", 4)
    assert service.drain().resolved == ()
    wake = service.next_wakeup()
    assert wake == pytest.approx(clock() + 0.4)  # 4 units at 10 per second
    clock.set(wake)
    service.tick()
    outbox = service.drain()
    [resolved] = outbox.resolved
    assert resolved.ticket == ticket.id
    assert isinstance(resolved.outcome, Grant) and resolved.outcome.units == 4
    assert resolved.outcome.waited_s == pytest.approx(0.4)
    assert (info.id, f"{PROC}:1") in lease_keys(outbox)  # written before the answer goes out


def test_a_wait_past_its_timeout_fails_at_the_tick_after_it(
        service: ExecutorService, clock: FakeClock) -> None:
    info = token(service, "conn", 1)
    grant(service, info, f"{H('a')}:0", 2)
    ticket = waiting(service, info, f"{H('b')}:0", 1, timeout=0.3)
    assert service.next_wakeup() == pytest.approx(clock() + 0.3)
    clock.advance(0.2)
    service.tick()
    assert service.drain().resolved == ()
    clock.advance(0.1)
    service.tick()
    [resolved] = service.drain().resolved
    assert resolved.ticket == ticket.id and isinstance(resolved.outcome, FailedReservation)


def test_next_wakeup_is_at_most_the_idle_tick_away_and_never_past(
        service: ExecutorService, clock: FakeClock) -> None:
    assert service.next_wakeup() == clock() + IDLE_TICK_S  # nothing due
    info = token(service, "conn", 1)
    grant(service, info, f"{H('a')}:0", 2)
    waiting(service, info, f"{H('b')}:0", 1, timeout=0.1)
    clock.advance(1.0)  # the deadline passed without a tick
    assert service.next_wakeup() == clock()


def test_a_cancelled_wait_is_never_resolved(service: ExecutorService,
                                            clock: FakeClock) -> None:
    info = token(service)
    grant(service, info, f"{PROC}:0", 10)
    ticket = waiting(service, info, f"{PROC}:1", 4)
    service.cancel(ticket.id)
    service.cancel(ticket.id)  # twice is harmless
    clock.advance(1.0)
    service.tick()
    assert service.drain().resolved == ()
    assert held(service, info, f"{PROC}:1") == 0


def test_closing_a_token_resolves_its_waits_with_an_error(service: ExecutorService) -> None:
    info = token(service, "conn", 1)
    grant(service, info, f"{H('a')}:0", 2)
    ticket = waiting(service, info, f"{H('b')}:0", 1)
    assert service.close(info.id, 0, "me", []) is None
    [resolved] = service.drain().resolved
    assert resolved.ticket == ticket.id and isinstance(resolved.outcome, QuotaError)


# --------------------------------------------------------------------------------- recalls


def test_a_recall_is_addressed_to_the_holder_of_the_lease_key(service: ExecutorService) -> None:
    holding = token(service, "conn", 1)
    grant(service, holding, f"{PROC_A}:3", 1, prefetch=1)
    other = token(service, "conn", 1, claimant="b")
    ticket = service.acquire(other.id, 0, "b", f"{PROC_B}:0", 1, 0, None)
    assert isinstance(ticket, Ticket) and ticket.outcome is None
    assert service.drain().recalls == (Recall(PROC_A, frozenset({holding.id})),)


# ---------------------------------------------------------------------------------- renewals


def test_renew_answers_each_live_lease_with_whether_others_wait(
        service: ExecutorService) -> None:
    info = token(service, "conn", 1)
    grant(service, info, f"{PROC}:0", 1)
    report = Report(info.id, f"{PROC}:0", 0, 0, 0, False)
    assert service.renew(PROC, [report]) == {(info.id, f"{PROC}:0"): LeaseAnswer(False, TTL)}
    grant(service, info, f"{H('other')}:0", 1)
    waiting(service, token(service, "conn", 1), f"{H('late')}:0", 1)
    assert service.renew(PROC, [report]) == {(info.id, f"{PROC}:0"): LeaseAnswer(True, TTL)}


def test_renew_leaves_out_an_expired_lease(service: ExecutorService, clock: FakeClock) -> None:
    info = token(service, "conn", 1)
    grant(service, info, f"{PROC}:0", 1)
    clock.advance(TTL + 0.1)
    service.tick()
    outbox = service.drain()
    assert (info.id, f"{PROC}:0") in {key for changes in outbox.changes
                                   for key in changes.dropped_leases}
    assert service.renew(PROC, [Report(info.id, f"{PROC}:0", 0, 0, 0, False)]) == {}
    assert service.scheduler.status()[2].in_use == 0  # the slot came back


def test_a_final_report_ends_the_lease_and_gives_back_what_it_held(
        service: ExecutorService) -> None:
    info = token(service, "budget", 10)
    grant(service, info, f"{PROC}:0", 10, prefetch=5)
    answer = service.renew(PROC, [Report(info.id, f"{PROC}:0", 0, 4, 0, True)])
    assert answer == {}
    assert next(s for s in service.status() if s.name == "budget").in_use == 4
    refused = service.acquire(info.id, 0, "me", f"{PROC}:0", 1, 0, None)
    assert isinstance(refused, LeaseEndedError)


def test_settle_applies_running_totals_once(service: ExecutorService) -> None:
    info = token(service, "budget", 10)
    grant(service, info, f"{PROC}:0", 10)
    report = Report(info.id, f"{PROC}:0", 6, 0, 0, False)
    assert service.settle([report]) is None
    assert service.settle([report]) is None  # a repeat changes nothing
    assert held(service, info, f"{PROC}:0") == 4


# ---------------------------------------------------------------------------------- adoption


def test_adopt_moves_a_share_of_a_brokers_lease_to_the_process(
        service: ExecutorService) -> None:
    info = token(service, "budget", 10)
    # The broker's lease key ends with the digest of its adoption secret, which the broker
    # gives its processes instead of the key.
    broker_key = f"{H('broker')}:0{adoption_suffix('adopt-me')}"
    grant(service, info, broker_key, 10)
    # The broker binds the secret to the claim its process used the token with: only the
    # token's owner adopts (a process it moved away from does not).
    stale = Adoption(info.id, adoption_via("adopt-me", "not-me", info.id, 0), f"{PROC}:0", 4,
                     0, 0, 0)
    assert service.adopt([stale]) == [] == service.adopt([stale._replace(via="adopt-me")])
    entry = stale._replace(via=adoption_via("adopt-me", "me", info.id, 0))
    assert service.adopt([entry]) == [(info.id, f"{PROC}:0")]
    assert service.adopt([entry]) == [(info.id, f"{PROC}:0")]  # a repeated call
    assert (held(service, info, broker_key), held(service, info, f"{PROC}:0")) == (6, 4)
    assert (info.id, f"{PROC}:0") in lease_keys(service.drain())
    gone = Adoption(info.id, "no-such-secret", f"{PROC}:1", 4, 0, 0, 0)
    assert service.adopt([gone]) == []


# ---------------------------------------------------------------------------- token calls


def test_split_answers_the_child_and_the_parents_expected_use_left(
        service: ExecutorService) -> None:
    info = token(service, expected_use=10)
    answer = service.split(info.id, 0, "me", 3)
    assert isinstance(answer, tuple)
    child, left = answer
    assert left == 7 and service.describe(child.id, 0, "me")[0] == 3  # type: ignore[index]
    assert service.merge_back(child.id, 0, "me", info.id, []) is True
    assert service.describe(info.id, 0, "me")[0] == 10  # type: ignore[index]


def test_errors_are_answered_not_raised(service: ExecutorService) -> None:
    info = token(service)
    assert isinstance(service.describe("forged", 0, "me"), ForgedTokenError)
    assert isinstance(service.open_token("nope", 1, "me", None), UnknownResourceError)
    assert isinstance(service.merge(info.id, 0, "me", info.id, 0, []), IncompatibleTokensError)
    assert isinstance(service.acquire(info.id, 0, "me", f"{P}:0", 11, 0, None), InvalidAmountError)


def test_calls_are_counted_by_method(service: ExecutorService) -> None:
    info = token(service)
    grant(service, info, f"{P}:0", 1)
    service.renew(P, [])
    service.watch(P, 2.0)
    service.describe("forged", 0, "me")  # refused, still served
    assert service.counts == {"open_token": 1, "acquire": 1, "renew": 1, "watch": 1,
                              "describe": 1}
    assert service.calls == 2  # grants, renewals and adoptions


# ------------------------------------------------------------------------------------ limits


# Every lease key the tests use.
KEYS = (f"{P}:0", f"{P}:1", f"{H('q')}:0", f"{H('q')}:1", f"{H('a')}:0", f"{H('b')}:0")


def snapshot(service: ExecutorService) -> Any:
    """What a refused call must not change (pools do not refill: the clock stands still):
    limits, pools, every token's expected use and credit, every lease's units."""
    sched = service.scheduler
    return (service.specs(), service.status(), sched.expected_use_by_label(),
            {(token_id, key): (sched.credit(token_id), sched.held(token_id, key))
             for token_id in OPENED for key in KEYS})


def test_apply_changes_limits_and_describes_each_change(service: ExecutorService) -> None:
    new = dict(SPECS, tok=ResourceSpec("tok", Kind.RATE, value=20, period_s=1.0, burst=5))
    assert service.apply(new) == ["tok: value 10 -> 20, burst 10 -> 5"]
    assert service.specs()["tok"].value == 20
    assert any(saved.spec.name == "tok" for changes in service.drain().changes
               for saved in changes.resources)


@pytest.mark.parametrize("new, words", [
    (dict(SPECS, extra=ResourceSpec("extra", Kind.CAPACITY, 5)), "add or remove"),
    ({name: spec for name, spec in SPECS.items() if name != "conn"}, "add or remove"),
    # A valid change to "tok" is refused too: all are checked before any is applied.
    (dict(SPECS, tok=ResourceSpec("tok", Kind.RATE, value=20, period_s=1.0, burst=10),
          conn=ResourceSpec("conn", Kind.CAPACITY, 2)), "concurrency resource into capacity"),
], ids=["adds", "removes", "changes a kind"])
def test_a_refused_apply_changes_nothing(service: ExecutorService, new: dict[str, ResourceSpec],
                                         words: str) -> None:
    token(service)
    before = snapshot(service)
    refused = service.apply(new)
    assert isinstance(refused, ManifestError) and words in str(refused)
    assert snapshot(service) == before and not service.drain()


@pytest.mark.parametrize("spec, error", [
    (ResourceSpec("nope", Kind.CAPACITY, 5), UnknownResourceError),
    (ResourceSpec("conn", Kind.CAPACITY, 5), InvalidAmountError),
    ("conn", ProtocolError),
], ids=["unknown", "changes a kind", "not a spec"])
def test_a_refused_set_limit_changes_nothing(service: ExecutorService, spec: Any,
                                             error: type[Exception]) -> None:
    before = snapshot(service)
    assert isinstance(service.set_limit(spec), error)
    assert snapshot(service) == before and not service.drain()


def test_describe_change_names_only_the_fields_that_changed() -> None:
    old = SPECS["conn"]
    new = ResourceSpec("conn", Kind.CONCURRENCY, 3, enforcement=Enforcement.REJECT,
                       wait_limit_s=5.0)
    assert describe_change(old, new) == "conn: value 2 -> 3, enforcement throttle -> reject"


# -------------------------------------------------------------------------------- bad input

World = dict[str, Any]
GOOD = "good"  # a key whose report is valid, sent before the bad one in the same call


def bad_calls() -> dict[str, tuple[Callable[[ExecutorService, World], Any], type[Exception],
                                   str]]:
    def report(w: World, **change: Any) -> tuple[Any, ...]:
        fields = dict(token_id=w["t"].id, key=f"{P}:0", returned=0, used=0, debt=0, final=False)
        fields.update(change)
        return tuple(fields.values())

    def good(w: World) -> Report:
        return Report(w["t"].id, f"{P}:0", 5, 0, 0, True)  # would give back and end the lease

    return {
        "resource not a str": (lambda s, w: s.open_token(["tok"], 1, "me", None),
                               ProtocolError, "resource"),
        "label not a str": (lambda s, w: s.open_token("tok", 1, "me", 7), ProtocolError,
                            "label"),
        "expected use float": (lambda s, w: s.open_token("tok", 1.5, "me", None),
                               InvalidAmountError, "expected_use"),
        "token id not a str": (lambda s, w: s.describe(5, 0, "me"), ProtocolError, "token_id"),
        "generation a str": (lambda s, w: s.describe(w["t"].id, "0", "me"), ProtocolError,
                             "generation"),
        "claimant None": (lambda s, w: s.describe(w["t"].id, 0, None), ProtocolError,
                          "claimant"),
        "split zero": (lambda s, w: s.split(w["t"].id, 0, "me", 0), InvalidAmountError,
                       "child_expected_use"),
        "key not a str": (lambda s, w: s.acquire(w["t"].id, 0, "me", 0, 1, 0, None),
                          ProtocolError, "key"),
        "amount a str": (lambda s, w: s.acquire(w["t"].id, 0, "me", f"{P}:1", "1", 0, None),
                         InvalidAmountError, "amount"),
        "prefetch negative": (lambda s, w: s.acquire(w["t"].id, 0, "me", f"{P}:1", 1, -1, None),
                              InvalidAmountError, "prefetch"),
        "timeout negative": (lambda s, w: s.acquire(w["t"].id, 0, "me", f"{P}:1", 1, 0, -1),
                             InvalidAmountError, "timeout"),
        "timeout nan": (lambda s, w: s.acquire(w["t"].id, 0, "me", f"{P}:1", 1, 0, math.nan),
                        InvalidAmountError, "timeout"),
        "timeout a bool": (lambda s, w: s.acquire(w["t"].id, 0, "me", f"{P}:1", 1, 0, True),
                           InvalidAmountError, "timeout"),
        "reports not a list": (lambda s, w: s.settle(good(w)), ProtocolError, "reports"),
        "report too short": (lambda s, w: s.settle([good(w), report(w)[:5]]), ProtocolError,
                             "reports[1]"),
        "report total negative": (lambda s, w: s.settle([good(w), report(w, debt=-1)]),
                                  InvalidAmountError, "reports[1].debt"),
        "report total float": (lambda s, w: s.settle([good(w), report(w, used=0.5)]),
                               InvalidAmountError, "reports[1].used"),
        "report final an int": (lambda s, w: s.renew(P, [good(w), report(w, final=1)]),
                                ProtocolError, "reports[1].final"),
        "report key not a str": (lambda s, w: s.close(w["t"].id, 0, "me",
                                                      [good(w), report(w, key=None)]),
                                 ProtocolError, "reports[1].key"),
        "merge with a bad report": (lambda s, w: s.merge(w["t"].id, 0, "me", w["u"].id, 0,
                                                         [good(w), report(w, returned=True)]),
                                    InvalidAmountError, "reports[1].returned"),
        "merge_back with a bad parent": (lambda s, w: s.merge_back(w["u"].id, 0, "me", 3,
                                                                   [good(w)]),
                                         ProtocolError, "parent_id"),
        "renew holder not a str": (lambda s, w: s.renew(None, [good(w)]), ProtocolError,
                                   "holder"),
        "adoption not a list": (lambda s, w: s.adopt({"a": 1}), ProtocolError, "entries"),
        "adoption units negative": (lambda s, w: s.adopt([
            Adoption(w["t"].id, f"{P}:0", f"{H('q')}:0", 1, 0, 0, 0),
            Adoption(w["t"].id, f"{P}:0", f"{H('q')}:1", -1, 0, 0, 0)]), InvalidAmountError,
            "entries[1].units"),
        "adoption key not a str": (lambda s, w: s.adopt([(w["t"].id, f"{P}:0", 9, 1, 0, 0, 0)]),
                                   ProtocolError, "entries[0].to_key"),
        "watch timeout a str": (lambda s, w: s.watch(P, "2"), InvalidAmountError,
                                "timeout_s"),
    }


BAD = bad_calls()


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_message_is_refused_with_a_named_error_and_changes_nothing(
        service: ExecutorService, case: str) -> None:
    world = {"t": token(service, "budget", 10), "u": token(service, "budget", 10)}
    grant(service, world["t"], f"{P}:0", 5)
    before = snapshot(service)
    call, error, words = BAD[case]
    refused = call(service, world)
    assert isinstance(refused, error), refused
    assert isinstance(refused, QuotaError)  # crosses Ray as itself
    assert words in str(refused), f"{case}: {refused} does not say {words!r}"
    assert snapshot(service) == before, f"{case} changed the state"
    assert not service.drain()


def test_valid_reports_as_plain_tuples_are_taken_as_reports(service: ExecutorService) -> None:
    info = token(service, "budget", 10)
    grant(service, info, f"{P}:0", 5)
    assert service.settle([(info.id, f"{P}:0", 5, 0, 0, False)]) is None
    assert held(service, info, f"{P}:0") == 0


def test_a_timeout_of_infinity_is_refused_changing_nothing(service: ExecutorService) -> None:
    """Issue 14: timeouts are finite numbers (None waits as the resource allows)."""
    info = token(service, "conn", 1)
    grant(service, info, f"{H('a')}:0", 2)
    service.drain()
    refused = service.acquire(info.id, 0, "me", f"{H('b')}:0", 1, 0, math.inf)
    assert isinstance(refused, InvalidAmountError) and "finite" in str(refused)
    assert not service.drain()
    waiting(service, info, f"{H('b')}:0", 1, timeout=None)  # conn's own wait limit: 5 s
    assert service.next_wakeup() == pytest.approx(100.0 + IDLE_TICK_S)


def test_protocol_errors_pickle_and_are_type_errors() -> None:
    error = ProtocolError("reports[0].final must be a bool, not int")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is ProtocolError and str(copy) == str(error)
    assert isinstance(copy, TypeError) and isinstance(copy, QuotaError)


def test_a_waiting_acquire_is_refused_nothing_when_a_split_takes_all_its_expected_use(
        service: ExecutorService) -> None:
    info = token(service, "conn", 2)
    grant(service, info, f"{H('a')}:0", 2)
    waiting(service, info, f"{H('b')}:0", 1)
    assert isinstance(service.split(info.id, 0, "me", 2), TokenStateError)
