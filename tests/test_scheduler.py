"""The fair credit scheduler, on a fake clock: safety, fairness, waits, leases and bad input.

Nothing here sleeps or starts Ray. Grants are recorded by the tests themselves (units, returns,
declared debt, per time) and the limits are checked against that record, never against the
scheduler's own counters.
"""

from __future__ import annotations

import ast
import itertools
import math
import secrets
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fakes import FakeClock
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from ray_quota._errors import (
    FailedReservation,
    ForgedTokenError,
    IncompatibleTokensError,
    InvalidAmountError,
    LeaseEndedError,
    QuotaTerminated,
    TokenClosedError,
    TokenMovedError,
    TokenStateError,
    UnknownResourceError,
)
from ray_quota._core.holder import LocalLease
from ray_quota._core.protocol import TRUST, Grant
from ray_quota._core.scheduler import Policy, Scheduler, Ticket
from ray_quota._spec import MAX_UNITS
from ray_quota._spec import Enforcement, Kind, ResourceSpec

ME = "claimant-a"
HOLDER = "proc-1"
EPS = 1e-6
STEP_BUDGET = 200_000  # scheduler wake-ups one test may take before it counts as hung


def rate(name: str = "r", value: int = 100, period_s: float = 1.0, burst: int = 100,
         enforcement: Enforcement = Enforcement.THROTTLE,
         wait_limit_s: float | None = None) -> ResourceSpec:
    return ResourceSpec(name, Kind.RATE, value=value, period_s=period_s, burst=burst,
                        enforcement=enforcement, wait_limit_s=wait_limit_s)


def capacity(name: str = "c", value: int = 100, enforcement: Enforcement = Enforcement.THROTTLE,
             wait_limit_s: float | None = None) -> ResourceSpec:
    return ResourceSpec(name, Kind.CAPACITY, value=value, enforcement=enforcement,
                        wait_limit_s=wait_limit_s)


def concurrency(name: str = "k", value: int = 4, enforcement: Enforcement = Enforcement.THROTTLE,
                wait_limit_s: float | None = None) -> ResourceSpec:
    return ResourceSpec(name, Kind.CONCURRENCY, value=value, enforcement=enforcement,
                        wait_limit_s=wait_limit_s)


class Env:
    """A scheduler on a fake clock, with one claimant and short-hand calls."""

    def __init__(self, *specs: ResourceSpec, policy: Policy | None = None) -> None:
        self.clock = FakeClock()
        self.sched = Scheduler({s.name: s for s in specs}, clock=self.clock,
                               policy=policy or Policy())
        self.steps = 0  # a broken scheduler must fail a test, never hang it

    @property
    def now(self) -> float:
        return self.clock.now

    def token(self, resource: str, expected_use: int) -> str:
        return self.sched.open_token(resource, expected_use, claimant=ME).id

    def acquire(self, token: str, amount: int, holder: str = HOLDER, **kw: object) -> Ticket:
        return self.sched.acquire(token, 0, ME, holder, amount, **kw)  # type: ignore[arg-type]

    def commit(self, token: str, used: int, holder: str = HOLDER) -> None:
        self.sched.give_back(token, holder, used=used)

    def status(self, name: str):
        return next(s for s in self.sched.status() if s.name == name)

    def step(self) -> list[Ticket]:
        """Move the clock to the scheduler's next wake-up and poll."""
        self.steps += 1
        assert self.steps < STEP_BUDGET, "the scheduler makes no progress"
        wakeup = self.sched.next_wakeup()
        assert wakeup is not None, "nothing to wait for"
        self.clock.set(max(self.now, wakeup))
        return self.sched.poll()

    def wait_for(self, ticket: Ticket, limit_s: float = 1e6) -> float:
        """Step until ``ticket`` is resolved; returns the time it was."""
        while ticket.outcome is None:
            assert self.now < limit_s, "ticket never resolved"
            self.step()
        return self.now

    def snapshot(self, tokens: Iterable[str] = (), holders: Iterable[str] = (HOLDER,)) -> object:
        tokens = list(tokens)
        return (self.sched.status(),
                [self.sched.credit(t) for t in tokens],
                [self.sched.held(t, h) for t in tokens for h in holders])


def granted(ticket: Ticket) -> int:
    assert isinstance(ticket.outcome, Grant), ticket.outcome
    return ticket.outcome.units


class Backlog:
    """Tokens that each keep one request queued and commit every grant at once.

    ``use`` decides what a grant really used (default: exactly what was asked).
    The log holds (time, token, units) per grant, as the test saw it.
    """

    def __init__(self, env: Env, use: Callable[[str, int], int] | None = None, *,
                 poll_every: float | None = None) -> None:
        self.env = env
        self.poll_every = poll_every  # also poll at this cadence, as a busy executor would
        self.demand: dict[str, int] = {}
        self.tickets: dict[str, Ticket] = {}
        self.log: list[tuple[float, str, int]] = []
        self.use = use or (lambda token, amount: amount)

    def add(self, token: str, amount: int) -> None:
        self.demand[token] = amount
        self.tickets[token] = self.env.acquire(token, amount)

    def harvest(self) -> None:
        self.env.sched.renew(HOLDER)  # the process is alive: its leases never expire
        changed = True
        while changed:
            changed = False
            self.env.steps += 1
            assert self.env.steps < STEP_BUDGET, "grants without end at one instant"
            for token, ticket in list(self.tickets.items()):
                if ticket.outcome is None:
                    continue
                units = granted(ticket)
                self.log.append((self.env.now, token, units))
                used = self.use(token, ticket.amount)
                self.env.sched.give_back(token, HOLDER, units - min(used, units),
                                         used=min(used, units), debt=max(0, used - units))
                self.tickets[token] = self.env.acquire(token, self.demand[token])
                changed = True

    def step(self, end: float = math.inf) -> bool:
        """Poll at the next wake-up (or cadence) before ``end``; False once at ``end``."""
        self.env.steps += 1
        assert self.env.steps < STEP_BUDGET, "the scheduler makes no progress"
        wakeup = self.env.sched.next_wakeup()
        if wakeup is None:
            wakeup = math.inf
        if self.poll_every is not None:
            wakeup = min(wakeup, self.env.now + self.poll_every)
        at_end = wakeup >= end
        self.env.clock.set(max(self.env.now, min(wakeup, end)))
        self.env.sched.poll()
        self.harvest()
        return not at_end

    def run(self, until: Callable[[], bool], limit_s: float = 1e5) -> None:
        self.harvest()
        while not until():
            assert self.env.now < limit_s, "backlog ran too long"
            self.step()

    def run_for(self, seconds: float) -> None:
        end = self.env.now + seconds
        self.harvest()
        while self.step(end):
            pass

    def count(self, token: str, since: float = -math.inf) -> int:
        return sum(1 for t, tok, _ in self.log if tok == token and t >= since)

    def units(self, token: str, since: float = -math.inf) -> int:
        return sum(u for t, tok, u in self.log if tok == token and t >= since)


@dataclass(eq=False)
class Held:
    """A reservation as the client sees it."""

    lease: LocalLease
    amount: int
    ticket: Ticket | None  # None when served from the lease without asking
    sent_at: float
    taken: bool = False  # the grant is in the lease


class Client:
    """One process's handle on one token: LocalLeases driven the way the Ray layer drives them.

    Reservations are served from the current lease when it can; otherwise they go to the
    scheduler under the lease's key. Reports carry the lease's running totals. A lease the
    executor no longer knows is retired (settled as final once its reservations close) and the
    client goes on under a new key.
    """

    def __init__(self, env: Env, token: str, kind: Kind, *, proc: str = "proc",
                 max_prefetch: int = 0) -> None:
        self.env, self.token, self.kind, self.proc = env, token, kind, proc
        self.max_prefetch = max_prefetch
        self.leases = 0
        self.lease = self._new_lease()
        self.retired: list[LocalLease] = []
        self.asked = 0

    def _new_lease(self) -> LocalLease:
        self.leases += 1
        return LocalLease(self.kind, key=f"{self.proc}:{self.leases}",
                          max_prefetch=self.max_prefetch)

    def _retire(self) -> None:
        self.retired.append(self.lease)
        self.lease = self._new_lease()

    def reserve(self, amount: int, **kw: object) -> Held:
        """Serve ``amount`` from the lease, or ask the scheduler (granted into the lease)."""
        now = self.env.now
        if self.lease.take(amount, now):
            return Held(self.lease, amount, None, now)
        self.asked += 1
        try:
            ticket = self.env.sched.acquire(self.token, 0, ME, self.lease.key, amount,
                                            prefetch=self.lease.prefetch(),
                                            **kw)  # type: ignore[arg-type]
        except LeaseEndedError:  # the executor ended that lease: go on under a new key
            self._retire()
            ticket = self.env.sched.acquire(self.token, 0, ME, self.lease.key, amount,
                                            prefetch=self.lease.prefetch(),
                                            **kw)  # type: ignore[arg-type]
        held = Held(self.lease, amount, ticket, now)
        self.finish(held)
        return held

    @staticmethod
    def finish(held: Held) -> bool:
        """Take a resolved grant into its lease; whether the reservation holds units."""
        if held.ticket is None:
            return True
        grant = held.ticket.outcome
        if not isinstance(grant, Grant):
            return False
        if not held.taken:
            held.lease.granted(held.amount, units=grant.units, sent_at=held.sent_at,
                               ttl_s=grant.ttl_s, contended=grant.contended)
            held.taken = True
        return True

    def commit(self, held: Held, used: int) -> None:
        lease = held.lease
        urgent = lease.settle(held.amount, used)
        urgent |= lease.contended and lease.recall()
        if urgent:
            self.send(lease)

    def send(self, lease: LocalLease, *, final: bool = False) -> None:
        totals = lease.totals()
        self.env.sched.settle(self.token, lease.key, totals.returned, totals.used,
                              totals.debt, final=final)

    def renew(self, *, keep_spare: bool = True) -> None:
        for lease in list(self.retired):
            lease.report(self.env.now, keep_spare=False)
            final = not lease.reserved
            self.send(lease, final=final)
            if final:
                self.retired.remove(lease)
        if not self.lease.active:
            return
        self.lease.report(self.env.now, keep_spare=keep_spare)
        self.send(self.lease)
        contended = self.env.sched.renew_lease(self.token, self.lease.key)
        if contended is None:  # the executor no longer knows the lease
            self._retire()
        else:
            self.lease.renewed(contended=contended, sent_at=self.env.now,
                               ttl_s=self.env.sched.policy.lease_ttl_s)


def jain(xs: list[float]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))


# ================================================================================ weighted fairness


@pytest.mark.parametrize("poll_every", [None, 0.01], ids=["at-wakeups", "every-10ms"])
@pytest.mark.parametrize("amounts", [(100, 200, 400), (50, 50, 50)], ids=["amount=eu", "equal"])
def test_backlogged_tokens_share_in_proportion_to_expected_use(
        amounts: tuple[int, ...], poll_every: float | None) -> None:
    # How often the executor happens to poll must not change the shares.
    env = Env(rate(value=700, burst=400))
    weights = (100, 200, 400)
    tokens = [env.token("r", w) for w in weights]
    backlog = Backlog(env, poll_every=poll_every)
    for token, amount in zip(tokens, amounts, strict=True):
        backlog.add(token, amount)
    backlog.run(until=lambda: min(backlog.count(t) for t in tokens) >= 60)

    total = sum(backlog.units(t) for t in tokens)
    shares = [backlog.units(t) / total for t in tokens]
    targets = [w / sum(weights) for w in weights]
    for share, target in zip(shares, targets, strict=True):
        assert abs(share - target) <= 0.05 * target, (shares, targets)
    assert jain([s / t for s, t in zip(shares, targets, strict=True)]) >= 0.99


def test_one_token_alone_uses_at_least_95_percent_of_a_rate_limit() -> None:
    env = Env(rate(value=100, burst=50))
    token = env.token("r", 10)
    backlog = Backlog(env)
    backlog.add(token, 10)
    start_units = backlog.units(token)  # the initial burst does not count towards the rate
    backlog.run_for(600.0)
    assert backlog.units(token) - start_units >= 0.95 * 100 * 600


def test_one_token_alone_with_a_local_lease_uses_at_least_95_percent_of_a_rate_limit() -> None:
    env = Env(rate(value=1000, burst=1000), policy=Policy(lease_ttl_s=2.0))
    client = Client(env, env.token("r", 20), Kind.RATE, max_prefetch=200)
    used, next_renew = 0, 0.5
    for step in itertools.count():
        assert step < STEP_BUDGET, "the client loop makes no progress"
        if env.now >= 60.0:
            break
        if env.now >= next_renew:
            client.renew()
            next_renew += 0.5
        held = client.reserve(20)
        if held.ticket is not None and held.ticket.outcome is None:
            wakeup = env.sched.next_wakeup()
            assert wakeup is not None
            env.clock.set(min(max(wakeup, env.now), next_renew))
            env.sched.poll()
            if not client.finish(held):
                env.sched.cancel(held.ticket)
                continue
        client.commit(held, 20)
        used += 20
    assert used >= 0.95 * 1000 * 60


def test_client_loop_serves_most_reservations_locally() -> None:
    env = Env(rate(value=100_000, burst=20_000), policy=Policy(lease_ttl_s=2.0))
    client = Client(env, env.token("r", 10), Kind.RATE, max_prefetch=1000)
    for i in range(2000):
        env.clock.advance(0.001)
        if i % 250 == 0:
            client.renew()
        held = client.reserve(10)
        assert client.finish(held)
        client.commit(held, 10)
    assert client.asked <= 2000 / 20  # prefetch grew: about one ask per 100 reservations


def test_waiter_that_fits_is_granted_without_waiting_for_a_poll() -> None:
    env = Env(concurrency(value=2))
    a, b = env.token("k", 1), env.token("k", 1)
    env.acquire(a, 2)
    waiting = env.acquire(b, 1)
    assert waiting.outcome is None
    env.sched.give_back(a, HOLDER, 1)
    assert granted(waiting) == 1


def test_small_waiter_fills_free_slots_while_a_large_head_is_blocked() -> None:
    env = Env(concurrency(value=4))
    big, small = env.token("k", 4), env.token("k", 1)
    holder_token = env.token("k", 4)
    env.acquire(holder_token, 3)
    head = env.acquire(big, 4)  # the lowest pass: it is the head, and it cannot fit
    backfill = env.acquire(small, 1)
    assert head.outcome is None
    assert granted(backfill) == 1


@pytest.mark.parametrize("credit_factor", [1.0, 3.0])
def test_idle_token_gains_at_most_max_credit(credit_factor: float) -> None:
    env = Env(rate(value=100, burst=100), policy=Policy(credit_factor=credit_factor))
    busy, idle = env.token("r", 100), env.token("r", 100)
    backlog = Backlog(env)
    backlog.add(busy, 100)
    backlog.run_for(1000.0)
    joined = len(backlog.log)  # grants from here on happened with both tokens backlogged
    backlog.add(idle, 100)
    backlog.run_for(100.0)

    # Normalised advantage of the returning token over the busy one, after every grant.
    advantage, worst = 0.0, 0.0
    for _, token, units in backlog.log[joined:]:
        advantage += units / 100 if token == idle else -units / 100
        worst = max(worst, advantage)
    one_grant = 1.0
    assert worst <= credit_factor + one_grant + EPS
    assert worst >= credit_factor  # and it does get the credit it saved
    # Afterwards they alternate.
    late = env.now - 50.0
    assert abs(backlog.count(idle, late) - backlog.count(busy, late)) <= 1


def test_new_token_starts_with_no_credit() -> None:
    env = Env(rate(value=100, burst=100))
    busy = env.token("r", 100)
    backlog = Backlog(env)
    backlog.add(busy, 100)
    backlog.run_for(100.5)
    fresh = env.token("r", 100)
    assert env.sched.credit(fresh) <= EPS


def test_new_token_does_not_go_before_tokens_already_waiting() -> None:
    env = Env(rate(value=100, burst=100))
    busy = env.token("r", 100)
    backlog = Backlog(env)
    backlog.add(busy, 100)
    backlog.run_for(100.5)  # busy's next request waits for the bucket
    waiting = backlog.tickets[busy]
    assert waiting.outcome is None
    fresh = env.token("r", 100)
    mine = env.acquire(fresh, 100)
    env.step()
    assert isinstance(waiting.outcome, Grant)
    assert mine.outcome is None


def test_overuse_delays_the_token_then_it_returns_to_its_fair_share() -> None:
    env = Env(rate(value=100, burst=100))
    a, b = env.token("r", 100), env.token("r", 100)
    overuse_at: list[float] = []

    def use(token: str, amount: int) -> int:
        if token == a and not overuse_at and env.now >= 20.0:
            overuse_at.append(env.now)
            return amount + 500  # five grants' worth of debt
        return amount

    backlog = Backlog(env, use)
    backlog.add(a, 100)
    backlog.add(b, 100)
    backlog.run_for(20.0)
    assert abs(backlog.count(a) - backlog.count(b)) <= 1  # fair before
    backlog.run_for(1.0)
    assert overuse_at
    debt_at = overuse_at[0]
    assert env.sched.credit(a) < env.sched.credit(b) - 400  # the debt is on the token

    # Debt: b gets about five grants (the debt) before a gets its next one.
    next_a = min(t for t, tok, _ in backlog.log if tok == a and t > debt_at) \
        if backlog.count(a, debt_at + EPS) else None
    while next_a is None:
        assert env.now < debt_at + 120.0, "the indebted token was never served again"
        backlog.run_for(1.0)
        later = [t for t, tok, _ in backlog.log if tok == a and t > debt_at]
        next_a = min(later) if later else None
    b_between = sum(1 for t, tok, _ in backlog.log if tok == b and debt_at < t < next_a)
    assert b_between >= 5
    # The pool was charged too: nobody was granted for the 500 units of debt.
    assert next_a - debt_at >= 5.0

    # Recovery: over a long later stretch the shares are even again.
    recovered = env.now
    backlog.run_for(200.0)
    ca, cb = backlog.count(a, recovered), backlog.count(b, recovered)
    assert ca >= 50 and cb >= 50
    assert abs(ca - cb) <= 0.05 * (ca + cb) / 2


# ================================================================================= no starvation


def test_large_request_is_granted_in_bounded_time_under_a_stream_of_small_ones() -> None:
    policy = Policy()
    env = Env(rate(value=100, burst=100), policy=policy)
    small = [env.token("r", 10) for _ in range(4)]
    large = env.token("r", 10)  # a small weight asking for the whole burst
    backlog = Backlog(env)
    for token in small:
        backlog.add(token, 10)
    backlog.run_for(30.0)
    asked_at = env.now
    ticket = env.acquire(large, 100)
    while ticket.outcome is None:
        assert env.now - asked_at < 60.0, "the large request starved"
        env.step()
        backlog.harvest()
    waited = env.now - asked_at
    # At most: one turn for each small token, the bypass budget, then its own 100 units.
    bound = (len(small) * 10 + 100 * policy.bypass_factor + 100) / 100
    assert waited <= bound + EPS
    assert granted(ticket) == 100


def test_large_request_is_not_starved_by_a_stream_of_fresh_tokens() -> None:
    # Tasks that each open a fresh token (no token in scope) and reserve once.
    env = Env(rate(value=100, burst=100))
    large = env.token("r", 100)
    env.commit(large, granted(env.acquire(large, 100)))
    ticket = env.acquire(large, 100)
    asked_at = env.now
    for _ in range(10_000):
        if ticket.outcome is not None or env.now - asked_at >= 60.0:
            break
        fresh = env.token("r", 10)
        small = env.acquire(fresh, 10)
        while small.outcome is None and ticket.outcome is None:
            env.step()
        if isinstance(small.outcome, Grant):
            env.commit(fresh, 10)
        env.sched.close_token(fresh, 0, ME)
    assert ticket.outcome is not None, "the large request starved behind fresh tokens"
    assert env.now - asked_at <= 10.0


def test_blocked_head_lets_smaller_waiters_past_only_up_to_its_own_amount() -> None:
    env = Env(concurrency(value=10))
    head_token = env.token("k", 10)
    others = [env.token("k", 10) for _ in range(20)]
    filler = env.token("k", 1)
    env.acquire(filler, 10)
    head = env.acquire(head_token, 6)  # the head: the lowest pass, asked first
    tickets = [env.acquire(t, 1) for t in others]  # each would finish before the head
    for _ in range(10):
        env.sched.give_back(filler, HOLDER, 1)
    served = sum(1 for t in tickets if isinstance(t.outcome, Grant))
    assert served == 6  # bypassed by its own amount, then everyone waits for the head
    for t in tickets:
        if isinstance(t.outcome, Grant):
            env.sched.give_back(t.token_id, HOLDER, 1)
    assert granted(head) == 6


def test_only_waiters_that_would_finish_first_may_pass_a_blocked_head() -> None:
    # A token of small requests must not take a large request's share by slipping past it.
    env = Env(capacity(value=20))
    head_token, light, filler = env.token("c", 10), env.token("c", 1), env.token("c", 1)
    env.commit(light, granted(env.acquire(light, 1)))  # light is now further on than the head
    granted(env.acquire(filler, 19))
    head = env.acquire(head_token, 6)  # finishes at its pass + 0.6
    small = env.acquire(light, 2)  # starts later and finishes at its pass + 2: after the head
    env.sched.give_back(filler, HOLDER, 4)
    assert head.outcome is None and small.outcome is None
    env.sched.give_back(filler, HOLDER, 2)
    assert granted(head) == 6


# ================================================================================ estimated wait


def test_estimated_wait_with_an_empty_queue_is_exact() -> None:
    env = Env(rate(value=8, burst=16))  # 8 units/s
    token = env.token("r", 4)
    env.commit(token, granted(env.acquire(token, 16)))
    env.clock.advance(0.25)  # the refill phase: 2 units in the bucket
    estimate = env.sched.estimate_wait(token, 6)
    assert estimate == pytest.approx(0.5)
    ticket = env.acquire(token, 6)
    assert ticket.outcome is None
    start = env.now
    assert env.wait_for(ticket) - start == pytest.approx(estimate, abs=EPS)


def test_estimated_wait_counts_the_waiters_ahead() -> None:
    env = Env(rate(value=10, burst=10))
    me, a, b = env.token("r", 10), env.token("r", 10), env.token("r", 10)
    env.commit(me, granted(env.acquire(me, 10)))  # my pass is now behind theirs; bucket empty
    ta, tb = env.acquire(a, 4), env.acquire(b, 3)
    estimate = env.sched.estimate_wait(me, 5)
    assert estimate == pytest.approx(1.2)
    mine = env.acquire(me, 5)
    env.wait_for(mine)
    assert ta.outcome is not None and tb.outcome is not None
    assert env.now == pytest.approx(estimate, abs=EPS)


def test_estimated_wait_counts_every_queued_request_that_will_go_first() -> None:
    # Another token with two requests queued: both pass before mine.
    env = Env(rate(value=10, burst=10))
    me, a = env.token("r", 10), env.token("r", 10)
    env.commit(me, granted(env.acquire(me, 10)))
    a1, a2 = env.acquire(a, 3), env.acquire(a, 3)
    estimate = env.sched.estimate_wait(me, 4)
    mine = env.acquire(me, 4)
    env.wait_for(mine)
    assert a1.outcome is not None and a2.outcome is not None
    assert env.now == pytest.approx(estimate, abs=EPS)


def test_estimated_wait_counts_my_own_earlier_requests() -> None:
    env = Env(rate(value=10, burst=10))
    me = env.token("r", 10)
    env.commit(me, granted(env.acquire(me, 10)))
    first = env.acquire(me, 3)
    estimate = env.sched.estimate_wait(me, 4)
    second = env.acquire(me, 4)
    env.wait_for(second)
    assert first.outcome is not None
    assert env.now == pytest.approx(estimate, abs=EPS)


def test_reject_fails_at_once_with_the_exact_wait_to_retry_after() -> None:
    env = Env(rate(value=10, burst=10, enforcement=Enforcement.REJECT))
    token = env.token("r", 10)
    env.commit(token, granted(env.acquire(token, 8)))
    env.clock.advance(0.1)  # 3 units in the bucket
    before = env.snapshot([token])
    ticket = env.acquire(token, 7)
    error = ticket.outcome
    assert isinstance(error, FailedReservation)
    assert (error.resource, error.amount) == ("r", 7)
    assert error.estimated_wait_s == pytest.approx(0.4)
    assert env.snapshot([token]) == before  # a rejected request takes nothing
    env.clock.advance(error.estimated_wait_s - 1e-3)
    assert isinstance(env.acquire(token, 7).outcome, FailedReservation)
    env.clock.advance(1e-3)
    assert granted(env.acquire(token, 7)) == 7


def test_reject_waits_when_the_estimate_is_within_the_wait_limit() -> None:
    env = Env(rate(value=10, burst=10, enforcement=Enforcement.REJECT, wait_limit_s=1.0))
    token = env.token("r", 10)
    env.commit(token, granted(env.acquire(token, 10)))
    ticket = env.acquire(token, 5)  # 0.5 s away
    assert ticket.outcome is None
    assert env.wait_for(ticket) == pytest.approx(0.5)
    assert granted(ticket) == 5


def test_reject_fails_at_once_when_the_estimate_exceeds_the_wait_limit() -> None:
    env = Env(rate(value=10, burst=10, enforcement=Enforcement.REJECT, wait_limit_s=1.0))
    token = env.token("r", 10)
    env.commit(token, granted(env.acquire(token, 10)))
    ticket = env.acquire(token, 10, timeout=None)
    assert ticket.outcome is None  # exactly 1.0 s away: within the limit
    late = env.acquire(token, 5)  # 1.5 s away, behind the first
    assert isinstance(late.outcome, FailedReservation)
    assert late.outcome.estimated_wait_s == pytest.approx(1.5)


def test_request_ready_exactly_at_its_deadline_is_granted() -> None:
    # The estimate said the units come at the deadline, so the waiter stayed; it must get them.
    env = Env(rate(value=8, burst=8, enforcement=Enforcement.REJECT, wait_limit_s=0.5))
    token = env.token("r", 8)
    env.commit(token, granted(env.acquire(token, 8)))
    ticket = env.acquire(token, 4)
    assert ticket.outcome is None
    env.wait_for(ticket)
    assert env.now == 0.5
    assert granted(ticket) == 4


@pytest.mark.parametrize("spec", [capacity(enforcement=Enforcement.REJECT),
                                  concurrency(enforcement=Enforcement.REJECT)])
def test_no_estimated_wait_for_capacity_and_concurrency(spec: ResourceSpec) -> None:
    env = Env(spec)
    token = env.token(spec.name, 1)
    granted(env.acquire(token, spec.value))
    assert env.sched.estimate_wait(token, 1) is None
    ticket = env.acquire(token, 1)
    assert isinstance(ticket.outcome, FailedReservation)
    assert ticket.outcome.estimated_wait_s is None


# ================================================================================== enforcement


def test_throttle_waits_until_units_come_back() -> None:
    env = Env(capacity(value=10))
    a, b = env.token("c", 5), env.token("c", 5)
    env.acquire(a, 8)
    ticket = env.acquire(b, 5)
    assert ticket.outcome is None
    assert env.sched.next_wakeup() == Policy().lease_ttl_s  # only a's lease expiry is ahead
    env.sched.give_back(a, HOLDER, 3)
    assert granted(ticket) == 5


def test_throttle_timeout_fails_with_failed_reservation_at_the_deadline() -> None:
    env = Env(concurrency(value=1))
    a, b = env.token("k", 1), env.token("k", 1)
    env.acquire(a, 1)
    ticket = env.acquire(b, 1, timeout=2.5)
    env.sched.poll()  # reports the grant to a
    assert env.sched.next_wakeup() == 2.5
    env.clock.set(2.4)
    assert env.sched.poll() == []
    env.clock.set(2.5)
    assert env.sched.poll() == [ticket]
    assert isinstance(ticket.outcome, FailedReservation)
    assert env.status("k").waiters == 0


def test_wait_limit_fails_capacity_waiter_at_the_deadline() -> None:
    env = Env(capacity(value=10, enforcement=Enforcement.REJECT, wait_limit_s=3.0))
    a, b = env.token("c", 5), env.token("c", 5)
    env.acquire(a, 10)
    ticket = env.acquire(b, 1)
    assert ticket.outcome is None  # no estimate for capacity: it waits up to the limit
    env.wait_for(ticket)
    assert env.now == 3.0
    assert isinstance(ticket.outcome, FailedReservation)


def test_shorter_timeout_than_the_wait_limit_wins() -> None:
    env = Env(concurrency(value=1, wait_limit_s=10.0))
    a, b = env.token("k", 1), env.token("k", 1)
    env.acquire(a, 1)
    ticket = env.acquire(b, 1, timeout=1.0)
    env.wait_for(ticket)
    assert env.now == 1.0


def test_zero_timeout_fails_at_once() -> None:
    env = Env(concurrency(value=1))
    a, b = env.token("k", 1), env.token("k", 1)
    env.acquire(a, 1)
    assert isinstance(env.acquire(b, 1, timeout=0.0).outcome, FailedReservation)


def test_reject_with_no_wait_limit_fails_at_once() -> None:
    env = Env(capacity(value=10, enforcement=Enforcement.REJECT))
    token = env.token("c", 5)
    env.acquire(token, 10)
    before = env.snapshot([token])
    ticket = env.acquire(token, 1, timeout=100.0)  # a longer timeout does not extend a reject
    assert isinstance(ticket.outcome, FailedReservation)
    assert env.snapshot([token]) == before


def test_terminate_gives_quota_terminated_at_once() -> None:
    env = Env(concurrency(value=1, enforcement=Enforcement.TERMINATE))
    a, b = env.token("k", 1), env.token("k", 1)
    env.acquire(a, 1)
    ticket = env.acquire(b, 1)
    assert isinstance(ticket.outcome, QuotaTerminated)
    assert (ticket.outcome.resource, ticket.outcome.amount) == ("k", 1)


def test_terminate_after_the_wait_limit() -> None:
    env = Env(rate(value=10, burst=10, enforcement=Enforcement.TERMINATE, wait_limit_s=2.0))
    token = env.token("r", 10)
    env.commit(token, granted(env.acquire(token, 10)))
    ticket = env.acquire(token, 5)
    assert ticket.outcome is None
    assert env.wait_for(ticket) == pytest.approx(0.5)
    assert granted(ticket) == 5
    env.commit(token, 5)
    doomed = env.acquire(token, 10)  # 1.0 s: within the limit... then a debt pushes it out
    env.sched.give_back(token, HOLDER, debt=50)
    env.wait_for(doomed)
    assert isinstance(doomed.outcome, QuotaTerminated)
    assert env.now == pytest.approx(0.5 + 2.0)


def test_cancelled_waiter_leaves_the_queue() -> None:
    env = Env(concurrency(value=1))
    a, b = env.token("k", 1), env.token("k", 1)
    env.acquire(a, 1)
    ticket = env.acquire(b, 1)
    env.sched.cancel(ticket)
    assert isinstance(ticket.outcome, TokenStateError)
    assert env.status("k").waiters == 0
    env.sched.give_back(a, HOLDER, 1)
    assert env.status("k").available == 1


def test_closing_a_token_fails_its_waiters() -> None:
    env = Env(concurrency(value=1))
    a, b = env.token("k", 1), env.token("k", 1)
    env.acquire(a, 1)
    tickets = [env.acquire(b, 1) for _ in range(3)]
    env.sched.close_token(b, 0, ME)
    assert all(isinstance(t.outcome, TokenClosedError) for t in tickets)
    assert env.status("k").waiters == 0
    assert env.status("k").tokens == 1


def test_requests_of_one_token_are_served_in_order() -> None:
    env = Env(concurrency(value=3))
    a, filler = env.token("k", 3), env.token("k", 1)
    env.acquire(filler, 3)
    first, second, third = env.acquire(a, 3), env.acquire(a, 1), env.acquire(a, 1)
    env.sched.give_back(filler, HOLDER, 2)  # room for the later ones, not the first
    assert (first.outcome, second.outcome, third.outcome) == (None, None, None)
    env.sched.give_back(filler, HOLDER, 1)
    assert granted(first) == 3


# ================================================================================== set_limit


def test_lowering_a_limit_grants_nothing_until_use_falls_below_it() -> None:
    env = Env(concurrency(value=8))
    a, b = env.token("k", 4), env.token("k", 4)
    env.acquire(a, 6)
    env.sched.set_limit(concurrency(value=4))
    ticket = env.acquire(b, 1)
    assert ticket.outcome is None
    env.sched.give_back(a, HOLDER, 2)  # 4 held: at the new limit
    assert ticket.outcome is None
    env.sched.give_back(a, HOLDER, 1)
    assert granted(ticket) == 1
    assert env.status("k").in_use == 4


def test_lowering_a_capacity_limit_never_refills_and_raising_adds_only_the_difference() -> None:
    env = Env(capacity(value=100))
    a = env.token("c", 10)
    env.commit(a, granted(env.acquire(a, 80)))
    env.sched.set_limit(capacity(value=50))
    assert env.status("c").available == 0
    waiting = env.acquire(a, 30)
    assert waiting.outcome is None
    env.sched.set_limit(capacity(value=100))
    assert waiting.outcome is None  # 20 free: still short
    env.sched.set_limit(capacity(value=110))
    assert granted(waiting) == 30  # raising wakes waiters at once
    assert env.status("c").available == 0


def test_raising_a_concurrency_limit_wakes_waiters() -> None:
    env = Env(concurrency(value=2))
    a, b = env.token("k", 1), env.token("k", 1)
    env.acquire(a, 2)
    ticket = env.acquire(b, 2)
    env.sched.set_limit(concurrency(value=4))
    assert granted(ticket) == 2


def test_lowering_a_rate_limit_bounds_later_grants_by_the_new_limit() -> None:
    env = Env(rate(value=100, burst=100))
    token = env.token("r", 10)
    env.clock.advance(1.0)
    env.sched.set_limit(rate(value=10, burst=20))
    backlog = Backlog(env)
    start = env.now
    backlog.add(token, 5)
    backlog.run_for(10.0)
    assert backlog.units(token) <= 20 + 10 * (env.now - start) + EPS
    assert backlog.units(token) >= 20 + 10 * 10 - 5


def test_set_limit_below_a_waiting_request_does_not_block_the_queue_for_ever() -> None:
    env = Env(concurrency(value=8))
    a, b = env.token("k", 4), env.token("k", 4)
    env.acquire(a, 8)
    big = env.acquire(a, 6)
    env.sched.set_limit(concurrency(value=4))
    env.sched.give_back(a, HOLDER, 8)
    env.sched.poll()
    # The 6-slot request can never fit a 4-slot limit: it must fail, not hold up everyone.
    served = 0
    for _ in range(20):
        ticket = env.acquire(b, 1)
        env.sched.poll()
        if isinstance(ticket.outcome, Grant):
            served += 1
            env.sched.give_back(b, HOLDER, 1)
        else:
            break
    assert big.outcome is not None, "a request above the new limit waits for ever"
    assert served == 20


def test_set_limit_cannot_change_the_kind_and_changes_nothing() -> None:
    env = Env(concurrency(value=4))
    before = env.snapshot()
    with pytest.raises(InvalidAmountError):
        env.sched.set_limit(capacity(name="k", value=4))
    with pytest.raises(UnknownResourceError):
        env.sched.set_limit(capacity(name="nope", value=4))
    assert env.snapshot() == before
    assert env.sched.specs()["k"] == concurrency(value=4)


# ============================================================================== next_wakeup


def test_next_wakeup_is_when_the_rate_head_fits() -> None:
    env = Env(rate(value=10, burst=10))
    token = env.token("r", 10)
    assert env.sched.next_wakeup() is None
    env.acquire(token, 10)
    ticket = env.acquire(token, 4)
    env.sched.poll()
    assert env.sched.next_wakeup() == pytest.approx(0.4)
    env.clock.set(0.39)
    assert env.sched.poll() == []
    env.clock.set(env.sched.next_wakeup())
    assert env.sched.poll() == [ticket]


def test_next_wakeup_includes_a_smaller_waiter_that_can_go_past_a_blocked_head() -> None:
    env = Env(rate(value=10, burst=100))
    big, small = env.token("r", 100), env.token("r", 100)
    env.commit(small, granted(env.acquire(small, 60)))
    env.commit(big, granted(env.acquire(big, 40)))  # the bucket is empty; big's pass is lower
    head = env.acquire(big, 100)  # 10 s away
    passer = env.acquire(small, 10)  # fits after 1 s, and would finish before the head
    env.sched.poll()
    assert head.outcome is None and passer.outcome is None
    assert env.sched.next_wakeup() == pytest.approx(1.0)
    env.step()
    assert granted(passer) == 10
    assert head.outcome is None


# =================================================================================== leases


def test_lease_expires_when_the_holder_stops_renewing() -> None:
    env = Env(concurrency(value=3), rate(value=10, burst=10), capacity(value=50),
              policy=Policy(lease_ttl_s=5.0))
    tk, tr, tc = env.token("k", 1), env.token("r", 1), env.token("c", 1)
    for token, amount in ((tk, 3), (tr, 10), (tc, 20)):
        granted(env.acquire(token, amount, holder="dead"))
    env.clock.set(4.9)
    env.sched.poll()
    assert env.sched.held(tk, "dead") == 3
    assert env.status("k").available == 0
    env.clock.set(5.0)
    env.sched.poll()
    assert env.sched.lease_expiries == 3
    assert [env.sched.held(t, "dead") for t in (tk, tr, tc)] == [0, 0, 0]
    assert env.sched.renew("dead") == {}
    # Concurrency slots come back; rate and capacity units stay charged (they may have been used).
    assert env.status("k").available == 3
    assert env.status("c").available == 30
    assert env.sched.pool("r").level(5.0) == pytest.approx(10.0)  # refill only: capped at burst
    assert all(s.leases == 0 and s.leased_units == 0 for s in env.sched.status())


def test_rate_units_of_an_expired_lease_are_not_returned() -> None:
    env = Env(rate(value=1, burst=10), policy=Policy(lease_ttl_s=2.0))
    token = env.token("r", 1)
    granted(env.acquire(token, 10, holder="dead"))
    env.clock.set(2.0)
    env.sched.poll()
    assert env.sched.held(token, "dead") == 0
    assert env.status("r").available == 2  # what refilled, nothing more
    env.sched.give_back(token, "dead", 10)  # a late give-back of an expired lease is ignored
    assert env.status("r").available == 2


def test_renewing_keeps_a_lease_alive_past_its_ttl() -> None:
    env = Env(concurrency(value=2), policy=Policy(lease_ttl_s=5.0))
    a, b = env.token("k", 1), env.token("k", 1)
    env.acquire(a, 1, holder="alive")
    for t in (4.0, 8.0, 12.0):
        env.clock.set(t)
        env.sched.poll()
        assert env.sched.renew("alive") == {a: False}
    waiting = env.acquire(b, 2)
    assert env.sched.renew("alive") == {a: True}  # others wait: give spare back soon
    env.clock.set(16.9)
    env.sched.poll()
    assert env.sched.held(a, "alive") == 1
    assert waiting.outcome is None
    env.clock.set(17.0)
    env.sched.poll()
    assert env.sched.held(a, "alive") == 0
    assert granted(waiting) == 2  # the expired slot went straight to the waiter


def test_debt_reported_after_the_lease_expired_is_still_charged() -> None:
    # A call overran while its process was stalled past the TTL; the overuse is reported late.
    env = Env(capacity(value=100), policy=Policy(lease_ttl_s=1.0))
    token = env.token("c", 10)
    granted(env.acquire(token, 10))
    env.clock.set(1.0)
    env.sched.poll()
    env.sched.settle(token, HOLDER, returned=0, used=10, debt=50)  # overuse is never lost
    assert env.status("c").in_use == 60


def test_concurrency_slots_reported_as_used_are_still_freed() -> None:
    # A slot is never consumed: settling it as "used" must free it like giving it back.
    env = Env(concurrency(value=2), policy=Policy(lease_ttl_s=1.0))
    token = env.token("k", 1)
    env.acquire(token, 2)
    env.sched.give_back(token, HOLDER, used=2)
    env.clock.set(10.0)
    env.sched.poll()
    assert env.status("k").available == 2


def test_grant_carries_prefetch_only_when_nobody_waits() -> None:
    env = Env(rate(value=10, burst=100), policy=Policy(max_lease_fraction=0.1))
    a, b = env.token("r", 10), env.token("r", 10)
    assert granted(env.acquire(a, 10, prefetch=50)) == 10 + 10  # capped at 10% of the ceiling
    assert granted(env.acquire(a, 75, prefetch=50)) == 75 + 5  # capped by what is left
    assert env.sched.held(a, HOLDER) == 100
    first = env.acquire(b, 5, prefetch=10)
    second = env.acquire(a, 5, prefetch=10)
    env.sched.give_back(a, HOLDER, 10)  # room for both: the first is granted while one waits
    assert isinstance(first.outcome, Grant) and first.outcome.units == 5
    assert first.outcome.contended
    assert isinstance(second.outcome, Grant) and second.outcome.units == 5


def test_prefetched_units_given_back_refund_the_tokens_pass() -> None:
    env = Env(rate(value=10, burst=100), policy=Policy(max_lease_fraction=0.5))
    a = env.token("r", 10)
    before = env.sched.credit(a)
    env.acquire(a, 10, prefetch=40)
    assert env.sched.credit(a) == pytest.approx(before - 50)
    env.sched.give_back(a, HOLDER, 40, used=10)
    assert env.sched.credit(a) == pytest.approx(before - 10)


def test_settle_applies_running_totals_once() -> None:
    env = Env(capacity(value=100))
    token = env.token("c", 10)
    granted(env.acquire(token, 40))
    env.sched.settle(token, HOLDER, returned=10, used=5, debt=3)
    after_first = env.snapshot([token])
    assert env.sched.held(token, HOLDER) == 25
    assert env.status("c").in_use == 40 - 10 + 3
    env.sched.settle(token, HOLDER, returned=10, used=5, debt=3)  # the same report again
    env.sched.settle(token, HOLDER, returned=4, used=1, debt=0)  # an older one, late
    assert env.snapshot([token]) == after_first
    env.sched.settle(token, HOLDER, returned=15, used=5, debt=3)  # only the news counts
    assert env.sched.held(token, HOLDER) == 20
    assert env.status("c").in_use == 40 - 15 + 3


def test_final_settle_returns_what_the_executor_still_counts_and_ends_the_lease() -> None:
    env = Env(concurrency(value=4))
    token = env.token("k", 1)
    granted(env.acquire(token, 3))
    env.sched.settle(token, HOLDER, returned=1, used=0, debt=0, final=True)
    assert env.sched.held(token, HOLDER) == 0
    assert env.status("k").available == 4
    assert env.sched.renew_lease(token, HOLDER) is None
    assert env.sched.renew(HOLDER) == {}


def test_settle_of_an_expired_lease_changes_nothing() -> None:
    env = Env(capacity(value=100), policy=Policy(lease_ttl_s=1.0))
    token = env.token("c", 10)
    granted(env.acquire(token, 40))
    env.clock.set(1.0)
    env.sched.poll()
    before = env.sched.status()
    env.sched.settle(token, HOLDER, returned=40, used=0, debt=0, final=True)
    assert env.sched.status() == before  # expiry settled it: the 40 units stay charged


def test_renew_lease_extends_one_lease_and_says_when_it_is_gone() -> None:
    env = Env(concurrency(value=2), policy=Policy(lease_ttl_s=5.0))
    a, b = env.token("k", 1), env.token("k", 1)
    granted(env.acquire(a, 1))
    env.clock.set(4.0)
    assert env.sched.renew_lease(a, HOLDER) is False
    waiting = env.acquire(b, 2)
    assert env.sched.renew_lease(a, HOLDER) is True  # others wait
    env.clock.set(8.9)
    env.sched.poll()
    assert env.sched.held(a, HOLDER) == 1
    env.clock.set(9.0)
    env.sched.poll()
    assert env.sched.renew_lease(a, HOLDER) is None
    assert granted(waiting) == 2


def test_holders_are_recalled_when_someone_starts_waiting() -> None:
    env = Env(capacity(value=100), policy=Policy(max_lease_fraction=0.5))
    a, b = env.token("c", 10), env.token("c", 10)
    assert granted(env.acquire(a, 40, holder="p1", prefetch=50)) == 90
    assert env.sched.take_recalls() == {}
    waiting = env.acquire(b, 20, holder="p2")
    assert waiting.outcome is None
    assert env.sched.take_recalls() == {"p1": {a}}
    assert env.sched.take_recalls() == {}  # drained
    env.sched.settle(a, "p1", returned=50, used=0, debt=0)  # p1 gives its spare back
    assert granted(waiting) == 20


def test_set_limit_recalls_spare_units() -> None:
    env = Env(capacity(value=100), policy=Policy(max_lease_fraction=0.5))
    a = env.token("c", 10)
    granted(env.acquire(a, 10, holder="p1", prefetch=50))
    env.sched.set_limit(capacity(value=60))
    assert env.sched.take_recalls() == {"p1": {a}}


def test_final_settle_never_hands_back_units_it_granted_meanwhile() -> None:
    # A process closes its token while another of its threads waits under the same lease key.
    env = Env(concurrency(value=1))
    token, other = env.token("k", 1), env.token("k", 1)
    granted(env.acquire(token, 1))
    waiting = env.acquire(token, 1)
    env.sched.settle(token, HOLDER, returned=1, used=0, debt=0, final=True)
    if isinstance(waiting.outcome, Grant):  # the waiter got the slot: it must stay counted
        assert env.status("k").in_use == 1
        assert env.acquire(other, 1, holder="p2").outcome is None, "one slot, two holders"


def test_holder_reusing_its_key_after_its_lease_expired_cannot_reuse_a_freed_slot() -> None:
    # A stalled process's lease expired and its slot was freed (its holder is presumed dead).
    # The process resumes: its stale reservation must not turn into a spare slot that the
    # executor does not count.
    env = Env(concurrency(value=2), policy=Policy(lease_ttl_s=10.0))
    hog = env.token("k", 1)
    granted(env.acquire(hog, 1, holder="elsewhere"))
    client = Client(env, env.token("k", 1), Kind.CONCURRENCY)
    a = client.reserve(1)  # reservation A, open through the stall
    assert client.finish(a)
    big = client.reserve(2, timeout=13.0)  # another thread waits: the token stays in use
    assert big.ticket is not None and big.ticket.outcome is None
    env.clock.set(9.0)
    env.sched.renew("elsewhere")
    env.clock.set(12.0)
    env.sched.poll()  # the stalled process's lease expired; A's slot is free again
    b = client.reserve(1)  # reservation B
    env.clock.set(13.0)
    env.sched.poll()  # the big one times out; B is granted
    assert client.finish(b)
    client.commit(a, 1)  # A ends
    c = client.reserve(1)  # reservation C
    in_use = 1 + 1 + (1 if client.finish(c) else 0)  # the hog, B and C
    assert in_use <= 2, "more slots in use than the limit"


def test_request_waiting_while_its_lease_expired_cannot_overdraw_a_budget() -> None:
    # The process stalled past the TTL while one of its requests waited. Granted afterwards, it
    # must not land in a fresh lease under the old key, where the old lease's running totals
    # (10 returned) would give back units that are reserved.
    env = Env(capacity(value=100), policy=Policy(lease_ttl_s=10.0))
    hog = env.token("c", 10)
    client = Client(env, env.token("c", 10), Kind.CAPACITY)
    first = client.reserve(10)
    client.commit(first, 0)
    env.clock.set(1.0)
    client.renew(keep_spare=False)  # totals now say: 10 returned
    granted(env.acquire(hog, 60, holder="elsewhere"))
    waiting = client.reserve(50)  # 40 free: waits, and keeps the token in use
    assert waiting.ticket is not None and waiting.ticket.outcome is None
    env.clock.set(9.0)
    env.sched.renew("elsewhere")
    env.clock.set(12.0)
    env.sched.poll()  # the stalled process's lease expired
    env.sched.give_back(hog, "elsewhere", 60)
    if client.finish(waiting):
        env.clock.set(12.5)
        client.renew()
        assert waiting.lease.held == 50
        assert env.sched.held(client.token, waiting.lease.key) >= 50
        assert env.status("c").in_use >= 50, "budget handed out twice"


def test_late_renewal_does_not_leak_concurrency_slots() -> None:
    # A holder keeps a free slot as spare; one renewal comes after its trust ran out but before
    # the executor's TTL. The holder forfeits the slot; the executor must not keep it for ever.
    env = Env(concurrency(value=2), policy=Policy(lease_ttl_s=10.0))
    holder = Client(env, env.token("k", 1), Kind.CONCURRENCY)
    held = holder.reserve(1)
    holder.commit(held, 1)  # the slot stays in the lease as spare
    env.clock.set(1.0)
    holder.renew()
    env.clock.set(9.5)  # trusted until 9.0, expires at 11.0
    holder.renew()
    assert holder.lease.held == 0  # the holder has let the slot go
    other = env.token("k", 1)
    ticket = env.acquire(other, 2, holder="elsewhere")
    for t in range(10, 60, 3):  # the holder process lives on and keeps renewing
        env.clock.set(float(t))
        env.sched.poll()
        holder.renew()
    assert isinstance(ticket.outcome, Grant), "a forfeited slot stays leased for ever"


# ================================================================================= transfers


def test_token_moved_to_another_process_refuses_the_old_owner() -> None:
    env = Env(capacity(value=100))
    token = env.token("c", 10)
    granted(env.sched.acquire(token, 1, "receiver", "proc-2", 1))
    before = env.snapshot([token], holders=(HOLDER, "proc-2"))
    with pytest.raises(TokenMovedError):
        env.sched.acquire(token, 0, ME, HOLDER, 1)
    with pytest.raises(TokenMovedError):
        env.sched.split(token, 0, ME, 1)
    with pytest.raises(TokenMovedError):
        env.sched.close_token(token, 0, ME)
    assert env.snapshot([token], holders=(HOLDER, "proc-2")) == before


def test_retry_by_the_same_claimant_may_take_the_token_up_again() -> None:
    env = Env(capacity(value=100))
    token = env.token("c", 10)
    granted(env.sched.acquire(token, 1, "task-7", "proc-2", 1))
    granted(env.sched.acquire(token, 1, "task-7", "proc-3", 1))  # Ray retried task-7 elsewhere


def test_another_claimant_of_the_same_generation_is_refused() -> None:
    env = Env(capacity(value=100))
    token = env.token("c", 10)
    granted(env.sched.acquire(token, 1, "task-7", "proc-2", 1))
    before = env.snapshot([token], holders=("proc-2", "proc-3"))
    with pytest.raises(TokenMovedError):
        env.sched.acquire(token, 1, "task-8", "proc-3", 1)
    assert env.snapshot([token], holders=("proc-2", "proc-3")) == before


def test_token_opened_for_one_claimant_is_refused_to_another() -> None:
    env = Env(capacity(value=100))
    token = env.token("c", 10)
    with pytest.raises(TokenMovedError):
        env.sched.acquire(token, 0, "someone-else", HOLDER, 1)


def test_forged_token_is_refused_and_changes_nothing() -> None:
    env = Env(capacity(value=100))
    real = env.token("c", 10)
    before = env.snapshot([real])
    forged = secrets.token_urlsafe(16)
    for call in (lambda: env.sched.acquire(forged, 0, ME, HOLDER, 1),
                 lambda: env.sched.split(forged, 0, ME, 1),
                 lambda: env.sched.merge(real, 0, ME, forged, 0),
                 lambda: env.sched.close_token(forged, 0, ME)):
        with pytest.raises(ForgedTokenError):
            call()
    assert env.snapshot([real]) == before


def test_closed_or_merged_token_says_closed_not_forged() -> None:
    env = Env(capacity(value=100))
    a, b, c = env.token("c", 10), env.token("c", 10), env.token("c", 10)
    env.sched.close_token(a, 0, ME)
    env.sched.merge(b, 0, ME, c, 0)
    for gone in (a, c):
        with pytest.raises(TokenClosedError):
            env.sched.acquire(gone, 0, ME, HOLDER, 1)
        with pytest.raises(TokenClosedError):
            env.sched.close_token(gone, 0, ME)


def test_token_ids_are_unguessable() -> None:
    env = Env(capacity(value=100))
    ids = {env.token("c", 1) for _ in range(200)}
    assert len(ids) == 200
    assert all(len(i) >= 22 for i in ids)  # 16 random bytes, url-safe base64


def test_unknown_resource_is_refused() -> None:
    env = Env(capacity(value=100))
    with pytest.raises(UnknownResourceError, match="nope"):
        env.sched.open_token("nope", 1, claimant=ME)


# ================================================================================== bad input


BAD_AMOUNTS = [0, -1, 1.5, True, "3", None, MAX_UNITS + 1]


@pytest.mark.parametrize("amount", BAD_AMOUNTS + [101], ids=repr)
def test_bad_acquire_amount_is_refused_and_changes_nothing(amount: object) -> None:
    env = Env(rate(value=100, burst=100))
    token = env.token("r", 10)
    granted(env.acquire(token, 30))
    before = env.snapshot([token])
    with pytest.raises(InvalidAmountError):
        env.acquire(token, amount)  # type: ignore[arg-type]
    assert env.snapshot([token]) == before


@pytest.mark.parametrize("spec", [capacity(value=10), concurrency(value=10)])
def test_amount_above_the_ceiling_is_refused(spec: ResourceSpec) -> None:
    env = Env(spec)
    token = env.token(spec.name, 1)
    with pytest.raises(InvalidAmountError, match="ever"):
        env.acquire(token, 11)
    granted(env.acquire(token, 10))


@pytest.mark.parametrize("expected_use", [0, -5, 2.0, False])
def test_bad_expected_use_is_refused_and_changes_nothing(expected_use: object) -> None:
    env = Env(capacity(value=100))
    before = env.snapshot()
    with pytest.raises(InvalidAmountError):
        env.sched.open_token("c", expected_use, claimant=ME)  # type: ignore[arg-type]
    assert env.snapshot() == before


@pytest.mark.parametrize(("field", "value"), [("units", -1), ("used", 1.5), ("debt", True)])
def test_bad_give_back_is_refused_and_changes_nothing(field: str, value: object) -> None:
    env = Env(capacity(value=100))
    token = env.token("c", 10)
    env.acquire(token, 20)
    before = env.snapshot([token])
    kwargs = {"units": 0, "used": 0, "debt": 0, field: value}
    with pytest.raises(InvalidAmountError):
        env.sched.give_back(token, HOLDER, kwargs.pop("units"), **kwargs)  # type: ignore[arg-type]
    assert env.snapshot([token]) == before


def credit_history(env: Env, token: str, other: str) -> None:
    """Give ``token`` some debt and ``other`` some credit, so conservation checks have teeth."""
    env.commit(token, granted(env.acquire(token, 60)))
    env.clock.advance(5.0)
    env.commit(other, granted(env.acquire(other, 5)))


@pytest.mark.parametrize("child", [11, 0, -1, 2.5, True])
def test_bad_split_is_refused_and_changes_nothing(child: object) -> None:
    env = Env(rate(value=10, burst=100))
    token, other = env.token("r", 10), env.token("r", 10)
    credit_history(env, token, other)
    before = env.snapshot([token, other])
    with pytest.raises(InvalidAmountError):
        env.sched.split(token, 0, ME, child)  # type: ignore[arg-type]
    assert env.snapshot([token, other]) == before


def test_split_of_all_expected_use_while_waiting_is_refused() -> None:
    env = Env(concurrency(value=1))
    filler, token = env.token("k", 1), env.token("k", 4)
    env.acquire(filler, 1)
    env.acquire(token, 1)
    before = env.snapshot([token])
    with pytest.raises(TokenStateError):
        env.sched.split(token, 0, ME, 4)
    assert env.snapshot([token]) == before


def test_merge_with_itself_is_refused_and_changes_nothing() -> None:
    env = Env(rate(value=10, burst=100))
    token, other = env.token("r", 10), env.token("r", 10)
    credit_history(env, token, other)
    before = env.snapshot([token, other])
    with pytest.raises(IncompatibleTokensError):
        env.sched.merge(token, 0, ME, token, 0)
    assert env.snapshot([token, other]) == before


def test_merge_across_resources_is_refused_and_changes_nothing() -> None:
    env = Env(rate(value=10, burst=100), rate(name="r2", value=10, burst=100))
    token, other = env.token("r", 10), env.token("r2", 10)
    before = env.snapshot([token, other])
    with pytest.raises(IncompatibleTokensError):
        env.sched.merge(token, 0, ME, other, 0)
    with pytest.raises(IncompatibleTokensError):
        env.sched.merge(other, 0, ME, token, 0)
    assert env.snapshot([token, other]) == before
    assert env.status("r").tokens == env.status("r2").tokens == 1


def test_merge_of_a_waiting_token_is_refused_and_changes_nothing() -> None:
    env = Env(concurrency(value=1))
    filler, token, other = env.token("k", 1), env.token("k", 2), env.token("k", 2)
    env.acquire(filler, 1)
    env.acquire(other, 1)
    before = env.snapshot([token, other])
    with pytest.raises(TokenStateError):
        env.sched.merge(token, 0, ME, other, 0)
    assert env.snapshot([token, other]) == before


def test_merge_back_returns_a_childs_expected_use_and_credit_to_its_parent() -> None:
    env = Env(rate(value=10, burst=100), policy=Policy(credit_factor=10.0))
    parent, busy = env.token("r", 20), env.token("r", 10)
    child = env.sched.split(parent, 0, ME, 5).id
    env.commit(busy, granted(env.acquire(busy, 50)))
    env.commit(busy, granted(env.acquire(busy, 50)))
    total = env.sched.credit(parent) + env.sched.credit(child)
    assert env.sched.merge_back(child, 1, "task-9", parent) is True  # the child's own process
    assert env.sched.describe(parent, 0, ME) == (20, pytest.approx(total))
    with pytest.raises(TokenClosedError):
        env.acquire(child, 1)


def test_merge_back_into_a_closed_parent_just_closes_the_child() -> None:
    env = Env(capacity(value=100))
    parent = env.token("c", 10)
    child = env.sched.split(parent, 0, ME, 4).id
    env.sched.close_token(parent, 0, ME)
    assert env.sched.merge_back(child, 0, ME, parent) is False
    assert env.status("c").tokens == 0


def test_merge_into_a_waiting_token_keeps_the_debt_it_takes_on() -> None:
    env = Env(concurrency(value=1))
    filler = env.token("k", 1)
    granted(env.acquire(filler, 1))
    waiting, indebted = env.token("k", 4), env.token("k", 1)
    env.sched.give_back(indebted, HOLDER, debt=3)
    assert env.acquire(waiting, 1).outcome is None
    total = env.sched.credit(waiting) + env.sched.credit(indebted)
    assert total < 0
    env.sched.merge(waiting, 0, ME, indebted, 0)
    assert env.sched.credit(waiting) == pytest.approx(total)


def test_token_with_no_expected_use_left_cannot_acquire() -> None:
    env = Env(capacity(value=100))
    token = env.token("c", 5)
    child = env.sched.split(token, 0, ME, 5)
    with pytest.raises(TokenStateError):
        env.acquire(token, 1)
    env.sched.merge(token, 0, ME, child.id, 0)
    granted(env.acquire(token, 1))


def test_two_emptied_tokens_can_still_merge() -> None:
    env = Env(capacity(value=100))
    a, b = env.token("c", 5), env.token("c", 5)
    env.sched.split(a, 0, ME, 5)
    env.sched.split(b, 0, ME, 5)
    env.sched.merge(a, 0, ME, b, 0)
    assert env.sched.credit(a) == 0.0


# ============================================================================ split and merge


def test_split_moves_the_same_share_of_credit() -> None:
    env = Env(rate(value=10, burst=100), policy=Policy(credit_factor=10.0))
    rich, poor = env.token("r", 40), env.token("r", 10)
    env.commit(poor, granted(env.acquire(poor, 50)))
    env.commit(poor, granted(env.acquire(poor, 50)))  # vtime moves on; rich builds credit
    total = env.sched.credit(rich)
    assert total > 0
    child = env.sched.split(rich, 0, ME, 10)
    assert env.sched.credit(child.id) == pytest.approx(total * 10 / 40)
    assert env.sched.credit(rich) == pytest.approx(total * 30 / 40)
    assert env.status("r").tokens == 3


def test_split_moves_the_same_share_of_debt() -> None:
    env = Env(rate(value=10, burst=100))
    token = env.token("r", 20)
    env.acquire(token, 10)
    env.sched.give_back(token, HOLDER, used=10, debt=90)
    total = env.sched.credit(token)
    assert total < 0
    child = env.sched.split(token, 0, ME, 5)
    assert env.sched.credit(child.id) == pytest.approx(total / 4)
    assert env.sched.credit(token) == pytest.approx(total * 3 / 4)


def test_merge_adds_credit_and_expected_use() -> None:
    env = Env(rate(value=10, burst=100), policy=Policy(credit_factor=10.0))
    a, b, busy = env.token("r", 10), env.token("r", 30), env.token("r", 10)
    env.commit(a, granted(env.acquire(a, 5)))
    env.commit(busy, granted(env.acquire(busy, 50)))
    env.commit(busy, granted(env.acquire(busy, 45)))
    ca, cb = env.sched.credit(a), env.sched.credit(b)
    assert ca > 0 and cb > 0
    env.sched.merge(a, 0, ME, b, 0)
    assert env.sched.credit(a) == pytest.approx(ca + cb)
    assert env.status("r").tokens == 2
    # The merged weight: a now competes as 40 against busy's 10.
    backlog = Backlog(env)
    backlog.add(a, 10)
    backlog.add(busy, 10)
    backlog.run_for(50.0)
    settled = env.now
    backlog.run_for(200.0)
    ratio = backlog.units(a, settled) / backlog.units(busy, settled)
    assert ratio == pytest.approx(4.0, rel=0.05)


# ========================================================================= random interleavings


RATE_SPEC = rate("rate", value=40, period_s=1.0, burst=16)
CAP_SPEC = capacity("cap", value=150, enforcement=Enforcement.REJECT, wait_limit_s=2.0)
CONC_SPEC = concurrency("conc", value=5, enforcement=Enforcement.TERMINATE, wait_limit_s=1.5)
SPECS = {s.name: s for s in (RATE_SPEC, CAP_SPEC, CONC_SPEC)}
HOLDERS = ("h1", "h2", "h3")
# A short grace before an orphaned token is released, so that runs get to see it happen.
_GRACE = {"orphan_grace_s": 6.0} if "orphan_grace_s" in Policy.__dataclass_fields__ else {}
MACHINE_POLICY = Policy(credit_factor=2.0, lease_ttl_s=4.0, max_lease_fraction=0.25, **_GRACE)
ACQUIRE = {"index": st.integers(0, 10**6), "holder": st.sampled_from(HOLDERS),
           "share": st.integers(1, 100), "prefetch": st.integers(0, 12),
           "timeout": st.none() | st.sampled_from([0.0, 0.5, 1.0, 2.5])}


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


@dataclass
class Ledger:
    """Our own record of one resource: every grant, accepted return and declared debt, in order."""

    spec: ResourceSpec
    granted: int = 0
    returned: int = 0
    debt: int = 0
    # rate: running sum of (grants - returns + debt) and the least (sum - rate * t) seen at an event
    running: float = 0.0
    least: float = math.inf
    grants: list[tuple[float, int]] = field(default_factory=list)

    def _event(self, now: float, delta: int) -> None:
        self.least = min(self.least, self.running - self.spec.refill_per_s * now)
        self.running += delta

    def grant(self, now: float, units: int) -> None:
        self._event(now, units)
        self.granted += units
        self.grants.append((now, units))
        if self.spec.kind is Kind.RATE:
            # Every window [t1, now] ending at a grant: granted - returned + debt <= burst + r*T.
            worst = self.running - self.spec.refill_per_s * now - self.least
            assert worst <= self.spec.burst + EPS, (
                f"rate exceeded: {worst} units net in a window, burst {self.spec.burst}")
        elif self.spec.kind is Kind.CAPACITY:
            assert self.granted - self.returned + self.debt <= self.spec.value, "budget exceeded"

    def give_back(self, now: float, units: int) -> None:
        if units:
            self._event(now, -units)
            self.returned += units

    def charge(self, now: float, units: int) -> None:
        if units and self.spec.kind is not Kind.CONCURRENCY:
            self._event(now, units)
            self.debt += units


def orphans_due(orphans: dict[str, float], expired: set[str], now: float, live: set[str],
                has_leases: Callable[[str], bool], waits: Callable[[str], bool]) -> list[str]:
    """Tokens the executor releases at this poll, by its rule: a token whose last lease expired
    is kept for a grace period (a Ray retry may take it up), then released unless it has a
    lease or a waiting request again."""
    grace = getattr(MACHINE_POLICY, "orphan_grace_s", 0.0)
    for token in expired:
        if token in live and not has_leases(token):
            orphans[token] = now + grace
    released = []
    for token, due in list(orphans.items()):
        if token not in live:
            del orphans[token]
        elif due <= now:
            del orphans[token]
            if not has_leases(token) and not waits(token):
                released.append(token)
    return released


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
        self.orphans: dict[str, float] = {}  # token whose leases all expired -> release time

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
                key = (ticket.token_id, ticket.holder)
                lease = self.leases.get(key)
                if lease is None:
                    lease = self.leases[key] = ModelLease(resource, 0, 0.0)
                lease.units += outcome.units
                lease.expires_at = self.now + MACHINE_POLICY.lease_ttl_s
                self.open.append(Reservation(ticket.token_id, ticket.holder, resource,
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
                fresh[(ticket.token_id, ticket.holder)] += ticket.outcome.units
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
                               lambda t: bool(self.waiting_of(t)))
        for token in released:
            event("token released after its leases expired")
            del self.live[token]
            self.closed.append(token)

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
        self.expected_use[new] = child
        self.expected_use[token] = eu - child
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


# ===================================================================== property: split/merge


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[str, int, int]]:
    return draw(st.lists(st.tuples(st.sampled_from(["grant", "debt", "refund", "idle"]),
                                   st.integers(0, 2), st.integers(1, 60)),
                         min_size=0, max_size=25))


def _play(env: Env, tokens: list[str], history: list[tuple[str, int, int]]) -> None:
    for what, who, n in history:
        token = tokens[who]
        if what == "grant":
            try:
                ticket = env.acquire(token, n)
            except TokenStateError:  # no expected use left after a split
                continue
            if ticket.outcome is None:
                env.sched.cancel(ticket)
            else:
                env.commit(token, granted(ticket))
        elif what == "debt":
            env.sched.give_back(token, HOLDER, debt=n)
        elif what == "refund":
            try:
                ticket = env.acquire(token, n, prefetch=n)
            except TokenStateError:
                continue
            if ticket.outcome is None:
                env.sched.cancel(ticket)
            else:
                env.sched.give_back(token, HOLDER, granted(ticket))
        else:
            env.clock.advance(n / 10)
            env.sched.poll()


@settings(max_examples=200, deadline=None)
@given(history=histories(), weights=st.lists(st.integers(1, 50), min_size=3, max_size=3),
       child=st.integers(1, 50), credit_factor=st.sampled_from([0.5, 1.0, 3.0]))
def test_split_and_merge_conserve_credit(history: list[tuple[str, int, int]],
                                         weights: list[int], child: int,
                                         credit_factor: float) -> None:
    # Leases never expire here: this is about credit, not about holders going away.
    env = Env(rate(value=20, burst=100),
              policy=Policy(credit_factor=credit_factor, lease_ttl_s=1e9))
    tokens = [env.token("r", w) for w in weights]
    _play(env, tokens, history)
    parent = tokens[0]
    total = env.sched.credit(parent)
    if child > weights[0]:
        with pytest.raises(InvalidAmountError):
            env.sched.split(parent, 0, ME, child)
        assert env.sched.credit(parent) == total
        return
    kid = env.sched.split(parent, 0, ME, child).id
    assert env.sched.credit(parent) + env.sched.credit(kid) == pytest.approx(total, abs=1e-6)
    assert env.sched.credit(kid) <= credit_factor * child + 1e-9  # never above the cap
    _play(env, [parent, kid, tokens[1]], history[::-1])
    parts = env.sched.credit(parent) + env.sched.credit(kid) + env.sched.credit(tokens[1])
    env.sched.merge(parent, 0, ME, kid, 0)
    env.sched.merge(parent, 0, ME, tokens[1], 0)
    assert env.sched.credit(parent) == pytest.approx(parts, abs=1e-6)


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
