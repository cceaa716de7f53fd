"""A scheduler on a fake clock and the calls its tests make: spec short-hands, ``Env`` (one
claimant, short-hand calls, stepping to the next wake-up) and ``Backlog`` (tokens that keep a
request queued). Shared by the ``test_scheduler_*`` modules; nothing here sleeps or starts Ray.

Grants are recorded by the tests themselves (units, returns, declared debt, per time) and the
limits are checked against that record, never against the scheduler's own counters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from fakes import FakeClock

from bench.check import jain

from ray_quota._core.protocol import Grant
from ray_quota._core.scheduler import Policy, Scheduler, Ticket
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
        self.opened: list[str] = []  # tokens of the (live) process, to name in its renewals

    @property
    def now(self) -> float:
        return self.clock.now

    def token(self, resource: str, expected_use: int) -> str:
        self.opened.append(self.sched.open_token(resource, expected_use, claimant=ME).id)
        return self.opened[-1]

    def keep_alive(self) -> None:
        """Name every token, as a live process's renewal does for its
        idle ones: the executor keeps them (see TokenRegistry)."""
        for token in self.opened:
            self.sched.named(token, None)

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
        self.env.keep_alive()  # nor its idle tokens
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

