"""A holder's side of a lease: serve reservations locally, settle them, report at renewal.

Pure and clock-free like the scheduler: the Ray client and the tests drive it with ``now``.
:class:`LocalLease` is one lease; :class:`LeaseSet` is every lease one process keeps of one token
(the current one and those retired but not yet settled), as ``QuotaToken`` keeps them.

Reports carry running totals (units returned, used, owed as debt), never increments, so the
executor can apply a report twice, late or out of order without harm. A lease is known to the
executor by its holder key; when the holder can no longer trust that both sides agree on the
totals (a grant's answer was lost, or the lease expired), it starts a new lease under a new key
and settles the old one as final.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ray_quota._core.protocol import (
    TRUST,
    Adoption,
    Grant,
    Renewed,
    Report,
    holder_of,
    name_key,
)
from ray_quota._errors import InvalidAmountError
from ray_quota._spec import Kind, ResourceSpec


def capped_use(spec: ResourceSpec, amount: int, used: int) -> tuple[int, InvalidAmountError | None]:
    """What a commit of ``used`` on a reservation of ``amount`` is charged, and the error to
    raise once it is: use beyond the amount is charged up to the resource's ``max_overuse``
    (DESIGN 2), so that one bad commit cannot block a shared pool for years."""
    cap = amount + spec.overuse_cap
    if used <= cap:
        return used, None
    return cap, InvalidAmountError(
        f"{spec.name!r}: a commit of {used} exceeds its reservation of {amount} by more than "
        f"max_overuse ({spec.overuse_cap}); {cap} units were charged")


@dataclass(frozen=True, slots=True)
class Settlement:
    """A lease's running totals, as the holder reports them."""

    returned: int  # unused units given back to the pool
    used: int  # units consumed from the lease
    debt: int  # units consumed beyond any grant


class LocalLease:
    """Units of one token held by this process under one holder key.

    Example:
        >>> lease = LocalLease(Kind.RATE, key="proc-1:0", max_prefetch=64)
        >>> lease.take(10, now=0.0)            # nothing held yet: ask the executor
        False
        >>> lease.granted(10, units=20, sent_at=0.0, ttl_s=10.0, contended=False)
        >>> lease.take(10, now=1.0), lease.spare
        (True, 0)
    """

    __slots__ = ("kind", "key", "spare", "reserved", "returned", "used", "debt", "active",
                 "final", "contended", "via", "_valid_until", "_prefetch", "_max_prefetch",
                 "_busy")

    def __init__(self, kind: Kind, *, key: str, max_prefetch: int) -> None:
        self.kind = kind
        self.key = key  # the executor knows this lease as (token id, key)
        self.spare = 0  # held and not in an open reservation
        self.reserved = 0  # held by open reservations
        self.returned = self.used = self.debt = 0  # running totals
        self.active = False  # the executor has a record of this lease
        self.final = False  # settled as final: the executor ends it; no more grants into it
        self.contended = False
        self.via: str | None = None  # the adoption secret of the broker lease these units came from
        self._valid_until = float("-inf")
        self._prefetch = 0
        self._max_prefetch = max_prefetch
        self._busy = False  # served a reservation since the last renewal

    def take(self, amount: int, now: float) -> bool:
        """Serve ``amount`` from spare units if the lease is trusted and nobody else waits.

        Under contention every reservation goes through the executor's fair queue.
        """
        if self.spare >= amount and not self.contended and now < self._valid_until:
            self.spare -= amount
            self.reserved += amount
            self._busy = True
            return True
        return False

    def prefetch(self) -> int:
        """Spare units to ask for beyond a request: grows while alone, none under contention,
        and never more than keeps the lease's spare within its cap (spare it holds counts)."""
        return 0 if self.contended else max(0, self._prefetch - self.spare)

    def granted(self, amount: int, *, units: int, sent_at: float, ttl_s: float,
                contended: bool, waited_s: float = 0.0) -> None:
        """Record a grant of ``units`` for a request of ``amount``, and reserve ``amount``.

        The grant renewed the lease ``waited_s`` after the request, sent at ``sent_at``, reached
        the executor. A renewal answered meanwhile may vouch for longer: trust never moves back.
        """
        if sent_at >= self._valid_until:
            self.let_go()
        self.active = True
        self._valid_until = max(self._valid_until, sent_at + waited_s + ttl_s * TRUST)
        self.spare += units - amount
        self.reserved += amount
        self._busy = True
        self.contended = contended
        if not contended:
            self._prefetch = min(self._max_prefetch, max(2 * self._prefetch, amount))

    def settle(self, amount: int, used: int) -> bool:
        """Close a reservation of ``amount`` that really used ``used``.

        What the reservation did not use (for concurrency: its slots, whatever was "used")
        goes back to the pool at once rather than into spare, and so does spare beyond the
        prefetch limit: a request elsewhere, a ``reject`` one included, must not fail while
        those units sit idle here, nor must they be lost with this process if it dies. The
        spare kept is what prefetch granted, at most ``max_prefetch``. (Keeping a freed slot
        would spare this process one executor call for its next reservation, at the price of
        a slot nobody else can have until the next renewal.)

        Returns whether to report at once: units went back, or debt grew (overuse that spare
        units could not cover, which the pool must stop granting).
        """
        self.reserved -= amount
        if self.kind is Kind.CONCURRENCY:
            back, over = amount, max(0, used - amount)
        elif used <= amount:
            back, over = amount - used, 0
            self.used += used
        else:
            cover = min(used - amount, self.spare)  # overuse comes out of spare units first
            self.spare -= cover
            self.used += amount + cover
            back, over = 0, used - amount - cover
        back += max(0, self.spare - self._max_prefetch)
        self.spare = min(self.spare, self._max_prefetch)
        self.returned += back
        self.debt += over
        return over > 0 or back > 0

    def recall(self) -> bool:
        """Others wait: stop serving locally and give every spare unit back.

        Returns whether there was anything to give back.
        """
        self.contended = True
        if not self.spare:
            return False
        self.returned += self.spare
        self.spare = 0
        return True

    def release_all(self, *, open_used: bool = True) -> None:
        """The lease ends: open reservations count as used in full (unless ``open_used`` is
        false: then as unused), spare goes back."""
        if self.reserved:
            self.settle(self.reserved, self.reserved if open_used else 0)
        self.returned += self.spare
        self.spare = 0

    def report(self, now: float, *, keep_spare: bool) -> Settlement:
        """The totals to send at renewal; spare goes back unless kept, trusted and in use."""
        if now >= self._valid_until:
            self.let_go()
        elif not keep_spare or self.contended or not self._busy:
            self.returned += self.spare
            self.spare = 0
        self._busy = False
        return self.totals()

    def let_go(self) -> None:
        """Trust ran out: never serve the spare units again, and say so. If the executor still
        has the lease they go back to the pool; if it expired the lease, it ignores the report."""
        self.returned += self.spare
        self.spare = 0

    def totals(self) -> Settlement:
        return Settlement(self.returned, self.used, self.debt)

    def renewed(self, *, contended: bool, sent_at: float, ttl_s: float) -> None:
        """Apply the executor's answer to a renewal sent at ``sent_at``."""
        self.contended = contended
        self._valid_until = max(self._valid_until, sent_at + ttl_s * TRUST)

    @property
    def valid_until(self) -> float:
        """When local trust in the lease ends, on the holder's monotonic clock."""
        return self._valid_until

    @property
    def held(self) -> int:
        """Units this holder knows it holds: spare and in open reservations."""
        return self.spare + self.reserved


class LeaseSet:
    """The leases one process holds of one token: a current lease, which serves reservations and
    takes grants, and retired leases whose open reservations still have to close before they
    are settled as final.

    Not thread-safe: the token calls it under its own lock. Time comes in as ``now``.

    Example:
        >>> keys = iter(["p:0", "p:1"])
        >>> leases = LeaseSet("t1", Kind.RATE, max_prefetch=64, new_key=keys.__next__)
        >>> leases.take(10, now=0.0) is None        # nothing held: ask the executor
        True
        >>> lease = leases.current
        >>> leases.granted(lease, 10, Grant(units=30, ttl_s=10.0, contended=False), sent_at=0.0)
        True
        >>> leases.settle(lease, 10, used=10) is None  # nothing urgent to report
        True
        >>> leases.reports(now=1.0, live=True)
        [Report(token_id='t1', key='p:0', returned=0, used=10, debt=0, final=False)]

    Args:
        token_id: the token's id, which every report and adoption carries.
        kind: the resource's kind.
        max_prefetch: the most units a lease may ask for beyond a request.
        new_key: mints a lease key never used before (``holder:n``).
    """

    __slots__ = ("token_id", "kind", "max_prefetch", "_new_key", "current", "_retired",
                 "_renewing")

    def __init__(self, token_id: str, kind: Kind, *, max_prefetch: int,
                 new_key: Callable[[], str]) -> None:
        self.token_id = token_id
        self.kind = kind
        self.max_prefetch = max_prefetch
        self._new_key = new_key
        self.current = self._new_lease()
        self._retired: list[LocalLease] = []  # earlier leases still to settle as final
        # The current lease as the last renewal reported it, or None: only that one is judged
        # by its answer (a lease first granted while the renewal was out is not in it).
        self._renewing: LocalLease | None = None

    def __iter__(self) -> Iterator[LocalLease]:
        """The current lease, then the retired ones."""
        return iter([self.current, *self._retired])

    @property
    def reserved(self) -> int:
        """Units in open reservations, over every lease."""
        return sum(lease.reserved for lease in self)

    # -------------------------------------------------------------------- reserve and settle

    def take(self, amount: int, now: float) -> LocalLease | None:
        """Serve ``amount`` from the current lease; the lease that served it, or None to ask."""
        lease = self.current
        return lease if lease.take(amount, now) else None

    def granted(self, lease: LocalLease, amount: int, grant: Grant, *, sent_at: float) -> bool:
        """Take a grant for a request of ``amount`` sent at ``sent_at`` under ``lease``.

        Returns False, changing nothing, if the lease was settled as final while the request
        waited: the final settlement gave those units back (or the executor refuses them), so
        they are not this process's to use.
        """
        if lease.final:
            return False
        lease.granted(amount, units=grant.units, sent_at=sent_at, ttl_s=grant.ttl_s,
                      contended=grant.contended, waited_s=grant.waited_s)
        lease.via = grant.via
        return True

    def settle(self, lease: LocalLease, amount: int, used: int) -> Report | None:
        """A reservation of ``amount`` that used ``used`` closed.

        Returns a report to send at once, or None to wait for the renewal: what the reservation
        did not use goes back at once (see :meth:`LocalLease.settle`), overuse is charged at
        once, and under contention the spare goes back at once.
        """
        urgent = lease.settle(amount, used)
        urgent |= lease.contended and lease.recall()
        return self._report_of(lease, final=False) if urgent else None

    def recall(self) -> Report | None:
        """Others wait for the resource: give back the current lease's spare units now."""
        lease = self.current
        return self._report_of(lease, final=False) if lease.recall() else None

    # ----------------------------------------------------------------------- leases that end

    def ended(self, lease: LocalLease) -> None:
        """The executor (or broker) ended ``lease``: carry on under a new one.

        A lease with reservations still open is kept and reported until they close, then
        settled as final: a broker refuses more units under a lease it retired but still keeps
        (see :meth:`BrokerCore.lost`), and a sub-lease its process stopped renewing would expire
        there and free a slot the process still holds. Where the lease really ended, the
        reports change nothing but late debt, which is owed anyway.
        """
        if self.current is lease:
            if lease.reserved:
                self._retired.append(lease)
            self.current = self._new_lease()

    def lost(self, lease: LocalLease) -> None:
        """A request's answer under ``lease`` was lost, and with it whatever it granted: settle
        the lease as final once its reservations close, and carry on under a new one."""
        if self.current is lease:
            self._retired.append(lease)
            self.current = self._new_lease()

    def final_reports(self, *, open_used: bool = True) -> list[Report]:
        """End every lease (the token closes, merges or moves): open reservations count as
        used in full (unless ``open_used`` is false: then as unused), spare goes back.

        A retired lease is reported even if it never became active: a grant whose answer was
        lost made it one at the executor, which gives its units back only on a final report.
        """
        leases, self._retired = list(self), []
        for lease in leases:
            lease.release_all(open_used=open_used)
        return [self._report_of(lease, final=True) for lease in leases
                if lease.active or lease is not self.current]

    # ----------------------------------------------------------------------------- renewal

    def reports(self, now: float, *, live: bool) -> list[Report]:
        """The running totals of each lease, for a renewal sent at ``now``.

        Retired leases are settled as final once idle. Unless ``live`` (the token moved to
        another process), the current lease keeps no spare, and is settled as final once idle.
        A live token that keeps no lease at the executor by this renewal is *named* (see
        :func:`~ray_quota._core.protocol.name_key`), so that the executor keeps it.
        """
        reports = []
        current = self.current
        self._renewing = None
        if current.active:
            current.report(now, keep_spare=live)
            if live or current.reserved:
                reports.append(self._report_of(current, final=False))
                self._renewing = current
            else:  # moved away and idle: this lease is done
                current.release_all()
                reports.append(self._report_of(current, final=True))
                self.current = self._new_lease()
        for lease in list(self._retired):
            lease.report(now, keep_spare=False)
            final = not lease.reserved
            reports.append(self._report_of(lease, final=final))
            if final:
                self._retired.remove(lease)
        if live and all(report.final for report in reports):  # no lease left to keep it
            reports.append(Report(self.token_id, name_key(holder_of(self.current.key)), 0, 0, 0,
                                  False))
        return reports

    def renewed(self, alive: Renewed, sent_at: float) -> None:
        """Apply the answer to a renewal sent at ``sent_at``."""
        lease = self.current
        if lease is not self._renewing:
            return  # not reported by that renewal (first granted while it was out, say)
        answer = alive.get((self.token_id, lease.key))
        if answer is None:
            # The executor (or broker) no longer knows this lease (it expired): start afresh.
            self.current = self._new_lease()
        else:
            contended, ttl_s = answer
            lease.renewed(contended=contended, sent_at=sent_at, ttl_s=ttl_s)

    # --------------------------------------------------------------------- broker failover

    def adoptions(self) -> list[Adoption]:
        """This process's share of its broker's leases, to take over directly (the broker
        failed), oldest key first: the executor starts no lease under a key older than the
        newest it has of this holder (see :mod:`ray_quota._core.ended`)."""
        return [Adoption(self.token_id, lease.via, lease.key, lease.held, lease.returned,
                         lease.used, lease.debt) for lease in [*self._retired, self.current]
                if lease.via is not None and lease.active and not lease.final]

    def adopted(self, adopted: set[tuple[str, str]]) -> None:
        """Leases in ``adopted`` (token id, key) are now the executor's directly; the others
        are gone, and the current one, if gone, is replaced."""
        for lease in list(self):
            if lease.via is not None:
                lease.via = None
                if (self.token_id, lease.key) not in adopted and lease is self.current:
                    self.current = self._new_lease()

    # --------------------------------------------------------------------------- internals

    def _new_lease(self) -> LocalLease:
        return LocalLease(self.kind, key=self._new_key(), max_prefetch=self.max_prefetch)

    def _report_of(self, lease: LocalLease, *, final: bool) -> Report:
        lease.final = lease.final or final
        totals = lease.totals()
        return Report(self.token_id, lease.key, totals.returned, totals.used, totals.debt, final)
