"""One resource at run time: its pool, its virtual time and its fair queue.

A :class:`Resource` grants its waiters in stride order into leases of the ledger, fails those whose
wait ran out, estimates waits and moves its tokens' passes (credit, refunds, debt). The algorithm
is explained once, in :mod:`ray_quota._core.scheduler`; tokens' lifecycle is the scheduler's too.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from ray_quota._core.fair_queue import FairQueue, Flow, Ticket, Waiter
from ray_quota._core.feedback import Feedback, controller_for
from ray_quota._core.forecast import Estimate, forecast, next_fit, serve
from ray_quota._core.ledger import Lease, LeaseLedger
from ray_quota._core.pools import Pool, RatePool, make_pool
from ray_quota._core.protocol import PREFETCH_FRACTION, RECALL_GRACE_S, Grant, ProviderSignal
from ray_quota._core.state import ChangeLog, SavedResource
from ray_quota._errors import (
    FailedReservation,
    InvalidAmountError,
    LeaseEndedError,
    QuotaError,
    QuotaTerminated,
)
from ray_quota._spec import Enforcement, Kind, ResourceSpec

DEADLINE_SLACK = 64  # deadlines of resolved waiters kept before the watch list is swept
HOLD_SMOOTHING = 0.1  # weight of each returned slot's hold in the reference hold time


@dataclass(frozen=True, slots=True)
class Policy:
    """Scheduler tuning; the defaults suit most resources.

    Attributes:
        credit_factor: a token's maximum credit, in multiples of its expected use.
        lease_ttl_s: how long a lease lives without renewal.
        max_lease_fraction: the most a holder may hold beyond what it asked for, as a fraction of
            the largest single grant the resource allows.
        bypass_factor: how many units, as multiples of a blocked head's request, smaller waiters
            may take before it.
        orphan_grace_s: how long a token that holds nothing (no lease, no waiter) and that no
            renewal names is kept before it is released (a split child's share back to its
            live parent). Live processes name what they hold idle and what they sent that was
            not taken up every renewal interval, and a ``@quota`` task's tokens until it ends,
            so this needs only to outlast a pause a lease would outlast, and a Ray retry of a
            crashed task that took a plain token argument up (the retry names it on arrival):
            one lease time-to-live by default.
    """

    credit_factor: float = 1.0
    lease_ttl_s: float = 10.0
    max_lease_fraction: float = PREFETCH_FRACTION
    bypass_factor: float = 1.0
    orphan_grace_s: float = 10.0


@dataclass(frozen=True, slots=True)
class ResourceStatus:
    """A snapshot of one resource, for status tables and metrics."""

    name: str
    kind: str
    limit: int
    available: int
    in_use: int
    waiters: int
    tokens: int
    leases: int
    leased_units: int
    effective_limit: float | None = None  # rate: what refusals left of the limit (DESIGN 8)


class Resource:
    """One resource's pool, virtual time and queue, and the grants it makes into the ledger.

    Tickets it resolves (granted or failed) are appended to ``resolved``, which the scheduler
    hands out at its next poll; what it changes is recorded in ``changes``.
    """

    __slots__ = (
        "_changes",
        "_deadlines",
        "_hold_s",
        "_leases",
        "_policy",
        "_resolved",
        "feedback",
        "leased",
        "pool",
        "queue",
        "spec",
        "tokens",
    )

    def __init__(self, spec: ResourceSpec, now: float, policy: Policy, leases: LeaseLedger,
                 changes: ChangeLog, resolved: list[Ticket]) -> None:
        self.spec = spec
        self.pool: Pool = make_pool(spec, now)
        self.feedback: Feedback | None = controller_for(spec, now)
        self.queue = FairQueue(policy.bypass_factor, policy.credit_factor)
        self.tokens = 0  # live tokens of this resource
        self.leased = 0  # units in leases
        self._policy = policy
        self._leases = leases
        self._changes = changes
        self._resolved = resolved
        # (deadline, seq, waiter) of waiters that may run out of time; an entry is stale once
        # its waiter is resolved, and stale ones are swept before they outnumber the live.
        self._deadlines: list[tuple[float, int, Waiter]] = []
        self._hold_s: float | None = None  # concurrency: a slot's usual hold, smoothed

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def vtime(self) -> float:
        """The resource's virtual time (see :class:`VirtualTime`)."""
        return self.queue.virtual.now

    # ----------------------------------------------------------------------------------- credit

    def max_credit(self, token: Flow) -> float:
        return self._policy.credit_factor * token.expected_use

    def credit(self, token: Flow) -> float:
        """The token's credit in units: how far its pass lags the virtual time, capped.

        A token whose expected use was all split off counts as weighing one unit, with no
        credit to gain: its pass then holds only the debt charged to it since (see
        :meth:`give_back`), which a merge back hands on.
        """
        weight = max(1, token.expected_use)
        return min(self.max_credit(token), (self.vtime - token.pass_) * weight)

    def reweigh(self, token: Flow, expected_use: int) -> None:
        """Change the token's expected use (a split), keeping its credit per unit of it."""
        token.expected_use = expected_use
        if not expected_use:
            token.pass_ = self.vtime  # its credit or debt went with its expected use
        self.queue.rekey(token)

    def start_pass(self) -> float:
        """Where a token joining now starts: at the virtual time, which moves on with every
        grant (:meth:`VirtualTime.advance`), so a stream of new tokens enters behind what was served and
        cannot starve those already waiting."""
        head = self.queue.head()
        return self.vtime if head is None else max(self.vtime, head.token.pass_)

    def give_back(self, lease: Lease | None, token: Flow | None, units: int, used: int,
                  debt: int, now: float) -> None:
        """Settle part of a lease (see :meth:`Scheduler.give_back`); the caller dispatches."""
        if self.spec.kind is Kind.CONCURRENCY:
            units, used = units + used, 0  # a slot is free again however it was "used"
        overheld = 0.0  # concurrency: slots returned, in multiples of the usual hold, minus one
        if lease is not None and (units or used):
            used = min(used, lease.units)
            units = min(units, lease.units - used)
            if self.spec.kind is Kind.CONCURRENCY and units:
                overheld = self._held(lease, units, now) - units
            lease.units -= units + used
            self.leased -= units + used
            self.pool.give_back(units, now)
        # A token with no expected use left is charged (and refunded) as if it weighed one
        # unit: overuse on it is still its debt, owed when expected use comes back.
        weight = max(1, token.expected_use) if token is not None else 1
        if lease is not None and units and self.spec.kind is not Kind.CONCURRENCY:
            # Units not used were not service: virtual time gives back what their grant
            # moved it, or it would run ahead of every active token and push newcomers back.
            # Before the refund, as the grant moved it before the token's pass.
            self.queue.virtual.step_back(units)
        refund = -overheld if self.spec.kind is Kind.CONCURRENCY else units
        if lease is not None and refund and token is not None:
            floor = self.vtime - self.max_credit(token) / weight
            token.pass_ = max(floor, token.pass_ - refund / weight)
        if debt:
            self.pool.charge_debt(debt, now)
            if token is not None:
                if not token.expected_use:
                    token.pass_ = max(token.pass_, self.vtime)  # debt, never lost in credit
                token.pass_ += debt / weight
        if token is not None:
            self.queue.rekey(token)

    def _held(self, lease: Lease, slots: int, now: float) -> float:
        """What ``slots`` of the lease given back now held, in multiples of a slot's usual
        hold: a concurrency grant charges one slot each, this settles it by time held
        (DESIGN 4: a long holder pays for its hold), so equal holds share slots by weight."""
        self._accrue(lease, now)
        held_s = lease.slot_s * slots / lease.units  # the lease's slots held alike, on average
        lease.slot_s -= held_s
        per_slot, usual = held_s / slots, self._hold_s
        if usual is None:
            usual = per_slot
        # Charged against the usual hold from before this one, which would otherwise pull it
        # towards itself and undercharge the long holds.
        self._hold_s = usual + HOLD_SMOOTHING * (per_slot - usual)
        return held_s / usual if usual > 0 else float(slots)

    @staticmethod
    def _accrue(lease: Lease, now: float) -> None:
        if lease.accrued_at is not None:
            lease.slot_s += lease.units * max(0.0, now - lease.accrued_at)
        lease.accrued_at = now

    def expire(self, lease: Lease, now: float) -> None:
        """Take back what an expired lease held: concurrency slots are free again; rate and
        capacity units stay charged, since its holder may have used them."""
        if self.spec.kind is Kind.CONCURRENCY:
            self.pool.give_back(lease.units, now)
        self.leased -= lease.units

    def close(self, token: Flow) -> None:
        """The token is closed: it no longer counts among this resource's tokens."""
        self.queue.touch(token, closed=True)
        self.tokens -= 1

    # ---------------------------------------------------------------------------------- waiters

    def check_amount(self, amount: int) -> None:
        """Refuse an amount above the most the resource can ever grant at once."""
        if amount > self.spec.ceiling:
            raise self._too_large(amount, "limit")

    def _too_large(self, amount: int, limit: str) -> InvalidAmountError:
        return InvalidAmountError(f"{self.name!r}: {amount} units is more than the {limit} can "
                                  f"ever grant ({self.spec.ceiling})")

    def admit(self, waiter: Waiter, now: float, *, recall_only: bool = False) -> None:
        """Queue ``waiter`` and grant what fits; fail it at once if it cannot be granted in time,
        else watch its deadline (if it has one).

        A request of a reject or terminate resource that the pool cannot grant in time may still
        be covered by spare units sitting in other holders' leases: if free units and that spare
        could cover it, it waits at most :data:`RECALL_GRACE_S` (and never past its deadline)
        while the spare is recalled; if they could not, it fails at once. ``recall_only``: the
        resource sets no wait limit, so it may wait for nothing else.
        """
        token, spec, deadline = waiter.token, self.spec, waiter.deadline
        if not token.waiters:
            # A returning token regains at most its maximum credit.
            token.pass_ = max(token.pass_, self.vtime - self.max_credit(token) / token.expected_use)
            self._changes.tokens.add(waiter.ticket.token_id)
        self.queue.join(waiter)
        contention_starts = self.queue.waiting == 1
        self.dispatch(now)
        if waiter.ticket.outcome is not None:
            return
        if deadline <= now:
            self.fail(waiter, now)
            return
        if spec.enforcement is not Enforcement.THROTTLE and deadline != math.inf:
            estimate = None
            if not recall_only:
                # Only whether it fits in its wait: the forecast need not look further.
                estimate = self._estimate(waiter, now, horizon=deadline - now)
            if recall_only or (estimate is not None and now + estimate.low > deadline):
                if not self._spare_covers(waiter, now):
                    self.fail(waiter, now, estimate)  # waiting would not help: say so now
                    return
                waiter.deadline = min(deadline, now + RECALL_GRACE_S)
                self._leases.recall(spec.name)  # even if others already wait: it is what it waits for
                contention_starts = False
        if contention_starts:
            self._leases.recall(spec.name)
        if waiter.deadline != math.inf:
            self._watch(waiter)

    def _spare_cap(self) -> int:
        """The most spare units the executor grants into a lease beyond a request."""
        return max(1, int(self.spec.ceiling * self._policy.max_lease_fraction))

    def _spare_covers(self, waiter: Waiter, now: float) -> bool:
        """Whether the free units and the spare that other leases of the resource may hold
        could cover ``waiter``: what a recall can bring back.

        The executor cannot tell a lease's spare from its open reservations, so each lease
        counts for what it holds, but at most the spare a grant adds to one; a concurrency slot
        freed and not yet reported looks the same, and counts alike. The waiter's own lease is
        left out: its holder asked because that lease's spare was not enough.
        """
        need = waiter.ticket.amount - self.pool.available(now)
        cap, own = self._spare_cap(), (waiter.ticket.token_id, waiter.ticket.key)
        for lease in self._leases.of_resource(self.name):
            if need <= 0:
                break
            if lease.ident != own:
                need -= min(lease.units, cap)
        return need <= 0

    def _watch(self, waiter: Waiter) -> None:
        deadlines = self._deadlines
        heapq.heappush(deadlines, (waiter.deadline, waiter.seq, waiter))
        if len(deadlines) > 2 * self.queue.waiting + DEADLINE_SLACK:
            deadlines[:] = [entry for entry in deadlines if not entry[2].done]
            heapq.heapify(deadlines)

    @property
    def watched(self) -> int:
        """Deadline entries held, resolved waiters' included until swept (for tests)."""
        return len(self._deadlines)

    def fail_due(self, now: float) -> None:
        """Fail the waiters whose deadline is at or before ``now``, earliest first."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            waiter = heapq.heappop(deadlines)[2]
            if not waiter.done:
                self.fail(waiter, now)

    def next_deadline(self) -> float | None:
        """The earliest deadline of a waiter still waiting, or None."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][2].done:
            heapq.heappop(deadlines)
        return deadlines[0][0] if deadlines else None

    def dispatch(self, now: float) -> None:
        """Grant waiters in stride order while they fit, letting smaller ones past a blocked
        head within its bypass budget."""
        pool = self.pool
        self._learn(now)
        serve(self.queue, lambda: pool.available(now),
              lambda waiter, free: self._grant(waiter, free, now))

    def _grant(self, waiter: Waiter, available: int, now: float) -> None:
        token, ticket, policy = waiter.token, waiter.ticket, self._policy
        key = (ticket.token_id, ticket.key)
        if self._leases.is_ended(key):
            # Its lease ended while it waited: granting under that key would start a fresh
            # lease that the holder's running totals no longer match.
            self.queue.leave(waiter)
            self.resolve(waiter, LeaseEndedError("this lease ended while the request waited; "
                                                 "ask under a new lease key"))
            return
        extra = 0
        if waiter.prefetch and self.queue.waiting == 1:  # nobody else waits
            extra = max(0, min(waiter.prefetch, self._spare_cap(), available - ticket.amount))
        units = ticket.amount + extra
        self.pool.take(units, now)
        # While it still waits, so that the token counts among those served.
        self.queue.virtual.advance(units)
        self.queue.leave(waiter)
        token.pass_ += units / token.expected_use
        self.queue.rekey(token)
        lease = self._leases.get(key)
        expires = now + policy.lease_ttl_s
        if lease is None:
            lease = self._leases.add(Lease(ticket.token_id, ticket.key, self.name, 0, expires))
        else:
            self._leases.extend(lease, expires)
        if self.spec.kind is Kind.CONCURRENCY:
            self._accrue(lease, now)
        lease.units += units
        self.leased += units
        self._changes.tokens.add(ticket.token_id)
        self._changes.leases.add(key)
        self._changes.resources.add(self.name)
        self.resolve(waiter, Grant(units, policy.lease_ttl_s, self.queue.waiting > 0,
                                   resource=self.name))

    def fail(self, waiter: Waiter, now: float, estimate: Estimate | None = None) -> None:
        """Fail a waiter whose wait ran out (or would): reject or terminate, by enforcement.
        The refusal says when to try again: the forecast's latest (``estimate``, if one was
        made already)."""
        spec = self.spec
        error: QuotaError
        if spec.enforcement is Enforcement.TERMINATE:
            error = QuotaTerminated(spec.name, waiter.ticket.amount)
        else:
            estimate = estimate or self._estimate(waiter, now)
            retry = None if estimate is None else estimate.high
            error = FailedReservation(spec.name, waiter.ticket.amount, retry)
        self.queue.leave(waiter)
        self.resolve(waiter, error)
        self.dispatch(now)  # a blocked head leaving may unblock the rest

    def resolve(self, waiter: Waiter, outcome: Grant | QuotaError) -> None:
        waiter.done = True
        waiter.ticket.outcome = outcome
        self._resolved.append(waiter.ticket)

    def _estimate(self, waiter: Waiter, now: float,
                  horizon: float = math.inf) -> Estimate | None:
        if not isinstance(self.pool, RatePool):
            return None
        return forecast(self.queue, self.pool, now, waiter, horizon=horizon)

    def estimate_wait(self, token: Flow, amount: int, now: float) -> float | None:
        """Seconds until ``amount`` units could be granted to ``token`` if it asked now (rate
        resources only: for the others it depends on when holders give back). Exact unless
        the queue ahead is long; then the latest it could take."""
        if not isinstance(self.pool, RatePool):
            return None
        # Where it would join: behind its own queued requests, or (as admit places it) at
        # most its maximum credit behind the virtual time.
        pass_ = max(token.pass_, self.vtime - self.max_credit(token) / max(token.expected_use, 1))
        estimate = forecast(self.queue, self.pool, now, ask=(token, amount, pass_))
        return None if estimate is None else estimate.high

    def wakeup(self, now: float) -> float | None:
        """When a waiter's deadline comes, or a rate pool's head (or a smaller waiter allowed
        past it) next fits; or None."""
        deadline = self.next_deadline()
        fit = next_fit(self.queue, self.pool, now) if isinstance(self.pool, RatePool) else None
        grow = (self.feedback.next_tick(now) if self.feedback is not None and self.queue.waiting
                else None)  # a waiter may fit once the effective limit grows
        return min((t for t in (deadline, fit, grow) if t is not None), default=None)

    # -------------------------------------------------------------------- provider feedback

    def heed(self, signal: ProviderSignal, now: float) -> None:
        """Take what the provider said (DESIGN 8): a refusal lowers the effective limit,
        empties the bucket and holds grants until its retry-after, and asks holders for their
        spare back; what it says remains caps the bucket.

        Raises:
            InvalidAmountError: the resource is not a rate (nothing changes).
        """
        feedback, pool = self.feedback, self.pool
        if feedback is None or not isinstance(pool, RatePool):
            raise InvalidAmountError(f"{self.name!r}: provider feedback applies to rate "
                                     f"resources only, not {self.spec.kind.value}")
        cap = math.inf
        if signal.refused:
            feedback.refused(now, signal.retry_after_s)
            cap = 0.0  # the provider's window is full: so is ours
            self._leases.recall(self.name)  # spare in holders' leases would be refused too
        if signal.remaining is not None:
            cap = min(cap, feedback.remaining(now, signal.remaining, signal.reset_s))
        pool.throttle(feedback.scale, now)
        pool.hold(feedback.hold_until, cap, now)
        self._changes.resources.add(self.name)
        self.dispatch(now)

    def _learn(self, now: float) -> None:
        """Probe the effective limit back up if a quiet interval has passed."""
        if self.feedback is not None and self.feedback.tick(now):
            assert isinstance(self.pool, RatePool)
            self.pool.throttle(self.feedback.scale, now)
            self._changes.resources.add(self.name)

    # ---------------------------------------------------------------------------------- limits

    def set_limit(self, spec: ResourceSpec, now: float) -> None:
        """Change the limit, keeping what is spent or in use; fail waiters it can never grant."""
        if spec.kind is not self.spec.kind:
            raise InvalidAmountError(
                f"{spec.name!r}: cannot change a {self.spec.kind.value} resource into "
                f"{spec.kind.value}")
        self.pool.resize(spec, now)
        self.spec = spec
        self.feedback = controller_for(spec, now)  # a new limit is learned afresh
        if isinstance(self.pool, RatePool):
            self.pool.throttle(1.0, now)
        for waiter in self.queue.waiters():
            if waiter.ticket.amount > spec.ceiling:
                self.queue.leave(waiter)
                self.resolve(waiter, self._too_large(waiter.ticket.amount, "new limit"))
        self._changes.resources.add(spec.name)
        self._leases.recall(spec.name)  # holders give spare units back: the new limit binds now
        self.dispatch(now)

    def status(self, now: float, leases: int) -> ResourceStatus:
        effective = None if self.feedback is None else self.feedback.limit
        return ResourceStatus(self.name, self.spec.kind.value, self.spec.value,
                              self.pool.available(now), self.pool.in_use(now),
                              self.queue.waiting, self.tokens, leases, self.leased, effective)

    def saved(self, now: float) -> SavedResource:
        return SavedResource(self.spec, self.pool.save(now), self.vtime)

    def load(self, saved: SavedResource, elapsed_s: float, now: float) -> None:
        """Take up a saved definition, pool level and virtual time, ``elapsed_s`` seconds old."""
        self.spec = saved.spec
        self.pool = make_pool(saved.spec, now)
        self.feedback = controller_for(saved.spec, now)  # not saved: learned afresh
        self.pool.load(saved.pool, elapsed_s, now)
        self.queue.virtual.now = saved.vtime
