"""A process's side of the scheduler for tests: ``Client`` drives LocalLeases the way the Ray
layer does (``Held`` is one reservation as it sees it).
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduler_world import (
    ME,
    Env,
)

from ray_quota._core.holder import LocalLease
from ray_quota._core.protocol import Grant
from ray_quota._core.scheduler import Ticket
from ray_quota._errors import (
    LeaseEndedError,
)
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
