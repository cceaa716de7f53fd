"""A reject request first recalls spare from other holders (issue 13, item 11, part b).

Processes' lease sets against the executor service on a fake clock. Holder A leaves spare in its
lease (prefetched units it keeps after an under-commit, or a slot it freed whose report is still
on its way); another token's ``reject`` request that free units plus that spare could cover waits
at most :data:`RECALL_GRACE_S` while the executor recalls it: granted when A answers, refused with
the usual :class:`FailedReservation` when A is frozen, and refused at once when even every unit of
spare could not cover it. Nothing is ever admitted beyond the limit.
"""

from __future__ import annotations

import itertools

import pytest
from fakes import FakeClock

from ray_quota._core.fair_queue import Ticket
from ray_quota._core.credentials import holder_id
from ray_quota._core.holder import LeaseSet
from ray_quota._core.protocol import RECALL_GRACE_S, Grant, Report, prefetch_cap
from ray_quota._core.service import ExecutorService, Outbox, Recall
from ray_quota._errors import FailedReservation, QuotaError
from ray_quota._spec import Enforcement, Kind, ResourceSpec

REJECT = Enforcement.REJECT
LIMIT = 100
SPARE = prefetch_cap(ResourceSpec("x", Kind.CAPACITY, value=LIMIT))  # 5: what A keeps


def budget(wait_limit_s: float | None = None) -> ResourceSpec:
    return ResourceSpec("budget", Kind.CAPACITY, value=LIMIT, enforcement=REJECT,
                        wait_limit_s=wait_limit_s)


def slow_rate(wait_limit_s: float | None = None) -> ResourceSpec:
    """A rate limit that refills one unit a second: the grace brings next to nothing."""
    return ResourceSpec("budget", Kind.RATE, value=LIMIT, period_s=float(LIMIT), burst=LIMIT,
                        enforcement=REJECT, wait_limit_s=wait_limit_s)


class World:
    """The executor service, a fake clock, and the processes; drains go to every process."""

    def __init__(self, spec: ResourceSpec) -> None:
        self.spec = spec
        self.clock = FakeClock(100.0)
        self.service = ExecutorService({spec.name: spec}, clock=self.clock)
        self.procs: list[Proc] = []
        self.recalls: list[Recall] = []  # every recall the executor sent

    def proc(self, name: str) -> Proc:
        proc = Proc(self, name)
        self.procs.append(proc)
        return proc

    def pump(self) -> None:
        """Deliver what the executor set in motion until nothing more comes of it."""
        while outbox := self.service.drain():
            self.recalls.extend(outbox.recalls)
            for proc in self.procs:
                proc.hear(outbox)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.service.tick()
        self.pump()

    def in_use(self) -> int:
        return next(row.in_use for row in self.service.status())

    def check_limit(self) -> None:
        """Never more admitted than the limit: by the executor's count and by the processes'
        own records (what each holds and has used)."""
        assert self.in_use() <= LIMIT
        assert sum(p.held + p.used for p in self.procs) <= LIMIT


class Proc:
    """One process holding one token of the world's resource through a real LeaseSet."""

    def __init__(self, world: World, name: str) -> None:
        self.world, self.name = world, name
        self.secret = f"{name}-secret"
        self.holder = holder_id(name, self.secret)  # the id its secret proves
        info = world.service.open_token(world.spec.name, 100, name, None)
        assert not isinstance(info, Exception), info
        self.token_id = info.id
        keys = itertools.count()
        self.leases = LeaseSet(info.id, world.spec.kind, max_prefetch=prefetch_cap(world.spec),
                               new_key=lambda: f"{self.holder}:{next(keys)}")
        self.frozen = False  # hears nothing: neither recalls nor answers
        self.outcomes: dict[int, Grant | QuotaError] = {}
        self._waiting: dict[int, int] = {}  # ticket id -> amount
        self.in_flight: list[Report] = []  # reports sent and not yet arrived
        self.used = 0

    @property
    def held(self) -> int:
        return sum(lease.held for lease in self.leases)

    def reserve(self, amount: int, timeout: float | None = None) -> Ticket | None:
        """Serve ``amount`` locally (None) or ask the executor: the ticket, maybe waiting."""
        now = self.world.clock.now
        if self.leases.take(amount, now) is not None:
            return None
        lease = self.leases.current
        ticket = self.world.service.acquire(self.token_id, 0, self.name, lease.key, amount,
                                            lease.prefetch(), timeout, self.secret)
        assert isinstance(ticket, Ticket), ticket
        if ticket.outcome is None:
            self._waiting[ticket.id] = amount
        else:
            self._resolve(ticket.id, amount, ticket.outcome)
        self.world.pump()
        return ticket

    def commit(self, amount: int, used: int, *, deliver: bool = True) -> None:
        """Close a reservation; the urgent report goes out at once (or stays in flight)."""
        self.used += used
        report = self.leases.settle(self.leases.current, amount, used)
        if report is not None:
            self.in_flight.append(report)
        if deliver:
            self.deliver()

    def deliver(self) -> None:
        reports, self.in_flight = self.in_flight, []
        if reports:
            self.world.service.settle(reports, self.secret)
            self.world.pump()

    def hear(self, outbox: Outbox) -> None:
        if self.frozen:
            return
        for resolved in outbox.resolved:
            if (amount := self._waiting.pop(resolved.ticket, None)) is not None:
                self._resolve(resolved.ticket, amount, resolved.outcome)
        for recall in outbox.recalls:
            if recall.holder == self.holder and self.token_id in recall.token_ids:
                if (report := self.leases.recall()) is not None:
                    self.world.service.settle([report], self.secret)

    def _resolve(self, ticket: int, amount: int, outcome: Grant | QuotaError) -> None:
        self.outcomes[ticket] = outcome
        if isinstance(outcome, Grant):
            assert self.leases.granted(self.leases.current, amount, outcome,
                                       sent_at=self.world.clock.now)


def leave_spare(world: World) -> Proc:
    """Holder A reserves, commits, and reserves 85 more with prefetch, of which it uses 20: 65
    go back at once, and the 5 prefetched stay spare in its lease (at most what it may keep)."""
    a = world.proc("A")
    assert a.reserve(10) is not None  # asks the executor; its prefetch grows
    a.commit(10, 10)
    assert a.reserve(85) is not None
    a.commit(85, 20)
    assert a.leases.current.spare == SPARE
    assert world.in_use() == 10 + 20 + SPARE
    return a


def recalled_from(world: World, proc: Proc) -> bool:
    return any(r.holder == proc.holder and proc.token_id in r.token_ids for r in world.recalls)


# ================================================================================ the Golem case


@pytest.mark.parametrize("spec", [budget(), slow_rate()], ids=["capacity", "rate"])
def test_a_reject_request_is_granted_once_other_holders_give_their_spare_back(
        spec: ResourceSpec) -> None:
    world = World(spec)
    leave_spare(world)
    b = world.proc("B")
    start = world.clock.now
    ticket = b.reserve(LIMIT - 30)  # 65 free and A's 5 spare: exactly enough
    assert ticket is not None
    assert isinstance(ticket.outcome, Grant), (
        "a reject request failed while units sat as spare in another holder's lease")
    assert world.clock.now == start  # granted as soon as A answered the recall
    assert b.held == LIMIT - 30
    world.check_limit()


@pytest.mark.parametrize("spec", [budget(), slow_rate()], ids=["capacity", "rate"])
def test_a_frozen_holder_leaves_the_request_to_fail_when_the_grace_ends(
        spec: ResourceSpec) -> None:
    world = World(spec)
    a = leave_spare(world)
    a.frozen = True  # a watch that never answers
    b = world.proc("B")
    start = world.clock.now
    ticket = b.reserve(LIMIT - 30)
    assert ticket is not None and ticket.outcome is None, "it did not wait for the recall"
    world.advance(RECALL_GRACE_S - 0.01)
    assert ticket.outcome is None
    world.advance(0.01)
    error = ticket.outcome
    assert isinstance(error, FailedReservation)
    assert world.clock.now - start == pytest.approx(RECALL_GRACE_S)
    if spec.kind is Kind.RATE:  # the usual estimate: 5 units short, one a second
        assert error.estimated_wait_s == pytest.approx(5 - RECALL_GRACE_S, abs=0.02)
    else:
        assert error.estimated_wait_s is None
    assert b.held == 0
    world.check_limit()


def test_only_a_request_that_spare_could_cover_waits_and_recalls() -> None:
    world = World(budget())
    a = leave_spare(world)
    a.frozen = True
    assert not world.recalls
    ticket = world.proc("C").reserve(LIMIT - 30 + 1)  # one more than free and every spare unit
    assert ticket is not None and isinstance(ticket.outcome, FailedReservation)
    assert not world.recalls  # failed at once, and no holder was bothered
    ticket = world.proc("B").reserve(LIMIT - 30)  # just coverable: waits for the recall
    assert ticket is not None and ticket.outcome is None
    assert recalled_from(world, a)


# ================================================================================== concurrency


def test_a_freed_slot_whose_report_is_on_its_way_is_waited_for() -> None:
    world = World(ResourceSpec("conn", Kind.CONCURRENCY, value=1, enforcement=REJECT))
    a, b = world.proc("A"), world.proc("B")
    assert a.reserve(1) is not None
    a.commit(1, 1, deliver=False)  # the slot is free in A; its report has not arrived
    ticket = b.reserve(1)
    assert ticket is not None and ticket.outcome is None, (
        "a reject request failed while a freed slot was on its way back")
    world.check_limit()
    world.advance(RECALL_GRACE_S / 2)
    a.deliver()
    assert isinstance(ticket.outcome, Grant)
    assert world.in_use() == 1
    world.check_limit()


def test_a_slot_really_held_fails_the_request_when_the_grace_ends() -> None:
    world = World(ResourceSpec("conn", Kind.CONCURRENCY, value=1, enforcement=REJECT))
    a, b = world.proc("A"), world.proc("B")
    assert a.reserve(1) is not None  # and keeps it
    ticket = b.reserve(1)
    assert ticket is not None and ticket.outcome is None
    world.advance(RECALL_GRACE_S)
    assert isinstance(ticket.outcome, FailedReservation)
    assert world.in_use() == 1
    world.check_limit()


# ============================================================================ never beyond limit


def test_two_requests_each_covered_by_the_same_spare_get_it_once() -> None:
    world = World(budget())
    leave_spare(world)
    a = world.procs[0]
    a.frozen = True  # answers only when told below
    b, c = world.proc("B"), world.proc("C")
    first, second = b.reserve(LIMIT - 30), c.reserve(LIMIT - 30)
    assert first is not None and second is not None
    assert first.outcome is None and second.outcome is None  # both wait for the same spare
    world.check_limit()
    a.frozen = False
    world.service.settle([a.leases.recall()], a.secret)  # the recall it heard late
    world.pump()
    world.check_limit()
    outcomes = [first.outcome, second.outcome]
    assert sum(isinstance(o, Grant) for o in outcomes) == 1
    world.advance(RECALL_GRACE_S)
    assert sum(isinstance(o, Grant) for o in (first.outcome, second.outcome)) == 1
    assert sum(isinstance(o, FailedReservation) for o in (first.outcome, second.outcome)) == 1
    assert world.in_use() == LIMIT
    world.check_limit()


# ========================================================================= shorter wait limits


def test_a_wait_limit_shorter_than_the_grace_caps_it() -> None:
    world = World(slow_rate(wait_limit_s=0.2))  # the estimate (5 s) is beyond it
    a = leave_spare(world)
    a.frozen = True
    b = world.proc("B")
    start = world.clock.now
    ticket = b.reserve(LIMIT - 30)
    assert ticket is not None and ticket.outcome is None, "it did not wait for the recall"
    world.advance(0.2)
    assert isinstance(ticket.outcome, FailedReservation)
    assert world.clock.now - start == pytest.approx(0.2)


def test_a_wait_limit_the_pool_cannot_meet_is_met_with_recalled_spare() -> None:
    world = World(slow_rate(wait_limit_s=2.0))  # 5 units short: 5 s at one a second
    leave_spare(world)
    ticket = world.proc("B").reserve(LIMIT - 30)
    assert ticket is not None and isinstance(ticket.outcome, Grant)
    world.check_limit()


@pytest.mark.parametrize("how", ["wait_limit 0s", "timeout 0"])
def test_no_wait_at_all_means_no_grace(how: str) -> None:
    for no_wait in (True, False):  # the same request, with no wait limit nor timeout, waits
        wait_limit = 0.0 if no_wait and how == "wait_limit 0s" else None
        timeout = 0.0 if no_wait and how == "timeout 0" else None
        world = World(budget(wait_limit_s=wait_limit))
        leave_spare(world).frozen = True
        ticket = world.proc("B").reserve(LIMIT - 30, timeout=timeout)
        assert ticket is not None
        assert isinstance(ticket.outcome, FailedReservation) is no_wait
        assert bool(world.recalls) is not no_wait


def test_a_short_timeout_caps_the_grace() -> None:
    world = World(budget())
    leave_spare(world).frozen = True
    ticket = world.proc("B").reserve(LIMIT - 30, timeout=0.1)
    assert ticket is not None and ticket.outcome is None
    world.advance(0.1)
    assert isinstance(ticket.outcome, FailedReservation)
