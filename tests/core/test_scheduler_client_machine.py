"""Random interleavings through local leases: processes reserve, settle and renew through the
real LeaseSet as the Ray layer does, and what they really use never exceeds a limit.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import dataclass

from fakes import FakeClock
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from scheduler_model import (
    CAP_SPEC,
    CONC_SPEC,
    MACHINE_POLICY,
    SPECS,
    Ledger,
    orphans_due,
)
from scheduler_world import ME

from ray_quota._core.holder import LeaseSet, LocalLease
from ray_quota._core.protocol import TRUST, Grant, LeaseAnswer, Renewed, Report
from ray_quota._core.scheduler import Scheduler, Ticket
from ray_quota._errors import (
    FailedReservation,
    LeaseEndedError,
)
from ray_quota._spec import Enforcement, Kind

# ====================================================== random interleavings through local leases


PROCS = ("p1", "p2")


@dataclass(eq=False)
class Mirror:
    """Our own record of one executor lease: units, expiry and the totals it has applied."""

    resource: str
    units: int = 0
    expires_at: float = 0.0
    returned: int = 0
    used: int = 0
    debt: int = 0
    handle: object = None  # the scheduler's lease object, only to tell a renewal from a new lease


@dataclass(eq=False)
class Open:
    token: str
    resource: str
    leases: LeaseSet
    lease: LocalLease
    amount: int
    backing: Mirror  # the executor lease it was served from


@dataclass(eq=False)
class Pending:
    """A request waiting at the scheduler, under ``lease`` of ``leases``."""

    ticket: Ticket
    leases: LeaseSet
    lease: LocalLease
    sent_at: float
    resource: str
    deadline: float


class ClientMachine(RuleBasedStateMachine):
    """Processes that reserve, settle running totals and renew through the real LeaseSet, as
    ``QuotaToken`` and the renewer do, against one scheduler. Checked end to end against our
    own records: what the processes really use never exceeds a limit, and every slot comes back
    once they are idle."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        ids = itertools.count()
        self.sched = Scheduler(SPECS, clock=self.clock, policy=MACHINE_POLICY,
                               new_id=lambda: f"token-{next(ids)}")
        self.keys = itertools.count()
        self.ledgers = {name: Ledger(spec) for name, spec in SPECS.items()}
        self.live: dict[str, str] = {}
        self.sets: dict[tuple[str, str], LeaseSet] = {}  # one per token and process
        self.every_lease: dict[int, tuple[str, LocalLease]] = {}  # by id: every lease reserved on
        self.mirror: dict[tuple[str, str], Mirror] = {}
        self.pending: list[Pending] = []
        self.open: list[Open] = []
        self.used: dict[str, int] = defaultdict(int)  # units really used, per resource
        self.trusted_until: dict[int, float] = {}  # per LocalLease (by id): its trust horizon
        self.orphans: dict[str, float] = {}
        self.born: dict[str, float] = {}  # token -> when it was opened

    @property
    def now(self) -> float:
        return self.clock.now

    def leases_of(self, token: str, proc: str) -> LeaseSet:
        leases = self.sets.get((token, proc))
        if leases is None:
            spec = SPECS[self.live[token]]
            cap = 0 if spec.kind is Kind.CONCURRENCY else max(1, spec.ceiling // 4)
            leases = LeaseSet(token, spec.kind, max_prefetch=cap,
                              new_key=lambda: f"{proc}:{next(self.keys)}")
            self.sets[(token, proc)] = leases
        return leases

    def find(self, key: str) -> tuple[str, LeaseSet] | None:
        for (token, _), leases in self.sets.items():
            if any(lease.key == key for lease in leases):
                return token, leases
        return None

    def asked_under(self, lease: LocalLease) -> bool:
        return any(p.lease is lease for p in self.pending)

    def untrusted(self, lease: LocalLease) -> bool:
        """By our record, the lease may have expired at the executor, and no request waits
        under it: retire it (settled as final once idle, as after a lost answer)."""
        return (lease.active and self.now >= self.trusted_until[id(lease)]
                and not self.asked_under(lease))

    def collect(self) -> None:
        still = []
        for pending in self.pending:
            ticket, outcome = pending.ticket, pending.ticket.outcome
            if outcome is None:
                still.append(pending)
                continue
            event(f"client {pending.resource}: {type(outcome).__name__}")
            if isinstance(outcome, Grant):
                self.ledgers[pending.resource].grant(self.now, outcome.units)
                key = (ticket.token_id, pending.lease.key)
                mirror = self.mirror.get(key)
                if mirror is None:
                    mirror = self.mirror[key] = Mirror(pending.resource)
                    mirror.handle = self.sched._leases.get(key)
                mirror.units += outcome.units
                mirror.expires_at = self.now + MACHINE_POLICY.lease_ttl_s
                # Never settled as final while a request waits under it (see untrusted, close).
                assert pending.leases.granted(pending.lease, ticket.amount, outcome,
                                              sent_at=pending.sent_at)
                self.trusted_until[id(pending.lease)] = (pending.sent_at
                                                         + outcome.ttl_s * TRUST)
                self.open.append(Open(ticket.token_id, pending.resource, pending.leases,
                                      pending.lease, ticket.amount, mirror))
            elif isinstance(outcome, FailedReservation) and \
                    SPECS[pending.resource].enforcement is Enforcement.THROTTLE:
                assert self.now >= pending.deadline  # a throttled request fails at its timeout
        self.pending = still

    def send(self, report: Report) -> None:
        token, key = report.token_id, report.key
        self.sched.settle(token, key, report.returned, report.used, report.debt,
                          final=report.final)
        mirror = self.mirror.get((token, key))
        if mirror is not None:
            fresh_returned = max(0, report.returned - mirror.returned)
            fresh_used = max(0, report.used - mirror.used)
            fresh_debt = max(0, report.debt - mirror.debt)
            mirror.returned += fresh_returned
            mirror.used += fresh_used
            mirror.debt += fresh_debt
            used = min(fresh_used, mirror.units)
            returned = min(fresh_returned, mirror.units - used)
            mirror.units -= used + returned
            ledger = self.ledgers[mirror.resource]
            ledger.give_back(self.now, returned)
            ledger.charge(self.now, fresh_debt)
            if report.final:
                ledger.give_back(self.now, mirror.units)
                del self.mirror[(token, key)]
        self.collect()

    def poll(self) -> None:
        self.sched.poll()
        fresh: dict[tuple[str, str], int] = defaultdict(int)
        expired: set[str] = set()
        for pending in self.pending:
            if isinstance(pending.ticket.outcome, Grant):
                fresh[(pending.ticket.token_id, pending.lease.key)] += \
                    pending.ticket.outcome.units
        for key, mirror in list(self.mirror.items()):
            if mirror.expires_at > self.now:
                continue
            if fresh[key] and self.sched._leases.get(key) is mirror.handle:
                continue  # poll granted into it before it looked at expiries: renewed
            del self.mirror[key]
            expired.add(key[0])
            event("client: lease expired")
            if mirror.resource == "conc":
                self.ledgers["conc"].give_back(self.now, mirror.units)
        self.collect()
        released = orphans_due(self.orphans, expired, self.now, set(self.live),
                               lambda t: any(key[0] == t for key in self.mirror),
                               lambda t: any(p.ticket.token_id == t for p in self.pending),
                               lambda t: self.sched.token_key(t) is None, self.born)
        for token in released:  # its processes are presumed gone
            event("client: token released, unused for a grace")
            del self.live[token]

    # ------------------------------------------------------------------------------- rules

    @initialize(weights=st.lists(st.integers(1, 30), min_size=3, max_size=6))
    def some_tokens(self, weights: list[int]) -> None:
        for i, weight in enumerate(weights):
            resource = sorted(SPECS)[i % len(SPECS)]
            token = self.sched.open_token(resource, weight, claimant=ME).id
            self.live[token], self.born[token] = resource, self.now

    @precondition(lambda self: self.live)
    @rule(requests=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(PROCS),
                                      st.integers(1, 100),
                                      st.none() | st.sampled_from([0.0, 1.0, 3.0])),
                            min_size=1, max_size=5))
    def reserve(self, requests: list[tuple[int, str, int, float | None]]) -> None:
        for index, proc, share, timeout in requests:
            token = list(self.live)[index % len(self.live)]
            resource = self.live[token]
            spec = SPECS[resource]
            amount = max(1, math.ceil(share / 100 * spec.ceiling))
            leases = self.leases_of(token, proc)
            if self.untrusted(leases.current):
                # Never mix the old lease's state into a new one under the same key.
                event("client: retired an untrusted lease")
                leases.lost(leases.current)
            served = leases.take(amount, self.now)
            if served is not None:
                event("client: served locally")
                backing = self.mirror.get((token, served.key))
                assert backing is not None, "served from a lease the executor no longer has"
                self.every_lease[id(served)] = (resource, served)
                self.open.append(Open(token, resource, leases, served, amount, backing))
                continue
            lease = leases.current
            try:
                ticket = self.sched.acquire(token, 0, ME, lease.key, amount,
                                            prefetch=lease.prefetch(), timeout=timeout)
            except LeaseEndedError:  # the executor ended it: go on under a new key
                event("client: lease ended, new key")
                leases.ended(lease)
                lease = leases.current
                ticket = self.sched.acquire(token, 0, ME, lease.key, amount,
                                            prefetch=lease.prefetch(), timeout=timeout)
            self.every_lease[id(lease)] = (resource, lease)
            wait = math.inf if spec.wait_limit_s is None else spec.wait_limit_s
            if timeout is not None:
                wait = min(wait, timeout)
            self.pending.append(Pending(ticket, leases, lease, self.now, resource,
                                        self.now + wait))
            self.collect()

    @precondition(lambda self: self.open)
    @rule(commits=st.lists(st.tuples(st.integers(0, 10**6),
                                     st.sampled_from(["under", "exact", "over"]),
                                     st.integers(1, 8)), min_size=1, max_size=5))
    def commit(self, commits: list[tuple[int, str, int]]) -> None:
        for index, how, by in commits:
            if not self.open:
                return
            reservation = self.open.pop(index % len(self.open))
            amount = reservation.amount
            used = {"under": max(0, amount - by), "exact": amount, "over": amount + by}[how]
            if reservation.resource != "conc":
                self.used[reservation.resource] += used
            report = reservation.leases.settle(reservation.lease, amount, used)
            if report is not None:
                self.send(report)

    @rule(proc=st.sampled_from(PROCS), keep_spare=st.booleans())
    def renew(self, proc: str, keep_spare: bool) -> None:
        """The renewer's turn for ``proc``: report every lease, renew the live ones at the
        scheduler as the executor's renew does, and hand the answer to the lease set."""
        ttl = MACHINE_POLICY.lease_ttl_s
        for (token, p), leases in list(self.sets.items()):
            if p != proc:
                continue
            current = leases.current
            if self.untrusted(current):
                # Renewing too late: retire the lease (settled as final once idle).
                event("client: retired a lease renewed too late")
                leases.lost(current)
            elif not keep_spare:
                current.let_go()  # give every spare unit back with this renewal
            reports = leases.reports(self.now, live=True)
            for report in reports:
                self.send(report)
            alive: Renewed = {}
            for report in reports:
                if report.final:
                    continue
                contended = self.sched.renew_lease(token, report.key)
                mirror = self.mirror.get((token, report.key))
                assert (contended is None) == (mirror is None)
                if contended is not None:
                    assert mirror is not None
                    mirror.expires_at = self.now + ttl
                    alive[(token, report.key)] = LeaseAnswer(contended, ttl)
            for lease in leases:
                if (token, lease.key) in alive:
                    self.trusted_until[id(lease)] = self.now + ttl * TRUST
            current = leases.current
            leases.renewed(alive, sent_at=self.now)
            if leases.current is not current:
                event("client: lease expired, new key")

    @rule()
    def recalls(self) -> None:
        for key, tokens in self.sched.take_recalls().items():
            found = self.find(key)
            if found is None or found[0] not in tokens:
                continue
            report = found[1].recall()
            if report is not None:
                event("client: recalled spare units")
                self.send(report)

    @precondition(lambda self: len(self.live) > 1)
    @rule(index=st.integers(0, 10**6))
    def close(self, index: int) -> None:
        token = list(self.live)[index % len(self.live)]
        if any(p.ticket.token_id == token for p in self.pending):
            return  # closing under a waiting request races the final settle: tested apart
        for reservation in [r for r in self.open if r.token == token]:
            self.open.remove(reservation)  # the handle is gone: used in full
            if reservation.resource != "conc":
                self.used[reservation.resource] += reservation.amount
        for (t, p), leases in list(self.sets.items()):
            if t == token:
                for report in leases.final_reports():
                    self.send(report)
                del self.sets[(t, p)]
        self.sched.close_token(token, 0, ME)
        del self.live[token]
        self.collect()

    @rule(dt=st.sampled_from([0.05, 0.25, 0.5, 1.0, 2.0, 3.5, 5.0]))
    def advance(self, dt: float) -> None:
        self.clock.advance(dt)
        self.poll()

    @rule()
    def advance_to_wakeup(self) -> None:
        wakeup = self.sched.next_wakeup()
        if wakeup is not None:
            self.clock.set(max(self.now, wakeup))
        self.poll()

    # -------------------------------------------------------------------------- invariants

    @invariant()
    def executor_leases_agree_with_our_record(self) -> None:
        for (token, key), mirror in self.mirror.items():
            assert self.sched.held(token, key) == mirror.units, (token, key)

    @invariant()
    def slots_in_use_never_exceed_the_limit(self) -> None:
        # A holder that stopped renewing is presumed dead when its lease expires: its slots are
        # freed, so only reservations on leases the executor still has are counted.
        in_use = sum(r.amount for r in self.open if r.resource == "conc"
                     and self.mirror.get((r.token, r.lease.key)) is r.backing)
        assert in_use <= CONC_SPEC.value
        ledger = self.ledgers["conc"]
        assert ledger.granted - ledger.returned <= CONC_SPEC.value

    @invariant()
    def budget_really_used_never_exceeds_the_limit(self) -> None:
        # What processes used or may still use, less the overuse they declared as debt.
        declared = sum(lease.totals().debt for r, lease in self.every_lease.values()
                       if r == "cap")
        may_use = sum(r.amount for r in self.open if r.resource == "cap")
        assert self.used["cap"] - declared + may_use <= CAP_SPEC.value

    @invariant()
    def waiters_agree(self) -> None:
        for status in self.sched.status():
            assert status.waiters == sum(1 for p in self.pending if p.resource == status.name)

    def teardown(self) -> None:
        # The processes finish their work and stay alive, renewing now and then.
        for _ in range(60):
            if not self.open and not self.pending:
                break
            self.commit([(0, "exact", 1)] * len(self.open))
            self.clock.advance(1.0)
            self.poll()
            self.recalls()
            for proc in PROCS:
                self.renew(proc, True)
        assert not self.open and not self.pending
        for _ in range(3):  # idle renewals: every spare unit goes back
            self.clock.advance(1.0)
            self.poll()
            for proc in PROCS:
                self.renew(proc, True)
        conc = next(s for s in self.sched.status() if s.name == "conc")
        assert conc.available == CONC_SPEC.value, "slots stayed leased to idle processes"


ClientMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_random_interleavings_through_local_leases_keep_every_limit = ClientMachine.TestCase
