"""The executor and the node brokers are a trust boundary: a fuzzer over every call they serve.

Any driver of the cluster can call them, with anything Ray can pickle. Each call here draws its
arguments from a mix of valid values and garbage (wrong types, NaN, infinity, huge and negative
numbers, unknown ids, other callers' ids, wrong generations, nested lists, None) and checks that
the answer is a success or a clear :class:`QuotaError` (never another exception), that a refusal
changed nothing (a full snapshot: every pool's available and in-use units and level, virtual
time, every token's expected use, pass, credit, owner and waiters, every lease's units and
totals, the ended keys, the queued waiters), and that an honest client is served afterwards.

Then one focused test per case the outside review found (issue 14).
"""

from __future__ import annotations

import asyncio
import math
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeClock
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_quota._core.credentials import holder_id
from ray_quota._core.fair_queue import Ticket
from ray_quota._core.protocol import MAX_GENERATION, Adoption, Grant, Report, TokenInfo
from ray_quota._core.scheduler import Policy
from ray_quota._core.service import ExecutorService
from ray_quota._errors import (
    IncompatibleTokensError,
    InvalidAmountError,
    LeaseEndedError,
    ProtocolError,
    QuotaError,
)
from ray_quota._observability import observe
from ray_quota._spec import MAX_NAME, MAX_UNITS, Enforcement, Kind, ResourceSpec
from ray_quota._store import StateStore

# Every holder proves its id with its secret (ray_quota._core.credentials).
ME_S, OTHER_S, HONEST_S = "me-secret", "other-secret", "honest-secret"
ME, OTHER, HONEST = (holder_id(name, secret) for name, secret in
                     (("me", ME_S), ("other", OTHER_S), ("honest", HONEST_S)))

SPECS = {
    "r": ResourceSpec("r", Kind.RATE, value=10, period_s=1.0, burst=20),
    "c": ResourceSpec("c", Kind.CAPACITY, value=100, enforcement=Enforcement.REJECT),
    "k": ResourceSpec("k", Kind.CONCURRENCY, value=2, wait_limit_s=5.0),
    # The honest client's: no fuzzed call names it (they name r, c, k or garbage).
    "honest": ResourceSpec("honest", Kind.CAPACITY, value=MAX_UNITS),
}


# ------------------------------------------------------------------------------- snapshots


def snapshot(service: ExecutorService) -> dict[str, Any]:
    """Everything a refused call must leave as it was, read at the service's clock."""
    sched = service.scheduler
    now = sched._clock()
    resources = {}
    for name, res in sched._resources.items():
        pool = res.pool
        resources[name] = (res.spec, pool.available(now), pool.in_use(now), pool.save(now),
                           res.vtime, res.leased, res.tokens, res.queue.waiting,
                           [(w.ticket.id, w.ticket.amount) for w in res.queue.waiters()])
    tokens = {token_id: (t.resource, t.expected_use, t.pass_, t.generation, t.claimant, t.label,
                         t.parent, sched.credit(token_id), [w.ticket.id for w in t.waiters])
              for token_id, t in sched._tokens.items()}
    leases = {key: (lease.units, lease.expires_at, lease.returned, lease.used, lease.debt)
              for key, lease in sched._leases.items()}
    return {"resources": resources, "tokens": tokens, "leases": leases,
            "ended": _ended(sched._leases._ended), "closed": list(sched._tokens._closed),
            "waiting": sorted(service._waiting)}


def _ended(ended: Any) -> Any:
    """The ended lease keys a ledger keeps: the latest, and each holder's marks."""
    marks = {token_id: {holder: (m.top, m.live, m.key, m.key_n, m.debt)
                        for holder, m in holders.items()}
             for token_id, holders in ended._marks.items()}
    return dict(ended._recent), marks, dict(ended._idle), set(ended._closing)


# ------------------------------------------------------------------------------ the world


class World:
    """A service with history: tokens of two callers, a child, grants, debt and waiters."""

    def __init__(self) -> None:
        self.clock = FakeClock(100.0)
        ids = iter(f"id-{n}" for n in range(10_000))
        self.service = ExecutorService(SPECS, clock=self.clock,
                                       policy=Policy(lease_ttl_s=10.0), new_id=ids.__next__)
        s = self.service
        self.mine = self._open("r", 10, "me")
        self.theirs = self._open("r", 10, "other")
        self.budget = self._open("c", 10, "me")
        self.slots = self._open("k", 1, "me")
        child = s.split(self.mine, 0, "me", 4)
        assert not isinstance(child, QuotaError)
        self.child = child[0].id
        self.closed = self._open("c", 1, "me")
        s.close(self.closed, 0, "me", [])
        self._grant(self.mine, f"{ME}:0", 8)
        self._grant(self.budget, f"{ME}:1", 30)
        s.settle([Report(self.budget, f"{ME}:1", 5, 20, 3, False)], ME_S)  # some use, some debt
        self._grant(self.slots, f"{ME}:2", 2)
        assert isinstance(s.acquire(self.theirs, 0, "other", f"{OTHER}:0", 1, 0, None, OTHER_S),
                          Ticket)
        queued = s.acquire(self._open("k", 1, "other"), 0, "other", f"{OTHER}:1", 1, 0, None,
                           OTHER_S)
        assert isinstance(queued, Ticket) and queued.outcome is None  # k is full: it waits
        self.ticket = queued.id
        s.drain()
        self.ids = [self.mine, self.theirs, self.budget, self.slots, self.child, self.closed,
                    "never-issued"]
        # What the service accepts must be writable: the actor writes every drain's changes.
        # (A path: StateStore(":memory:") made a file of that name in the working directory.)
        self._dir = tempfile.TemporaryDirectory(prefix="edge-fuzz-")
        self.store = StateStore(Path(self._dir.name) / "state.db")
        self.store.start("cluster", "test")
        self.write()

    def write(self) -> None:
        for changes in self.service.drain().changes:
            try:
                self.store.write(changes)
            except Exception as exc:  # noqa: BLE001
                raise AssertionError(f"accepted, but the store cannot write it: {exc!r}") from exc

    def scrape(self) -> str:
        """The metrics a scrape reads from the scheduler (labels, expected use, gauges)."""
        from prometheus_client import generate_latest

        from ray_quota._observability.metrics import ExecutorMetrics

        metrics = ExecutorMetrics(lambda: self.service.scheduler, "test", "cluster")
        return generate_latest(metrics.metrics.registry).decode()

    def _open(self, resource: str, expected_use: int, claimant: str) -> str:
        info = self.service.open_token(resource, expected_use, claimant, "team")
        assert isinstance(info, TokenInfo), info
        return info.id

    def _grant(self, token_id: str, key: str, amount: int) -> None:
        ticket = self.service.acquire(token_id, 0, "me", key, amount, 0, None, ME_S)
        assert isinstance(ticket, Ticket) and isinstance(ticket.outcome, Grant), ticket

    def honest_client_is_served(self) -> None:
        """Open, reserve, commit with overuse, renew and close, as a process would."""
        s = self.service
        info = s.open_token("honest", 5, "honest", "team")
        assert isinstance(info, TokenInfo), info
        ticket = s.acquire(info.id, 0, "honest", f"{HONEST}:0", 3, 0, 1.0, HONEST_S)
        assert isinstance(ticket, Ticket) and isinstance(ticket.outcome, Grant), ticket
        report = Report(info.id, f"{HONEST}:0", 0, 3, 1, False)
        assert s.settle([report], HONEST_S) is None
        assert (info.id, f"{HONEST}:0") in s.renew(HONEST, [report], HONEST_S)
        assert s.close(info.id, 0, "honest", [report._replace(final=True)], HONEST_S) is None
        s.tick()
        self.write()
        assert "ray_quota" in self.scrape()


# --------------------------------------------------------------------------- strategies

GARBAGE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.5, 1.5, 1e300, 2**63, 2**64, -1]),
    st.text(max_size=3), st.just("x" * 300), st.binary(max_size=3),
    st.lists(st.integers(), max_size=2), st.just([["nested"]]), st.just({"a": 1}),
    st.tuples(st.integers(), st.text(max_size=2)),
)

Field = tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]  # (valid, hostile)


def field(valid: list[Any] | st.SearchStrategy[Any], *hostile: Any) -> Field:
    """A field's valid values, and what a hostile caller sends instead: the values this field
    gets wrong in particular (out of range, someone else's), or any garbage."""
    good = st.sampled_from(valid) if isinstance(valid, list) else valid
    specific = st.sampled_from(hostile)
    bad = st.one_of(specific, specific, GARBAGE) if hostile else GARBAGE
    return good, bad


def call(name: str, *fields: Field) -> st.SearchStrategy[tuple[str, tuple[Any, ...]]]:
    """Calls of ``name``: valid arguments, of which none, one or two are hostile (one bad
    field among good ones is what gets past checks that look at the first field only)."""
    return _call(name, fields)


@st.composite
def _call(draw: st.DrawFn, name: str, fields: tuple[Field, ...]) -> tuple[str, tuple[Any, ...]]:
    count = draw(st.sampled_from([0, 0, 1, 1, 1, 2]))  # hostile fields in this call
    bad = {draw(st.integers(0, len(fields) - 1)) for _ in range(count)}
    return name, tuple(draw(hostile if i in bad else valid)
                       for i, (valid, hostile) in enumerate(fields))


def record(build: Callable[..., Any], *fields: Field) -> Field:
    """A value built from fields (a report, an adoption, a spec): valid, or with one or two
    hostile fields among valid ones."""

    @st.composite
    def hostile(draw: st.DrawFn) -> Any:
        bad = {draw(st.integers(0, len(fields) - 1))
               for _ in range(draw(st.sampled_from([1, 1, 1, 2])))}
        return build(*(draw(h if i in bad else v) for i, (v, h) in enumerate(fields)))

    return st.builds(build, *(valid for valid, _ in fields)), hostile()


def listed(item: Field, max_size: int) -> Field:
    """A list of valid items; hostile: one hostile item among valid ones, or garbage."""
    valid, hostile = item
    bad = st.builds(lambda good, one, at: [*good[:at], one, *good[at:]],
                    st.lists(valid, max_size=max_size - 1), hostile, st.integers(0, max_size))
    return st.lists(valid, min_size=1, max_size=max_size), st.one_of(bad, bad, GARBAGE)


def report_on(lease: Any, *totals: Any) -> Report:
    """A report on the lease (token id, key); garbage in place of a lease as the token id."""
    ident = lease if isinstance(lease, tuple) and len(lease) == 2 else (lease, f"{ME}:0")
    return Report(*ident, *totals)


def call_strategies(world: World) -> dict[str, st.SearchStrategy[tuple[str, tuple[Any, ...]]]]:
    """Per method of the service, its calls."""
    ids = field(world.ids[:5], world.closed, "never-issued", "x" * 257)
    gens = field([0, 0, 0, 1, 2], MAX_GENERATION + 1, 2**63, -1, True)
    claimants = field(["me", "me", "other"], "stranger", "x" * 257)
    # Lease calls carry the holder's secret: ours, another's, or none.
    secrets = field([ME_S, ME_S, ME_S, OTHER_S], None, "wrong", HONEST_S)
    holders = field([ME, ME, OTHER], "stranger", "me", "x" * 257)
    keys = field([f"{ME}:0", f"{ME}:1", f"{ME}:2", f"{OTHER}:0", f"{ME}:7"], "x" * 257)
    amounts = field([1, 2, 5, 20], 21, 0, -1, MAX_UNITS + 1, 2.0, True)
    prefetch = field([0, 0, 4], -1, MAX_UNITS + 1, 0.5)
    totals = field([0, 1, 3, 10, 30], -1, MAX_UNITS + 1, 20.5, MAX_UNITS)
    timeouts = field([None, 0, 0.5, 5.0], math.nan, math.inf, -1, 1e9, True)
    labels = field([None, "team", "x" * MAX_NAME], "x" * (MAX_NAME + 1), ["team"], "")
    resources = field(["r", "c", "k"], "nope", "honest" * 20)
    # Reports name a lease that exists, so that their totals would move something; or any.
    leases = field([(world.mine, f"{ME}:0"), (world.budget, f"{ME}:1"), (world.slots, f"{ME}:2"),
                    (world.theirs, f"{OTHER}:0"), (world.child, f"{ME}:9")],
                   (world.closed, f"{ME}:3"), ("never-issued", f"{ME}:0"))
    finals = field(st.booleans(), 1, None, "yes")
    reports = listed(record(report_on, leases, totals, totals, totals, finals), 3)
    adoptions = listed(record(Adoption, ids, keys, keys, totals, totals, totals, totals), 2)
    spec = record(ResourceSpec,
                  field(["r", "c", "k"], "nope", "x" * 65),
                  field(list(Kind), "rate"), amounts,
                  field([1.0, 60.0], 0.0, math.nan, math.inf, -1.0),
                  field([5, 20], -5, 2.5, 0),
                  field(list(Enforcement), "reject"),
                  field(["unit"], "", "u" * 65),
                  field([None, 5.0, 0.0], math.nan, -1.0, math.inf),
                  field([None, 1, 5], 0, -3, 1.5))
    specs = (spec[0], st.one_of(spec[1], spec[1], GARBAGE))
    manifests = (st.builds(lambda s: {**SPECS, s.name: s}, spec[0]),
                 st.one_of(st.builds(lambda s: {**SPECS, repr(s.name).strip("'"): s}, spec[1]),
                           st.sampled_from([{"r": SPECS["c"]}, {**SPECS, "extra": SPECS["c"]},
                                            dict(list(SPECS.items())[:2])]), GARBAGE))
    calls: dict[str, tuple[Field, ...]] = {
        "open_token": (resources, amounts, claimants, labels),
        "split": (ids, gens, claimants, amounts),
        "merge": (ids, gens, claimants, ids, gens, reports, secrets),
        "merge_back": (ids, gens, claimants, ids, reports, secrets),
        "describe": (ids, gens, claimants),
        "close": (ids, gens, claimants, reports, secrets),
        "acquire": (ids, gens, claimants, keys, amounts, prefetch, timeouts, secrets),
        "cancel": (field([world.ticket, 0], 999, -1),),
        "settle": (reports, secrets),
        "renew": (holders, reports, secrets),
        "adopt": (adoptions, secrets),
        "watch": (holders, timeouts, secrets),
        "set_limit": (specs,),
        "apply": (manifests,),
        "advance": ((st.sampled_from([0.5, 3.0, 11.0]),) * 2,),  # never hostile
    }
    return {name: call(name, *fields) for name, fields in calls.items()}


# Built once: every World has the same ids (they are drawn from a counter) and ticket.
STRATEGIES = call_strategies(World())
CALLS = st.one_of(list(STRATEGIES.values()))


def run_call(world: World, name: str, args: tuple[Any, ...]) -> Any:
    """Make one call; a refusal must change nothing. Returns the answer."""
    service = world.service
    if name == "advance":
        world.clock.advance(args[0])
        service.tick()  # what time alone changes happens here, not in the next call
        world.write()
        return None
    before = snapshot(service)
    try:
        answer = getattr(service, name)(*args)
    except Exception as exc:  # noqa: BLE001 - the point: nothing may raise
        raise AssertionError(f"{name}{args!r} raised {exc!r}") from exc
    if isinstance(answer, Exception):
        assert isinstance(answer, QuotaError), f"{name}{args!r} answered {answer!r}"
        assert str(answer), f"{name}{args!r}: an error that says nothing"
        assert snapshot(service) == before, f"{name}{args!r} refused ({answer!r}) but changed"
    world.write()
    return answer


FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.data())
def test_any_call_is_served_or_refused_changing_nothing(data: st.DataObject) -> None:
    world = World()
    calls = data.draw(st.lists(CALLS, min_size=1, max_size=12))
    for name, args in calls:
        run_call(world, name, args)
    world.clock.advance(0.1)
    world.service.tick()
    world.honest_client_is_served()


# ------------------------------------------------------------------------ the broker's edge


class FakeUpstream:
    """The executor behind a broker: an ExecutorService, called as the broker's rpc would."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.calls = 0
        self.refusals = 0  # calls the executor answered with an error

    async def call_async(self, method: str, *args: Any, retry: bool = True) -> Any:
        self.calls += 1
        answer = getattr(self.world.service, method)(*args)
        if isinstance(answer, Ticket):
            if answer.outcome is None:
                self.world.service.cancel(answer.id)
                raise QuotaError("the fake executor does not wait")
            answer = answer.outcome
        self.world.service.drain()
        if isinstance(answer, Exception):
            self.refusals += 1
            raise answer
        return answer

    def send(self, method: str, *args: Any) -> None:
        self.calls += 1
        getattr(self.world.service, method)(*args)
        self.world.service.drain()


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[World], Any]]:
    from ray_quota._actors import broker as broker_module
    from ray_quota._core.broker import BrokerCore
    from ray_quota._core.protocol import ExecutorInfo
    from ray_quota._runtime import identity

    monkeypatch.setattr(identity._Role, "broker", identity._Role.broker)  # restored after

    def make(world: World) -> Any:
        upstream = FakeUpstream(world)
        monkeypatch.setattr(broker_module.rpc, "call_async", upstream.call_async)
        monkeypatch.setattr(broker_module.rpc, "send", upstream.send)
        actor = broker_module.BrokerActor("node-1")
        # Ready without its loops: they would renew and watch on a real clock.
        actor._core = BrokerCore(holder=identity.HOLDER, ttl_s=10.0)
        actor._info = ExecutorInfo("cluster", "test", dict(SPECS), 10.0)
        actor._board = InstantBoard()  # a watch's checks are the point, not its wait
        actor.upstream = upstream
        return actor

    yield make


class InstantBoard:
    """A recall board whose watches end at once."""

    async def wait(self, holder: str, timeout_s: float) -> list[str]:
        return []

    def post(self, holder: str, token_ids: Any) -> None:
        pass


def broker_snapshot(actor: Any) -> Any:
    core = actor._core
    ups = {token_id: (up.lease.key, up.lease.spare, up.lease.reserved, up.lease.totals(),
                      up.retired, sorted(up.subs))
           for token_id, up in core._ups.items()}
    subs = {key: (sub.granted, sub.returned, sub.used, sub.debt, sub.pending, sub.expires_at)
            for key, sub in core._subs.items()}
    return ups, subs, dict(core._ended), list(core._owed), len(core._retired)


def broker_holdings(actor: Any) -> Any:
    """The broker's snapshot less what a request the executor refused may touch without
    changing anything: its sub-lease's expiry, and an upstream lease never granted that
    holds nothing and has no sub-leases (forgotten at the next renewal)."""
    ups, subs, ended, owed, retired = broker_snapshot(actor)
    ups = {token_id: up for token_id, up in ups.items()
           if actor._core._ups[token_id].lease.active or up[-1]}
    subs = {key: sub[:-1] for key, sub in subs.items()}
    return ups, subs, ended, owed, retired


BROKER_CALLS = ("acquire", "settle", "renew", "watch", "close", "merge", "merge_back")


def broker_call_strategy() -> st.SearchStrategy[tuple[str, tuple[Any, ...]]]:
    inner = st.one_of([STRATEGIES[name] for name in BROKER_CALLS])
    resources = st.one_of(st.sampled_from(["r", "c", "k", "r", "c", "k", "nope"]), GARBAGE)
    observed = st.one_of(GARBAGE, st.sampled_from([
        None,
        ({("cluster", "r", None, observe.LOCAL, observe.GRANTED):
          [math.nan] * (len(observe.BUCKETS) + 3)}, {}),
        ({}, {("cluster", "r", "team"): [1.0, 0.0, -2.0]}),
        ({}, {("cluster", "r", ("team",)): [1.0, 0.0, 0.0]}),
    ]))

    def shaped(call: tuple[str, tuple[Any, ...]], resource: Any, seen: Any
               ) -> tuple[str, tuple[Any, ...]]:
        name, args = call
        if name == "acquire":
            return name, (resource, *args)
        if name == "renew":  # (holder, reports, observed, secret)
            return name, (*args[:2], seen, *args[2:])
        return call

    return st.builds(shaped, inner, resources, observed)


BROKER_CALLS_DRAWN = broker_call_strategy()


@FUZZ
@given(st.data())
def test_any_call_to_a_broker_is_served_or_refused_changing_nothing(
        broker: Callable[[World], Any], data: st.DataObject) -> None:
    world = World()
    actor = broker(world)
    loop = asyncio.new_event_loop()
    try:
        # A broker with history: leases of two tokens, which calls naming them could damage.
        for resource, token_id in (("r", world.mine), ("c", world.budget)):
            grant = loop.run_until_complete(actor.acquire(resource, token_id, 0, "me",
                                                          f"{ME}:0", 2, 0, None, ME_S))
            assert isinstance(grant, Grant), grant
        for name, args in data.draw(st.lists(BROKER_CALLS_DRAWN, min_size=1, max_size=8)):
            before, executor_before = broker_snapshot(actor), snapshot(world.service)
            holdings, calls = broker_holdings(actor), actor.upstream.calls
            refusals = actor.upstream.refusals
            try:
                answer = loop.run_until_complete(getattr(actor, name)(*args))
            except Exception as exc:  # noqa: BLE001
                raise AssertionError(f"broker {name}{args!r} raised {exc!r}") from exc
            if isinstance(answer, Exception):
                assert isinstance(answer, QuotaError), f"broker {name}{args!r}: {answer!r}"
                if actor.upstream.calls == calls:  # refused at the broker's own edge
                    assert broker_snapshot(actor) == before, f"broker {name}{args!r} changed"
                    assert snapshot(world.service) == executor_before
                elif (actor.upstream.calls - calls == actor.upstream.refusals - refusals == 1
                      and not isinstance(answer, LeaseEndedError)):
                    # Refused by the executor, its one call (a lease it ended is news: the
                    # broker retires its own): nothing changed at the broker either.
                    assert broker_holdings(actor) == holdings, f"broker {name}{args!r} changed"
                    assert snapshot(world.service) == executor_before
        world.honest_client_is_served()
    finally:
        loop.close()


# ------------------------------------------------------------ the cases the review found


def test_a_lease_key_that_is_not_a_string_is_refused_and_the_ticker_survives() -> None:
    """It used to be queued, and the first recall (contention starting) failed on it."""
    world = World()
    before = snapshot(world.service)
    answer = world.service.acquire(world.mine, 0, "me", 7, 1, 0, None)
    assert isinstance(answer, ProtocolError) and "key" in str(answer)
    assert snapshot(world.service) == before
    world.service.tick()  # contention on r: recalls go out to string keys only
    assert all(isinstance(r.holder, str) for r in world.service.drain().recalls)


@pytest.mark.parametrize("label", [["team"], "x" * (MAX_NAME + 1), 3, b"team"])
def test_a_label_that_is_not_a_short_string_is_refused(label: object) -> None:
    world = World()
    before = snapshot(world.service)
    answer = world.service.open_token("r", 1, "me", label)
    assert isinstance(answer, (ProtocolError, InvalidAmountError)) and "label" in str(answer)
    assert snapshot(world.service) == before
    ok = world.service.open_token("r", 1, "me", "x" * MAX_NAME)  # as long as a resource name
    assert isinstance(ok, TokenInfo)


@pytest.mark.parametrize("generation", [2**63, MAX_GENERATION + 1, -1])
def test_a_generation_out_of_range_is_refused_before_it_reaches_the_store(
        generation: int) -> None:
    world = World()
    before = snapshot(world.service)
    answer = world.service.describe(world.mine, generation, "stranger")
    assert isinstance(answer, InvalidAmountError) and "generation" in str(answer)
    assert snapshot(world.service) == before


def test_a_float_total_in_settle_moves_nothing() -> None:
    world = World()
    before = snapshot(world.service)
    answer = world.service.settle([Report(world.budget, f"{ME}:1", 5, 20.5, 3, False)], ME_S)
    assert isinstance(answer, InvalidAmountError) and "used" in str(answer)
    assert snapshot(world.service) == before


@pytest.mark.parametrize(("change", "words"), [
    ({"period_s": math.nan}, "period_s"),
    ({"period_s": 0.0}, "period_s"),
    ({"period_s": math.inf}, "period_s"),
    ({"burst": 0}, "burst"),
    ({"value": 2.5}, "value"),
    ({"wait_limit_s": math.nan}, "wait_limit_s"),
    ({"max_overuse": 0}, "max_overuse"),
    ({"unit": "u" * (MAX_NAME + 1)}, "unit"),
    ({"kind": "rate"}, "kind"),
])
def test_set_limit_refuses_a_spec_the_manifest_would_refuse(change: dict[str, Any],
                                                            words: str) -> None:
    world = World()
    before = snapshot(world.service)
    fields = {"name": "r", "kind": Kind.RATE, "value": 10, "period_s": 1.0, "burst": 20,
              **change}
    answer = world.service.set_limit(ResourceSpec(**fields))
    assert isinstance(answer, QuotaError) and words in str(answer), answer
    assert snapshot(world.service) == before
    applied = world.service.apply({**SPECS, "r": ResourceSpec(**fields)})
    assert isinstance(applied, QuotaError) and words in str(applied), applied
    assert snapshot(world.service) == before


def test_observations_that_are_not_finite_counts_are_dropped_and_counted() -> None:
    """A NaN in a renewal's observations poisoned histograms and counters until restart."""
    from prometheus_client import CollectorRegistry, generate_latest

    from ray_quota._observability.metrics import Metrics

    metrics = Metrics(CollectorRegistry(), environment="test", resources=["r"])
    good = [0.0] * (len(observe.BUCKETS) + 3)
    good[0], good[observe.SUM], good[observe.UNITS] = 1.0, 0.001, 5.0
    batch = ({("c1", "r", None, observe.LOCAL, observe.GRANTED): good,
              ("c1", "r", "team", observe.LOCAL, observe.GRANTED): [math.nan] * len(good),
              ("c1", "r", "x" * (MAX_NAME + 1), observe.LOCAL, observe.GRANTED): good},
             {("c1", "r", None): [5.0, 0.0, math.inf], ("c1", "r", "team"): [1.0, 0.0, -1.0],
              ("c1", "r", ("team",)): [1.0, 0.0, 0.0]})
    metrics.merge(batch, "c1")
    assert metrics.registry.get_sample_value("ray_quota_observations_dropped_total") == 5
    text = generate_latest(metrics.registry).decode()
    assert "nan" not in text.lower() and "inf\n" not in text.replace("+Inf", "")
    assert observe.clean(({}, {("c1", "r", None): [1, 0, 0]})) == (({}, {("c1", "r", None):
                                                                      [1, 0, 0]}), 0)
    assert observe.clean([1, 2]) == (None, 1)


def test_merge_back_goes_only_into_the_real_parent_and_refusal_changes_nothing() -> None:
    world = World()
    s = world.service
    before = snapshot(s)
    final = [Report(world.child, f"{ME}:9", 0, 0, 0, True)]
    refused = s.merge_back(world.child, 0, "me", world.theirs, final, ME_S)  # not its parent
    assert isinstance(refused, IncompatibleTokensError) and "split from" in str(refused)
    assert snapshot(s) == before
    assert s.merge_back(world.child, 0, "me", world.mine, final, ME_S) is True
    assert snapshot(s)["tokens"][world.mine][1] == 10  # its 4 came back


def test_a_wait_limit_of_zero_rejects_at_once() -> None:
    spec = ResourceSpec("k", Kind.CONCURRENCY, value=1, wait_limit_s=0.0)
    service = ExecutorService({"k": spec}, clock=FakeClock(0.0))
    first = service.open_token("k", 1, "me", None)
    second = service.open_token("k", 1, "me", None)
    assert isinstance(first, TokenInfo) and isinstance(second, TokenInfo)
    granted = service.acquire(first.id, 0, "me", f"{ME}:0", 1, 0, None, ME_S)
    assert isinstance(granted, Ticket) and isinstance(granted.outcome, Grant)
    refused = service.acquire(second.id, 0, "me", f"{ME}:1", 1, 0, None, ME_S)
    assert isinstance(refused, Ticket) and type(refused.outcome).__name__ == "FailedReservation"
    assert service.scheduler.status()[0].waiters == 0
