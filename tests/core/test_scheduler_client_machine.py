"""Random interleavings through local leases: processes reserve, settle and renew as the Ray
layer does, and what they really use never exceeds a limit.
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

from ray_quota._core.holder import LocalLease
from ray_quota._core.protocol import TRUST, Grant
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
    lease: LocalLease
    amount: int
    backing: Mirror  # the executor lease it was served from

class ClientMachine(RuleBasedStateMachine):
    """Processes that reserve through LocalLeases, settle running totals and renew, as the Ray
    layer does, against one scheduler. Checked end to end: what the processes really use never
    exceeds a limit, and every slot comes back once they are idle."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        ids = itertools.count()
        self.sched = Scheduler(SPECS, clock=self.clock, policy=MACHINE_POLICY,
                               new_id=lambda: f"token-{next(ids)}")
        self.keys = itertools.count()
        self.ledgers = {name: Ledger(spec) for name, spec in SPECS.items()}
        self.live: dict[str, str] = {}
        self.local: dict[tuple[str, str], LocalLease] = {}
        self.retired: list[tuple[str, LocalLease]] = []  # superseded leases with open reservations
        self.every_lease: list[tuple[str, LocalLease]] = []
        self.mirror: dict[tuple[str, str], Mirror] = {}
        self.pending: list[tuple[Ticket, LocalLease, float, str, float]] = []
        self.open: list[Open] = []
        self.used: dict[str, int] = defaultdict(int)  # units really used, per resource
        self.trusted_until: dict[int, float] = {}  # per LocalLease (by id): its trust horizon
        self.orphans: dict[str, float] = {}

    @property
    def now(self) -> float:
        return self.clock.now

    def lease_of(self, token: str, proc: str) -> LocalLease:
        lease = self.local.get((token, proc))
        if lease is None:
            spec = SPECS[self.live[token]]
            cap = 0 if spec.kind is Kind.CONCURRENCY else max(1, spec.ceiling // 4)
            lease = LocalLease(spec.kind, key=f"{proc}:{next(self.keys)}", max_prefetch=cap)
            self.local[(token, proc)] = lease
            self.every_lease.append((self.live[token], lease))
        return lease

    def find(self, key: str) -> tuple[str, LocalLease] | None:
        for (token, _), lease in self.local.items():
            if lease.key == key:
                return token, lease
        for token, lease in self.retired:
            if lease.key == key:
                return token, lease
        return None

    # ---------------------------------------------------- the executor's side, as we expect it

    def collect(self) -> None:
        still = []
        for ticket, lease, sent_at, resource, deadline in self.pending:
            outcome = ticket.outcome
            if outcome is None:
                still.append((ticket, lease, sent_at, resource, deadline))
                continue
            event(f"client {resource}: {type(outcome).__name__}")
            if isinstance(outcome, Grant):
                self.ledgers[resource].grant(self.now, outcome.units)
                key = (ticket.token_id, lease.key)
                mirror = self.mirror.get(key)
                if mirror is None:
                    mirror = self.mirror[key] = Mirror(resource)
                    mirror.handle = self.sched._leases.get(key)
                mirror.units += outcome.units
                mirror.expires_at = self.now + MACHINE_POLICY.lease_ttl_s
                lease.granted(ticket.amount, units=outcome.units, sent_at=sent_at,
                              ttl_s=outcome.ttl_s, contended=outcome.contended)
                self.trusted_until[id(lease)] = sent_at + outcome.ttl_s * TRUST
                self.open.append(Open(ticket.token_id, resource, lease, ticket.amount, mirror))
            elif isinstance(outcome, FailedReservation) and \
                    SPECS[resource].enforcement is Enforcement.THROTTLE:
                assert self.now >= deadline  # a throttled request fails only at its timeout
        self.pending = still

    def send(self, token: str, lease: LocalLease, *, final: bool = False) -> None:
        totals = lease.totals()
        self.sched.settle(token, lease.key, totals.returned, totals.used, totals.debt,
                          final=final)
        mirror = self.mirror.get((token, lease.key))
        if mirror is not None:
            fresh_returned = max(0, totals.returned - mirror.returned)
            fresh_used = max(0, totals.used - mirror.used)
            fresh_debt = max(0, totals.debt - mirror.debt)
            mirror.returned += fresh_returned
            mirror.used += fresh_used
            mirror.debt += fresh_debt
            used = min(fresh_used, mirror.units)
            returned = min(fresh_returned, mirror.units - used)
            mirror.units -= used + returned
            ledger = self.ledgers[mirror.resource]
            ledger.give_back(self.now, returned)
            ledger.charge(self.now, fresh_debt)
            if final:
                ledger.give_back(self.now, mirror.units)
                del self.mirror[(token, lease.key)]
        self.collect()

    def poll(self) -> None:
        self.sched.poll()
        fresh: dict[tuple[str, str], int] = defaultdict(int)
        expired: set[str] = set()
        for ticket, lease, _, _, _ in self.pending:
            if isinstance(ticket.outcome, Grant):
                fresh[(ticket.token_id, lease.key)] += ticket.outcome.units
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
                               lambda t: any(p[0].token_id == t for p in self.pending))
        for token in released:  # its processes are presumed gone
            event("client: token released after its leases expired")
            del self.live[token]

    # ------------------------------------------------------------------------------- rules

    @initialize(weights=st.lists(st.integers(1, 30), min_size=3, max_size=6))
    def some_tokens(self, weights: list[int]) -> None:
        for i, weight in enumerate(weights):
            resource = sorted(SPECS)[i % len(SPECS)]
            self.live[self.sched.open_token(resource, weight, claimant=ME).id] = resource

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
            lease = self.lease_of(token, proc)
            if lease.active and self.now >= self.trusted_until[id(lease)]:
                # Not trusted: the executor may have expired the lease. Never mix the old
                # lease's state into a new one under the same key: retire it, start a new key.
                event("client: retired an untrusted lease")
                del self.local[(token, proc)]
                self.retired.append((token, lease))
                lease = self.lease_of(token, proc)
            if lease.take(amount, self.now):
                event("client: served locally")
                backing = self.mirror.get((token, lease.key))
                assert backing is not None, "served from a lease the executor no longer has"
                self.open.append(Open(token, resource, lease, amount, backing))
                continue
            try:
                ticket = self.sched.acquire(token, 0, ME, lease.key, amount,
                                            prefetch=lease.prefetch(), timeout=timeout)
            except LeaseEndedError:  # the executor ended it: go on under a new key
                event("client: lease ended, new key")
                del self.local[(token, proc)]
                self.retired.append((token, lease))
                lease = self.lease_of(token, proc)
                ticket = self.sched.acquire(token, 0, ME, lease.key, amount,
                                            prefetch=lease.prefetch(), timeout=timeout)
            wait = math.inf if spec.wait_limit_s is None else spec.wait_limit_s
            if timeout is not None:
                wait = min(wait, timeout)
            self.pending.append((ticket, lease, self.now, resource, self.now + wait))
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
            lease = reservation.lease
            urgent = lease.settle(amount, used)
            urgent |= lease.contended and lease.recall()
            if urgent:
                self.send(reservation.token, lease)

    @rule(proc=st.sampled_from(PROCS), keep_spare=st.booleans())
    def renew(self, proc: str, keep_spare: bool) -> None:
        for (token, p), lease in list(self.local.items()):
            if p != proc or not lease.active:
                continue
            if self.now >= self.trusted_until[id(lease)]:
                # Renewing too late: retire the lease (settled as final once idle) rather than
                # forfeit its spare and renew it, which would strand those units.
                event("client: retired a lease renewed too late")
                del self.local[(token, p)]
                self.retired.append((token, lease))
                continue
            lease.report(self.now, keep_spare=keep_spare)
            self.send(token, lease)
            contended = self.sched.renew_lease(token, lease.key)
            mirror = self.mirror.get((token, lease.key))
            assert (contended is None) == (mirror is None)
            if contended is None:  # expired: start afresh under a new key
                del self.local[(token, p)]
                if lease.reserved:
                    self.retired.append((token, lease))
            else:
                assert mirror is not None
                mirror.expires_at = self.now + MACHINE_POLICY.lease_ttl_s
                lease.renewed(contended=contended, sent_at=self.now,
                              ttl_s=MACHINE_POLICY.lease_ttl_s)
                self.trusted_until[id(lease)] = self.now + MACHINE_POLICY.lease_ttl_s * TRUST
        for token, lease in list(self.retired):
            lease.report(self.now, keep_spare=False)
            # Final once nothing is open or still asked for under the key (a grant racing a
            # final settle is its own test: test_final_settle_never_hands_back_units_...).
            final = not lease.reserved and not any(p[1] is lease for p in self.pending)
            self.send(token, lease, final=final)
            if final:
                self.retired.remove((token, lease))

    @rule()
    def recalls(self) -> None:
        for key, tokens in self.sched.take_recalls().items():
            found = self.find(key)
            if found is not None and found[0] in tokens and found[1].recall():
                event("client: recalled spare units")
                self.send(found[0], found[1])

    @precondition(lambda self: len(self.live) > 1)
    @rule(index=st.integers(0, 10**6))
    def close(self, index: int) -> None:
        token = list(self.live)[index % len(self.live)]
        if any(p[0].token_id == token for p in self.pending):
            return  # closing under a waiting request races the final settle: tested apart
        for (t, p), lease in list(self.local.items()):
            if t == token:
                del self.local[(t, p)]
                self.retired.append((t, lease))
        for t, lease in list(self.retired):
            if t == token:
                for reservation in [r for r in self.open if r.lease is lease]:
                    self.open.remove(reservation)  # the handle is gone: used in full
                    if reservation.resource != "conc":
                        self.used[reservation.resource] += reservation.amount
                lease.release_all()
                if lease.active:
                    self.send(t, lease, final=True)
                self.retired.remove((t, lease))
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
        declared = sum(lease.totals().debt for r, lease in self.every_lease if r == "cap")
        may_use = sum(r.amount for r in self.open if r.resource == "cap")
        assert self.used["cap"] - declared + may_use <= CAP_SPEC.value

    @invariant()
    def waiters_agree(self) -> None:
        for status in self.sched.status():
            assert status.waiters == sum(1 for p in self.pending if p[3] == status.name)

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
