"""A node's broker, its pure core: leases taken from the executor, re-leased to local processes.

Pure and clock-free like the scheduler: the broker actor (``_broker_actor``) and the tests drive
it with ``now``. Nothing here talks to Ray.

Upstream, the broker is an ordinary holder: for each token used on its node it keeps one
:class:`LocalLease` from the executor, under the broker's own key, and reports running totals for
it. Downstream, each process lease is a *sub-lease* of that lease: units the broker hands to a
process count as reserved in the upstream lease, and the process's running totals, as they
arrive, move them on: returned units go back upstream at once (what a process gives back is
for anyone, not only for the node), used units are used upstream, and overuse is covered from
the broker's spare before it becomes debt. So the
executor's accounting of the broker's lease is exactly the sum of its processes' leases plus
the broker's own spare, and every guarantee of a direct lease carries over:

- safety: a process only ever serves units the executor granted to the broker;
- fairness: the broker serves from its spare only while the executor says nobody waits, so under
  contention every request goes through the executor's fair queue, as a direct one would;
- expiry: a process's trust in a sub-lease ends before the broker's trust in the upstream lease
  (answers carry the upstream lease's remaining trust as the time-to-live), and a sub-lease that
  is not renewed expires at the broker, which charges or frees its units as the executor would;
- liveness: a sub-lease ends only as a direct lease would, when its process settles it as final,
  stops renewing it, or the executor ended the lease above it. Neither the broker's own trust
  running out (its renewals paused: the executor may be restarting, and keeps the lease) nor the
  token ending (closed, merged) ends the sub-lease of a process that still renews it: that
  process may hold a slot, or an open reservation whose rest is still to come back.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ray_quota._core.credentials import adoption_suffix, adoption_via, new_secret
from ray_quota._core.holder import LocalLease
from ray_quota._core.ledger import TOMBSTONES, fresh_debt
from ray_quota._core.protocol import (
    NAMED,
    Grant,
    LeaseAnswer,
    Renewed,
    Report,
    holder_of,
    name_key,
    read_name,
)
from ray_quota._errors import ProtocolError
from ray_quota._spec import MAX_UNITS, Kind


@dataclass(slots=True, eq=False)
class _Sub:
    """A process's sub-lease, as the broker counts it."""

    key: str
    up: _Up
    expires_at: float
    granted: int = 0
    returned: int = 0
    used: int = 0
    debt: int = 0
    pending: int = 0  # requests passed on to the executor and not answered yet

    @property
    def held(self) -> int:
        return self.granted - self.returned - self.used


@dataclass(frozen=True, slots=True)
class Terms:
    """How a token is leased, by its resource as the executor names it in its grants
    (``Grant.resource``): never by the resource a caller names, which may be another's."""

    resource: str
    kind: Kind
    max_prefetch: int
    max_debt: int  # the resource's max_overuse: the most debt one report adds


@dataclass(slots=True, eq=False)
class _Up:
    """The broker's own lease of one token from the executor, and its sub-leases."""

    token_id: str
    lease: LocalLease
    # Handed to the processes with their units (``Grant.via``) instead of the lease's key: with
    # it they can take their share over if the broker dies, and nothing else of the broker's.
    adoption: str
    subs: dict[str, _Sub] = field(default_factory=dict)
    claim: tuple[int, str] | None = None  # the generation and claimant the executor last accepted
    # No new sub-leases and no local service: renewed upstream while processes still hold
    # sub-leases of it, settled as final once they are gone.
    retired: bool = False
    ended: bool = False  # the executor no longer has it: its sub-leases end, it is not renewed
    # Set by the first grant. Until then the lease's kind is the first caller's word, and
    # unused: nothing is held, settled or served before a grant.
    terms: Terms | None = None


@dataclass(frozen=True, slots=True)
class _Ended:
    """An ended sub-lease that held units, as late debt under it is charged."""

    applied: int  # the debt applied for it, live and late
    late: int  # of which reported after it ended: at most max_debt in all
    lease: LocalLease  # the upstream lease it was part of: late overuse is owed on that one
    max_debt: int  # the resource's max_overuse


@dataclass(frozen=True, slots=True)
class Forward:
    """Ask the executor for ``amount`` plus ``prefetch`` units into the broker's lease ``key``."""

    key: str
    amount: int
    prefetch: int


class BrokerCore:
    """The leases of one node's broker.

    Example:
        >>> core = BrokerCore(holder="broker-1", ttl_s=10.0)
        >>> ask = core.acquire("t1", Kind.RATE, "proc-1:0", 10, prefetch=5, max_prefetch=100,
        ...                    now=0.0)
        >>> ask.amount, ask.prefetch           # nothing held yet: ask the executor
        (10, 5)
        >>> core.granted("t1", "proc-1:0", 10, 5, Grant(15, 10.0, False), sent_at=0.0,
        ...              now=0.1).units
        15
        >>> ask = core.acquire("t1", Kind.RATE, "proc-1:0", 20, prefetch=5, max_prefetch=100,
        ...                    now=1.0)
        >>> ask.prefetch                       # the broker now prefetches for the node too
        15
        >>> grant = core.granted("t1", "proc-1:0", 20, 5, Grant(35, 10.0, False), sent_at=1.0,
        ...                      now=1.1)
        >>> grant.units, core.spare("t1")
        (25, 10)
        >>> core.acquire("t1", Kind.RATE, "proc-2:0", 5, prefetch=0, max_prefetch=100,
        ...              now=1.2).units        # served on the node, without the executor
        5
    """

    def __init__(self, *, holder: str, ttl_s: float,
                 new_secret: Callable[[], str] = new_secret) -> None:
        self._holder = holder
        self._new_secret = new_secret
        self._ttl_s = ttl_s  # how long a sub-lease lives at the broker without renewal
        self._keys = 0
        self._ups: dict[str, _Up] = {}  # token id -> current upstream lease
        self._retired: list[_Up] = []
        self._subs: dict[tuple[str, str], _Sub] = {}  # (token id, process lease key) -> sub
        # (token id, process lease key) of an ended sub-lease that held units -> what late
        # debt is charged against (see _Ended)
        self._ended: OrderedDict[tuple[str, str], _Ended] = OrderedDict()
        self._owed: list[Report] = []  # final upstream totals grown by late debt, to send again
        # Final upstream totals sent with a renewal not yet answered: sent again until one is
        # (a lost final report would leave the lease to expire at the executor, which then
        # charges what it held and may release the token of a process that is still alive).
        self._unanswered: list[Report] = []
        # Tokens its processes named (see protocol.name_key), by token id and the generation a
        # sent one waits for: named upstream under the broker's own keys at its next renewal,
        # and whether the executor's answer to the last one kept each name.
        self._names: dict[tuple[str, int | None], None] = {}
        self._kept: dict[tuple[str, int | None], bool] = {}
        self.local_grants = 0  # requests served without the executor
        self.forwarded = 0  # requests passed on to the executor
        self.expiries = 0

    # ------------------------------------------------------------------------------- requests

    def acquire(self, token_id: str, kind: Kind, key: str, amount: int, *, prefetch: int,
                max_prefetch: int, now: float, claim: tuple[int, str] | None = None,
                resource: str | None = None) -> Grant | Forward:
        """A process asks for ``amount`` (plus up to ``prefetch``) into its sub-lease ``key``,
        of the token's ``resource`` (of that ``kind`` and prefetch cap), by its word.

        Served from the broker's spare if the executor says nobody waits, the broker's lease is
        trusted and ``claim`` (generation, claimant) is the one the executor last accepted for
        the token; otherwise the answer says what to ask the executor for, which checks it.

        Raises:
            KeyError: ``key`` is a sub-lease that ended (the caller answers LeaseEndedError).
            ProtocolError: the executor named another resource for the token; nothing changed.
        """
        if (token_id, key) in self._ended:
            raise KeyError(key)
        sub = self._subs.get((token_id, key))
        up = sub.up if sub is not None else self._ups.get(token_id)
        if up is not None:
            _check_resource(up, resource)
        else:
            up = self._current(token_id, kind, max_prefetch)
        if up.retired:
            raise KeyError(key)
        lease = up.lease
        extra = min(prefetch, max(0, lease.spare - amount))
        if claim == up.claim and lease.take(amount + extra, now):
            self.local_grants += 1
            return self._hand_out(up, key, amount + extra, now)
        self.forwarded += 1
        sub = sub or self._sub(up, key, now)  # it keeps the broker's lease while the request is out
        sub.pending += 1  # a request may wait for long: the sub-lease lasts until it is answered
        return Forward(lease.key, amount, prefetch + lease.prefetch())

    def granted(self, token_id: str, key: str, amount: int, prefetch: int, grant: Grant, *,
                sent_at: float, now: float, claim: tuple[int, str] | None = None,
                resource: str | None = None, terms: Terms | None = None) -> Grant:
        """The executor granted a forwarded request: the process gets ``amount`` and what it may
        prefetch; the rest stays with the broker as spare. ``terms`` are those of the resource
        the grant names (the first grant's lease the token by them); ``resource`` is the one
        the request named.

        Raises:
            KeyError: the broker's lease ended while the request waited; the units were
                settled with it, so the process must ask again under a new key.
            ProtocolError: the request named another resource than the grant: its units go
                straight back upstream.
        """
        sub = self._subs.get((token_id, key))
        if sub is None:  # the token was released while the request was out
            raise KeyError(key)
        sub.pending -= 1
        up = sub.up
        if terms is not None and up.terms is None:
            up.terms = terms
            if not up.lease.active:  # nothing granted yet: lease by the executor's resource
                up.lease = LocalLease(terms.kind, key=up.lease.key,
                                      max_prefetch=terms.max_prefetch)
        up.claim = claim
        lease = up.lease
        lease.granted(amount, units=grant.units, sent_at=sent_at, ttl_s=grant.ttl_s,
                      contended=grant.contended, waited_s=grant.waited_s)
        if terms is not None and resource is not None and resource != terms.resource:
            lease.settle(amount, 0)
            self._drop_unused(sub)
            _check_resource(up, resource)  # raises
        extra = 0 if grant.contended else min(prefetch, lease.spare)
        lease.spare -= extra
        lease.reserved += extra
        return self._hand_out(up, key, amount + extra, now)

    def _hand_out(self, up: _Up, key: str, units: int, now: float) -> Grant:
        sub = self._sub(up, key, now)
        sub.granted += units
        sub.expires_at = now + self._ttl_s
        return Grant(units, self._trust_left(up, now), up.lease.contended, via=_via(up))

    def refused(self, token_id: str, key: str, now: float) -> None:
        """The executor answered a forwarded request with an error (or it was withdrawn):
        nothing was granted. A sub-lease that never held units goes as if it never was (a
        process must not keep a foothold in a lease the executor refused it)."""
        sub = self._subs.get((token_id, key))
        if sub is not None:
            sub.pending -= 1
            sub.expires_at = now + self._ttl_s
            self._drop_unused(sub)

    def _drop_unused(self, sub: _Sub) -> None:
        """Forget ``sub`` if it never held units and no request for it is out. (An upstream
        lease never granted holds nothing, and is forgotten at the next renewal once it has no
        sub-leases.)"""
        if not sub.granted and not sub.pending:
            del self._subs[(sub.up.token_id, sub.key)]
            del sub.up.subs[sub.key]

    def lost(self, token_id: str, up_key: str, claim: tuple[int, str] | None) -> None:
        """The broker's totals for its lease ``up_key`` can no longer be trusted (the executor
        refused it, or an answer with a grant was lost, of a forward under ``claim``): retire
        it. It stays renewed while its processes hold sub-leases of it; if the executor no
        longer has it, the next renewal's answer says so, and they end then.

        Only a forward under the claim the executor last accepted for the token retires it:
        any process may name any token with a made-up claim, and the executor refuses such a
        forward, so its lost or withdrawn answer must not end the lease for the token's owner.
        (Should the executor have granted it after all, to an owner the token moved to, those
        units stay counted as held upstream until the lease is settled as final.)"""
        up = self._ups.get(token_id)
        if up is not None and up.lease.key == up_key and claim == up.claim:
            self._retire(up)

    # ---------------------------------------------------------------------------- settlement

    def settle(self, reports: Iterable[Report], now: float) -> bool:
        """Apply processes' running totals; returns whether the upstream totals should go out now
        (debt grew, or spare came back while others wait)."""
        urgent = False
        for token_id, key, returned, used, debt, final in reports:
            sub = self._subs.get((token_id, key))
            if sub is None:
                urgent |= self._late_debt(token_id, key, debt)
                continue
            urgent |= self._apply(sub, sub.up.lease, returned, used, debt)
            if final:
                urgent |= self._end(sub, charge=False)
        return urgent

    def _apply(self, sub: _Sub, lease: LocalLease, returned: int, used: int,
               debt: int) -> bool:
        fresh_used = min(max(0, used - sub.used), sub.held)
        sub.used += fresh_used
        fresh_returned = min(max(0, returned - sub.returned), sub.held)
        sub.returned += fresh_returned
        # As the executor caps a report's debt; and none on a sub-lease that never held units
        # (a request the executor refused leaves no such foothold, but one may still be out).
        new_debt = fresh_debt(debt, sub.debt, _max_debt(sub.up)) if sub.granted else 0
        sub.debt += new_debt
        urgent = False  # units went back upstream (what processes give back is not kept as
        # the broker's spare: see LocalLease.settle), or debt grew
        if fresh_used:
            urgent |= lease.settle(fresh_used, fresh_used)
        if fresh_returned:
            urgent |= lease.settle(fresh_returned, 0)
        if new_debt:
            urgent |= _owe(lease, new_debt)
        return urgent

    def _late_debt(self, token_id: str, key: str, debt: int) -> bool:
        """Overuse declared on a sub-lease after it ended is still owed upstream, on the lease it
        was part of: as debt of that lease while it lives, or, once it was settled as final, as
        a final report again with the larger debt, which the executor charges (see
        :meth:`Scheduler.settle`)."""
        ended = self._ended.get((token_id, key))
        if ended is None:
            return False
        # At most max_overuse in all once it ended, as the executor charges late debt under
        # an ended direct lease (EndedKeys.take_late): a process the token moved away from
        # could otherwise charge its new owner's lease with every report.
        late = min(fresh_debt(debt, ended.applied, ended.max_debt), ended.max_debt - ended.late)
        if late <= 0:
            return False
        lease = ended.lease
        self._ended[(token_id, key)] = _Ended(ended.applied + late, ended.late + late, lease,
                                              ended.max_debt)
        if not lease.final:
            return _owe(lease, late)
        lease.debt = min(MAX_UNITS, lease.debt + late)
        totals = lease.totals()
        self._owed = [r for r in self._owed if (r.token_id, r.key) != (token_id, lease.key)]
        self._owed.append(Report(token_id, lease.key, totals.returned, totals.used, totals.debt,
                                 True))
        return True

    def _end(self, sub: _Sub, *, charge: bool) -> bool:
        """End a sub-lease. What it still holds goes back upstream, or, if the process may have
        used it (expiry of rate and capacity units), counts as used. Returns whether units went
        back, to report at once."""
        held = sub.held
        back = False
        if held:
            lease = sub.up.lease
            used = held if charge and lease.kind is not Kind.CONCURRENCY else 0
            back = lease.settle(held, used)
        del self._subs[(sub.up.token_id, sub.key)]
        del sub.up.subs[sub.key]
        if sub.granted:  # late debt only on a sub-lease that held units
            self._ended[(sub.up.token_id, sub.key)] = _Ended(sub.debt, 0, sub.up.lease,
                                                             _max_debt(sub.up))
            if len(self._ended) > TOMBSTONES:
                self._ended.popitem(last=False)
        return back

    # ------------------------------------------------------------------------------ renewals

    def renew(self, reports: Iterable[Report], now: float) -> Renewed:
        """A process's renewal, after :meth:`settle` applied its totals: extend its sub-leases.

        Returns, per live sub-lease, whether others wait and how long it may be trusted (the
        broker's own trust left); a sub-lease missing from the answer is gone.
        """
        alive: Renewed = {}
        for report in reports:
            is_name, sent = read_name(report)
            if is_name:  # passed on upstream; answered as the executor last answered it
                self._names[(report.token_id, sent)] = None
                if self._kept.get((report.token_id, sent), True):
                    alive[(report.token_id, report.key)] = NAMED
                continue
            sub = self._subs.get((report.token_id, report.key))
            if report.final or sub is None:
                continue
            if sub.up.ended:
                # The executor settled the lease above it: the units may have been used.
                self._end(sub, charge=True)
                continue
            # Still alive, even with no trust left: the broker's renewals may have paused (the
            # executor restarting) while the executor keeps the lease. The process then serves
            # nothing locally, but keeps what it holds, as it would with a direct lease.
            sub.expires_at = now + self._ttl_s
            alive[(report.token_id, report.key)] = LeaseAnswer(sub.up.lease.contended,
                                                               self._trust_left(sub.up, now))
        return alive

    def expire(self, now: float) -> None:
        """End sub-leases whose processes stopped renewing: they are gone, or cut off."""
        for sub in [sub for sub in self._subs.values()
                    if sub.expires_at <= now and not sub.pending]:
            self._end(sub, charge=True)
            self.expiries += 1

    def upstream_reports(self, now: float) -> list[Report]:
        """The broker's own renewal: totals of every upstream lease. Spare goes back unless it
        is in use and nobody waits; a lease with no sub-leases left is settled as final, and
        one the executor ended is not renewed. Final totals that late debt grew go again, and
        the tokens its processes named since the last renewal are named, once each."""
        reports, self._owed, self._unanswered = self._owed + self._unanswered, [], []
        for up in [*self._ups.values(), *self._retired]:
            lease = up.lease
            if not lease.active:  # never granted: nothing to settle upstream
                if not up.subs:  # its forwards all failed, and their processes left
                    self._forget(up)
                continue
            final = not up.subs
            if final:
                lease.release_all()
                self._forget(up)
            elif up.ended:
                continue  # its processes learn at their next renewal that it is gone
            else:
                lease.report(now, keep_spare=not up.retired)
            reports.append(_report(up, final=final))
        self._unanswered = [report for report in reports if report.final]
        reports += [Report(token_id, name_key(self._holder, sent), 0, 0, 0, False)
                    for token_id, sent in self._names]
        self._names = {}
        return reports

    def report_of(self, token_id: str) -> list[Report]:
        """The current totals of the token's upstream leases, to send at once (with final
        totals that late debt grew)."""
        owed = [report for report in self._owed if report.token_id == token_id]
        self._owed = [report for report in self._owed if report.token_id != token_id]
        return owed + [_report(up, final=False) for up in self._ups_of(token_id)
                       if up.lease.active and not up.ended]

    def ending_totals(self, token_id: str, reports: Iterable[Report]) -> list[Report]:
        """The running totals of the token's upstream leases as they will be once ``reports``
        (the ending process's final totals) are applied, changing nothing: carried by a call
        that ends the token (close, merge), so that debt and refunds reach the token before it
        ends. The executor may refuse that call: the broker applies them and
        :meth:`release` s the token only once it accepted."""
        totals = []
        for up in self._ups_of(token_id):
            if not up.lease.active or up.ended:
                continue
            lease = copy.copy(up.lease)
            for report_token, key, returned, used, debt, final in reports:
                if report_token == token_id and (sub := up.subs.get(key)) is not None:
                    sub = copy.copy(sub)
                    self._apply(sub, lease, returned, used, debt)
                    if final and sub.held:
                        lease.settle(sub.held, 0)  # as _end gives it back
            sums = lease.totals()
            totals.append(Report(token_id, lease.key, sums.returned, sums.used, sums.debt,
                                 False))
        return totals

    def release(self, token_id: str) -> list[Report]:
        """The token ends (closed, merged away), after :meth:`settle` applied the final totals
        of the process that ends it: settle its upstream leases as final, or, while other
        processes still hold sub-leases of them, retire them and report their totals.

        Those sub-leases carry on, as their direct leases would at the executor: the process
        the token moved away from may still hold a slot, or an open reservation whose rest
        comes back when it commits. Each ends as a direct lease would (see the module's
        docstring), and the upstream lease is settled as final after the last one.

        Called once the executor accepted the call that ends the token (a refused one changes
        nothing here). The reports go after it, and may be lost: so a lease settled here as
        final is kept, retired, until the next renewal, which reports it as final again (a
        report twice changes nothing) and then forgets it.
        """
        reports = []
        for up in self._ups_of(token_id):
            if up.subs:
                self._retire(up)
                if up.lease.active and not up.ended:
                    reports.append(_report(up, final=False))
                continue
            if up.lease.active:
                up.lease.release_all()
                reports.append(_report(up, final=True))
                self._retire(up)
                if up not in self._retired:
                    self._retired.append(up)
            else:
                self._forget(up)
        return reports

    def upstream_renewed(self, reports: Iterable[Report],
                         alive: Renewed,
                         sent_at: float) -> None:
        """Apply the executor's answer to the broker's renewal of ``reports``, sent at
        ``sent_at``. Only leases the renewal reported are judged by it: one first granted while
        it was out is not in the answer, and is not gone."""
        self._unanswered = [report for report in self._unanswered if report not in reports]
        self._kept = {(report.token_id, sent): (report.token_id, report.key) in alive
                      for report in reports for is_name, sent in [read_name(report)] if is_name}
        reported = {(report.token_id, report.key) for report in reports if not report.final}
        for up in [*self._ups.values(), *self._retired]:
            if (up.token_id, up.lease.key) not in reported or up.lease.final:
                continue
            answer = alive.get((up.token_id, up.lease.key))
            if answer is None:
                self._retire(up)  # the executor expired it: its units are settled there
                up.ended = True
            else:
                contended, ttl_s = answer
                up.lease.renewed(contended=contended, sent_at=sent_at, ttl_s=ttl_s)

    def recall(self, token_ids: Iterable[str]) -> tuple[list[Report], dict[str, set[str]]]:
        """Others wait at the executor: give the broker's spare back, and say which processes
        to tell (holder -> token ids) so that they give theirs back too."""
        reports: list[Report] = []
        tell: dict[str, set[str]] = {}
        for token_id in token_ids:
            up = self._ups.get(token_id)
            if up is None:
                continue
            if up.lease.recall():
                reports.extend(self.report_of(token_id))
            for key in up.subs:
                tell.setdefault(holder_of(key), set()).add(token_id)
        return reports, tell

    # ---------------------------------------------------------------------------- inspection

    def spare(self, token_id: str) -> int:
        up = self._ups.get(token_id)
        return up.lease.spare if up is not None else 0

    def held(self, token_id: str) -> int:
        """Units of the token the broker holds from the executor (spare and sub-leased)."""
        up = self._ups.get(token_id)
        return up.lease.held if up is not None else 0

    def sub_leases(self) -> int:
        return len(self._subs)

    def upstream_leases(self) -> int:
        return len(self._ups) + len(self._retired)

    # ----------------------------------------------------------------------------- internals

    def _current(self, token_id: str, kind: Kind, max_prefetch: int) -> _Up:
        up = self._ups.get(token_id)
        if up is None:
            self._keys += 1
            adoption = self._new_secret()
            lease = LocalLease(kind, key=f"{self._holder}:{self._keys}{adoption_suffix(adoption)}",
                               max_prefetch=max_prefetch)
            up = self._ups[token_id] = _Up(token_id, lease, adoption)
        return up

    def _sub(self, up: _Up, key: str, now: float) -> _Sub:
        """The process's sub-lease ``key`` of ``up``, started if it has none."""
        sub = self._subs.get((up.token_id, key))
        if sub is None:
            sub = self._subs[(up.token_id, key)] = up.subs[key] = _Sub(key, up,
                                                                      now + self._ttl_s)
        return sub

    def _ups_of(self, token_id: str) -> list[_Up]:
        """The token's upstream leases: the current one and any retired ones."""
        return [up for up in (self._ups.get(token_id), *self._retired)
                if up is not None and up.token_id == token_id]

    def _trust_left(self, up: _Up, now: float) -> float:
        return max(0.0, up.lease.valid_until - now)

    def _retire(self, up: _Up) -> None:
        if self._ups.get(up.token_id) is up:
            del self._ups[up.token_id]
        up.retired = True
        up.lease.let_go()  # the spare is not ours to serve any more
        if up.subs and up not in self._retired:
            self._retired.append(up)

    def _forget(self, up: _Up) -> None:
        if self._ups.get(up.token_id) is up:
            del self._ups[up.token_id]
        if up in self._retired:
            self._retired.remove(up)


def _via(up: _Up) -> str:
    """The adoption secret of ``up`` for its processes, bound to the claim the executor last
    accepted for the token (which the process served now used)."""
    if up.claim is None:
        return up.adoption
    generation, claimant = up.claim
    return adoption_via(up.adoption, claimant, up.token_id, generation)


def _check_resource(up: _Up, resource: str | None) -> None:
    """Refuse a request that names another resource than the executor named for the token."""
    if resource is not None and up.terms is not None and up.terms.resource != resource:
        raise ProtocolError(f"token {up.token_id!r} is not a token of resource {resource!r}")


def _max_debt(up: _Up) -> int:
    """The most debt one report may add to ``up``: its resource's max_overuse, once known."""
    return up.terms.max_debt if up.terms is not None else MAX_UNITS


def _owe(lease: LocalLease, debt: int) -> bool:
    """Add ``debt`` to the upstream ``lease``, its running total saturating at MAX_UNITS: the
    lease sums many sub-leases' debt, each capped per report, and a total past what a report
    may carry would make the executor refuse the broker's every renewal, for every process of
    the node. (Debt that large already stops the pool far longer than anyone waits.)"""
    debt = min(debt, MAX_UNITS - lease.debt)
    return lease.settle(0, debt) if debt > 0 else False


def _report(up: _Up, *, final: bool) -> Report:
    """The running totals of the broker's lease ``up``, as it reports them upstream."""
    lease = up.lease
    lease.final = lease.final or final
    totals = lease.totals()
    return Report(up.token_id, lease.key, totals.returned, totals.used, totals.debt, final)
