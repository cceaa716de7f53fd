"""A process's side of the scheduler for tests: ``Client`` drives the real :class:`LeaseSet` the
way ``QuotaToken`` and the renewer do (``Held`` is one reservation as it sees it).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from scheduler_world import ME, Env

from ray_quota._core.holder import LeaseSet, LocalLease
from ray_quota._core.protocol import Grant, LeaseAnswer, Renewed, Report
from ray_quota._core.scheduler import Ticket
from ray_quota._errors import LeaseEndedError
from ray_quota._spec import Kind


@dataclass(eq=False)
class Held:
    """A reservation as the client sees it."""

    lease: LocalLease
    amount: int
    ticket: Ticket | None  # None when served from the lease without asking
    sent_at: float
    taken: bool = False  # the grant is in the lease


class Client:
    """One process's handle on one token, its leases in a :class:`LeaseSet`.

    Reservations are served from the current lease when it can; otherwise they go to the
    scheduler under the lease's key. Reports carry the leases' running totals. A lease the
    executor no longer knows is replaced and the client goes on under a new key.
    """

    def __init__(self, env: Env, token: str, kind: Kind, *, proc: str = "proc",
                 max_prefetch: int = 0) -> None:
        self.env, self.token = env, token
        keys = itertools.count(1)
        self.leases = LeaseSet(token, kind, max_prefetch=max_prefetch,
                               new_key=lambda: f"{proc}:{next(keys)}")
        self.asked = 0

    @property
    def lease(self) -> LocalLease:
        """The current lease."""
        return self.leases.current

    def reserve(self, amount: int, **kw: object) -> Held:
        """Serve ``amount`` from the lease, or ask the scheduler (granted into the lease)."""
        now = self.env.now
        served = self.leases.take(amount, now)
        if served is not None:
            return Held(served, amount, None, now)
        self.asked += 1
        lease = self.leases.current
        try:
            ticket = self._acquire(lease, amount, **kw)
        except LeaseEndedError:  # the executor ended that lease: go on under a new key
            self.leases.ended(lease)
            lease = self.leases.current
            ticket = self._acquire(lease, amount, **kw)
        held = Held(lease, amount, ticket, now)
        self.finish(held)
        return held

    def _acquire(self, lease: LocalLease, amount: int, **kw: object) -> Ticket:
        return self.env.sched.acquire(self.token, 0, ME, lease.key, amount,
                                      prefetch=lease.prefetch(), **kw)  # type: ignore[arg-type]

    def finish(self, held: Held) -> bool:
        """Take a resolved grant into its lease; whether the reservation holds units."""
        if held.ticket is None:
            return True
        grant = held.ticket.outcome
        if not isinstance(grant, Grant):
            return False
        if not held.taken:
            held.taken = self.leases.granted(held.lease, held.amount, grant,
                                             sent_at=held.sent_at)
        return held.taken

    def commit(self, held: Held, used: int) -> None:
        report = self.leases.settle(held.lease, held.amount, used)
        if report is not None:
            self.send(report)

    def send(self, report: Report) -> None:
        self.env.sched.settle(report.token_id, report.key, report.returned, report.used,
                              report.debt, final=report.final)

    def renew(self, *, keep_spare: bool = True) -> None:
        """The renewer's turn: report every lease, renew the live ones, apply the answer.

        ``keep_spare=False`` gives the current lease's spare units back with this renewal.
        """
        now = self.env.now
        if not keep_spare:
            self.leases.current.let_go()
        reports = self.leases.reports(now, live=True)
        for report in reports:  # as the executor's renew: every total first, then the leases
            self.send(report)
        alive: Renewed = {}
        for report in reports:
            if report.final:
                continue
            contended = self.env.sched.renew_lease(report.token_id, report.key)
            if contended is not None:
                alive[(report.token_id, report.key)] = LeaseAnswer(
                    contended, self.env.sched.policy.lease_ttl_s)
        self.leases.renewed(alive, sent_at=now)
