"""Random interleavings of every scheduler call, checked against our own record of grants."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import dataclass

import pytest
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
    ACQUIRE,
    CAP_SPEC,
    CONC_SPEC,
    HOLDERS,
    MACHINE_POLICY,
    RATE_SPEC,
    SPECS,
    Ledger,
    orphans_due,
)
from scheduler_world import ME

from ray_quota._core.protocol import Grant
from ray_quota._core.scheduler import Scheduler, Ticket
from ray_quota._errors import (
    FailedReservation,
    IncompatibleTokensError,
    InvalidAmountError,
    LeaseEndedError,
    QuotaTerminated,
    TokenClosedError,
    TokenStateError,
)
from ray_quota._spec import Enforcement


@dataclass(eq=False)
class ModelLease:
    resource: str
    units: int
    expires_at: float


@dataclass(eq=False)
class Reservation:
    token: str
    holder: str
    resource: str
    amount: int
    lease: ModelLease


class SchedulerMachine(RuleBasedStateMachine):
    """Random interleavings of every call, checked against our own record of grants."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        ids = itertools.count()
        # Ids in creation order keep each example reproducible (hypothesis replays them).
        self.sched = Scheduler(SPECS, clock=self.clock, policy=MACHINE_POLICY,
                               new_id=lambda: f"token-{next(ids)}")
        self.ledgers = {name: Ledger(spec) for name, spec in SPECS.items()}
        self.live: dict[str, str] = {}  # token -> resource
        self.expected_use: dict[str, int] = {}
        self.closed: list[str] = []
        self.pending: list[tuple[Ticket, str, float]] = []  # ticket, resource, deadline
        self.leases: dict[tuple[str, str], ModelLease] = {}
        self.open: list[Reservation] = []
        self.outcomes: dict[int, object] = {}
        # Lease keys: a process uses one key per token until that lease ends, then a new one.
        self.epoch: dict[tuple[str, str], int] = defaultdict(int)
        self.ended: set[tuple[str, str]] = set()
        self.orphans: dict[str, float] = {}  # token whose leases all expired -> earliest release
        self.born: dict[str, float] = {}  # token -> when it was opened
        self.parents: dict[str, str] = {}  # split child -> the token it was split from

    # ------------------------------------------------------------------ helpers

    @property
    def now(self) -> float:
        return self.clock.now

    def pick(self, items: list, index: int):
        return items[index % len(items)]

    def key(self, token: str, process: str) -> str:
        return f"{process}.{self.epoch[(token, process)]}"

    def waiting_of(self, token: str) -> list[Ticket]:
        return [t for t, _, _ in self.pending if t.token_id == token]

    def collect(self) -> None:
        """Record what the scheduler resolved since the last call, at the current time."""
        still = []
        for ticket, resource, deadline in self.pending:
            outcome = ticket.outcome
            if outcome is None:
                still.append((ticket, resource, deadline))
                continue
            self.outcomes[ticket.id] = outcome
            event(f"{resource}: {type(outcome).__name__}")
            if isinstance(outcome, Grant):
                assert ticket.amount <= outcome.units
                if outcome.units > ticket.amount:
                    event("grant with prefetch")
                self.ledgers[resource].grant(self.now, outcome.units)
                key = (ticket.token_id, ticket.key)
                lease = self.leases.get(key)
                if lease is None:
                    lease = self.leases[key] = ModelLease(resource, 0, 0.0)
                lease.units += outcome.units
                lease.expires_at = self.now + MACHINE_POLICY.lease_ttl_s
                self.open.append(Reservation(ticket.token_id, ticket.key, resource,
                                             ticket.amount, lease))
            elif isinstance(outcome, TokenClosedError):
                assert ticket.token_id not in self.live
            elif isinstance(outcome, QuotaTerminated):
                assert SPECS[resource].enforcement is Enforcement.TERMINATE
            elif isinstance(outcome, FailedReservation):
                spec = SPECS[resource]
                assert spec.enforcement is not Enforcement.TERMINATE
                if spec.enforcement is Enforcement.THROTTLE:
                    assert self.now >= deadline, "a throttled request failed before its timeout"
            elif not isinstance(outcome, TokenStateError):  # cancelled
                pytest.fail(f"unexpected outcome {outcome!r}")
        self.pending = still

    def settle(self, token: str, holder: str, units: int = 0, used: int = 0,
               debt: int = 0) -> None:
        """give_back, mirrored in our own record with the documented semantics."""
        lease = self.leases.get((token, holder))
        resource = lease.resource if lease else self.live.get(token)
        self.sched.give_back(token, holder, units, used=used, debt=debt)
        if lease is not None and (units or used):
            used = min(used, lease.units)
            units = min(units, lease.units - used)
            lease.units -= units + used
            self.ledgers[lease.resource].give_back(self.now, units)
            # An emptied lease stays until it expires: its holder may still settle against it.
        if resource is not None:
            self.ledgers[resource].charge(self.now, debt)
        self.collect()

    def poll(self) -> None:
        resolved = self.sched.poll()
        assert all(t.outcome is not None for t in resolved)
        fresh: dict[tuple[str, str], int] = defaultdict(int)  # units granted by this poll
        expired: set[str] = set()
        for ticket, _, _ in self.pending:
            if isinstance(ticket.outcome, Grant):
                fresh[(ticket.token_id, ticket.key)] += ticket.outcome.units
        for key, lease in list(self.leases.items()):
            if lease.expires_at > self.now:
                continue
            if fresh[key] and self.sched.held(*key) == lease.units + fresh[key]:
                # poll granted into the lease before it looked at expiries: the grant renewed it.
                event("lease renewed by a grant at its expiry")
                continue
            del self.leases[key]
            expired.add(key[0])
            self.ended.add(key)
            process = key[1].split(".")[0]
            if self.key(key[0], process) == key[1]:
                self.epoch[(key[0], process)] += 1
            event(f"{lease.resource}: lease expired")
            if lease.resource == "conc":
                self.ledgers["conc"].give_back(self.now, lease.units)
        self.collect()
        released = orphans_due(self.orphans, expired, self.now, set(self.live),
                               lambda t: any(key[0] == t for key in self.leases),
                               lambda t: bool(self.waiting_of(t)),
                               lambda t: self.sched.token_key(t) is None, self.born)
        for token in released:
            event("token released, unused for a grace")
            del self.live[token]
            self.closed.append(token)
            # A split child's expected use goes back to its parent, if that is live.
            parent = self.parents.pop(token, None)
            if parent in self.live:
                self.expected_use[parent] += self.expected_use[token]

    # -------------------------------------------------------------------- rules

    @initialize(weights=st.lists(st.integers(1, 30), min_size=3, max_size=6))
    def some_tokens(self, weights: list[int]) -> None:
        for i, weight in enumerate(weights):
            self.open_token(sorted(SPECS)[i % len(SPECS)], weight)

    @rule(resource=st.sampled_from(sorted(SPECS)), expected_use=st.integers(1, 30))
    def open_token(self, resource: str, expected_use: int) -> None:
        token = self.sched.open_token(resource, expected_use, claimant=ME).id
        assert token not in self.live and token not in self.closed
        self.live[token] = resource
        self.born[token] = self.now
        self.expected_use[token] = expected_use

    def _acquire(self, index: int, process: str, share: int, prefetch: int,
                 timeout: float | None) -> None:
        token = self.pick(list(self.live), index)
        holder = self.key(token, process)
        resource = self.live[token]
        spec = SPECS[resource]
        amount = max(1, math.ceil(share / 100 * spec.ceiling))
        if self.expected_use[token] == 0:
            with pytest.raises(TokenStateError):
                self.sched.acquire(token, 0, ME, holder, amount)
            return
        ticket = self.sched.acquire(token, 0, ME, holder, amount, prefetch=prefetch,
                                    timeout=timeout)
        wait = math.inf if spec.wait_limit_s is None else spec.wait_limit_s
        if timeout is not None:
            wait = min(wait, timeout)
        self.pending.append((ticket, resource, self.now + wait))
        self.collect()

    @precondition(lambda self: self.live)
    @rule(**ACQUIRE)
    def acquire(self, index: int, holder: str, share: int, prefetch: int,
                timeout: float | None) -> None:
        self._acquire(index, holder, share, prefetch, timeout)

    @precondition(lambda self: self.live)
    @rule(requests=st.lists(st.tuples(*ACQUIRE.values()), min_size=2, max_size=6))
    def acquire_many(self, requests: list[tuple[int, str, int, int, float | None]]) -> None:
        for request in requests:
            self._acquire(*request)

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 10**6), amount=st.sampled_from([0, -1, 2.0, True, "many"])
          | st.integers(1, 10).map(lambda k: -k))
    def acquire_bad_amount(self, index: int, amount: object) -> None:
        token = self.pick(list(self.live), index)
        if isinstance(amount, int) and not isinstance(amount, bool) and amount < 0:
            amount = SPECS[self.live[token]].ceiling - amount  # just above the ceiling
        before = (self.sched.status(), self.sched.credit(token))
        with pytest.raises(InvalidAmountError):
            self.sched.acquire(token, 0, ME, "h1", amount)  # type: ignore[arg-type]
        assert (self.sched.status(), self.sched.credit(token)) == before

    @precondition(lambda self: self.open)
    @rule(commits=st.lists(st.tuples(st.integers(0, 10**6),
                                     st.sampled_from(["under", "exact", "over"]),
                                     st.integers(1, 8), st.booleans()), min_size=2, max_size=6))
    def commit_many(self, commits: list[tuple[int, str, int, bool]]) -> None:
        for args in commits:
            if self.open:
                self.commit(*args)

    @precondition(lambda self: self.open)
    @rule(index=st.integers(0, 10**6), how=st.sampled_from(["under", "exact", "over"]),
          by=st.integers(1, 8), keep_spare=st.booleans())
    def commit(self, index: int, how: str, by: int, keep_spare: bool) -> None:
        reservation = self.open.pop(index % len(self.open))
        amount = reservation.amount
        used = {"under": max(0, amount - by), "exact": amount, "over": amount + by}[how]
        token, holder = reservation.token, reservation.holder
        if self.leases.get((token, holder)) is not reservation.lease:
            # The lease expired under this reservation: only the overuse is left to declare.
            self.settle(token, holder, debt=max(0, used - amount))
            return
        if reservation.resource == "conc":
            self.settle(token, holder, 0 if keep_spare else amount, debt=max(0, used - amount))
        elif used <= amount:
            self.settle(token, holder, 0 if keep_spare else amount - used, used=used)
        else:
            self.settle(token, holder, used=amount, debt=used - amount)

    @precondition(lambda self: self.leases)
    @rule(index=st.integers(0, 10**6), units=st.integers(1, 30))
    def give_back_spare(self, index: int, units: int) -> None:
        key = self.pick(list(self.leases), index)
        lease = self.leases[key]
        reserved = sum(r.amount for r in self.open if r.lease is lease)
        spare = lease.units - reserved
        if spare > 0:
            self.settle(*key, min(units, spare))

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 10**6), debt=st.integers(1, 20))
    def declare_debt(self, index: int, debt: int) -> None:
        token = self.pick(list(self.live), index)
        self.settle(token, self.pick(list(HOLDERS), index), debt=debt)

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 10**6), child=st.integers(1, 32))
    def split(self, index: int, child: int) -> None:
        token = self.pick(list(self.live), index)
        eu = self.expected_use[token]
        before = self.sched.credit(token)
        status = self.sched.status()
        if child > eu or (child == eu and self.waiting_of(token)):
            with pytest.raises((InvalidAmountError, TokenStateError)):
                self.sched.split(token, 0, ME, child)
            assert self.sched.credit(token) == before
            assert self.sched.status() == status
            return
        new = self.sched.split(token, 0, ME, child).id
        self.live[new] = self.live[token]
        self.born[new] = self.now
        self.expected_use[new] = child
        self.expected_use[token] = eu - child
        self.parents[new] = token
        after = self.sched.credit(token) + self.sched.credit(new)
        assert after == pytest.approx(before, abs=1e-6 * (1 + abs(before)))

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 10**6), j=st.integers(0, 10**6))
    def merge(self, i: int, j: int) -> None:
        tokens = list(self.live)
        a, b = self.pick(tokens, i), self.pick(tokens, j)
        credits = {t: self.sched.credit(t) for t in {a, b}}
        status = self.sched.status()
        if a == b or self.live[a] != self.live[b]:
            with pytest.raises(IncompatibleTokensError):
                self.sched.merge(a, 0, ME, b, 0)
        elif self.waiting_of(b):
            with pytest.raises(TokenStateError):
                self.sched.merge(a, 0, ME, b, 0)
        else:
            self.sched.merge(a, 0, ME, b, 0)
            del self.live[b]
            self.closed.append(b)
            self.expected_use[a] += self.expected_use.pop(b)
            # The merge may let a's waiting request through at once: that grant costs credit.
            spent = sum(t.outcome.units for t, _, _ in self.pending
                        if t.token_id == a and isinstance(t.outcome, Grant))
            total = credits[a] + credits[b] - spent
            assert self.sched.credit(a) == pytest.approx(total, abs=1e-6 * (1 + abs(total)))
            self.collect()
            return
        assert {t: self.sched.credit(t) for t in {a, b}} == credits
        assert self.sched.status() == status

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 10**6))
    def close(self, index: int) -> None:
        token = self.pick(list(self.live), index)
        self.sched.close_token(token, 0, ME)
        del self.live[token]
        self.closed.append(token)
        self.collect()
        assert not self.waiting_of(token)

    @precondition(lambda self: self.pending)
    @rule(index=st.integers(0, 10**6))
    def cancel(self, index: int) -> None:
        ticket = self.pick(self.pending, index)[0]
        self.sched.cancel(ticket)
        self.collect()

    @rule(process=st.sampled_from(HOLDERS))
    def renew(self, process: str) -> None:
        keys = {h for (_, h) in self.leases if h.split(".")[0] == process}
        for holder in sorted(keys):
            answer = self.sched.renew(holder)
            mine = {token for (token, h) in self.leases if h == holder}
            assert set(answer) == mine, (self.now, answer, self.leases)
            for token in mine:
                self.leases[(token, holder)].expires_at = self.now + MACHINE_POLICY.lease_ttl_s

    @precondition(lambda self: any(token in self.live for token, _ in self.ended))
    @rule(index=st.integers(0, 10**6))
    def acquire_under_an_ended_key(self, index: int) -> None:
        token, holder = self.pick(sorted(k for k in self.ended if k[0] in self.live), index)
        if (token, holder) in self.leases or self.expected_use[token] == 0:
            return  # a waiting request re-opened it, or the token cannot ask at all
        before = (self.sched.status(), self.sched.credit(token))
        with pytest.raises(LeaseEndedError):
            self.sched.acquire(token, 0, ME, holder, 1)
        assert (self.sched.status(), self.sched.credit(token)) == before

    @rule(dt=st.sampled_from([0.0, 0.05, 0.25, 0.5, 1.0, 2.0, 4.0, 7.5]))
    def advance(self, dt: float) -> None:
        self.clock.advance(dt)
        self.poll()

    @rule()
    def advance_to_wakeup(self) -> None:
        wakeup = self.sched.next_wakeup()
        if wakeup is not None:
            self.clock.set(max(self.now, wakeup))
        self.poll()

    # --------------------------------------------------------------- invariants

    @invariant()
    def leases_agree_with_our_record(self) -> None:
        for (token, holder), lease in self.leases.items():
            assert self.sched.held(token, holder) == lease.units
        for status in self.sched.status():
            mine = [lease for lease in self.leases.values() if lease.resource == status.name]
            assert status.leases == sum(1 for lease in mine if lease.units)
            assert status.leased_units == sum(lease.units for lease in mine)

    @invariant()
    def concurrency_slots_never_exceed_the_limit(self) -> None:
        held = sum(lease.units for lease in self.leases.values() if lease.resource == "conc")
        ledger = self.ledgers["conc"]
        assert ledger.granted - ledger.returned == held
        assert held <= CONC_SPEC.value

    @invariant()
    def capacity_is_never_overspent(self) -> None:
        ledger = self.ledgers["cap"]
        assert ledger.granted - ledger.returned <= CAP_SPEC.value
        spent = ledger.granted - ledger.returned + ledger.debt
        assert self.sched.pool("cap").in_use(self.now) == spent

    @invariant()
    def waiters_and_tokens_agree(self) -> None:
        for status in self.sched.status():
            assert status.waiters == sum(1 for _, r, _ in self.pending if r == status.name)
            assert status.tokens == sum(1 for r in self.live.values() if r == status.name)

    @invariant()
    def nobody_waits_while_every_waiter_fits(self) -> None:
        for status in self.sched.status():
            amounts = [t.amount for t, r, _ in self.pending if r == status.name]
            if amounts:
                assert max(amounts) > status.available, "waiters left while all of them fit"

    @invariant()
    def outcomes_never_change(self) -> None:
        for ticket, _, _ in self.pending:
            assert ticket.id not in self.outcomes

    def teardown(self) -> None:
        # Drain: close every token, settle every reservation, let the leases expire.
        for token in list(self.live):
            self.close(list(self.live).index(token))
        while self.open:
            self.commit(0, "exact", 1, False)
        self.clock.advance(MACHINE_POLICY.lease_ttl_s)
        self.poll()
        assert not self.pending and not self.leases, (self.pending, self.leases)
        by_name = {s.name: s for s in self.sched.status()}
        assert by_name["conc"].available == CONC_SPEC.value  # every slot came back
        assert by_name["conc"].waiters == by_name["rate"].waiters == by_name["cap"].waiters == 0
        owed = RATE_SPEC.burst + self.ledgers["rate"].debt  # the most the bucket can lack
        self.clock.advance(owed / RATE_SPEC.refill_per_s + 1)
        assert self.sched.pool("rate").available(self.now) == RATE_SPEC.burst
        fresh = self.sched.open_token("conc", 1, claimant=ME).id
        assert isinstance(self.sched.acquire(fresh, 0, ME, "h9", CONC_SPEC.value).outcome, Grant)


SchedulerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_random_interleavings_keep_every_limit = SchedulerMachine.TestCase
