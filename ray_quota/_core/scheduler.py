"""The fair credit scheduler: tokens, their credit, the queue of waiters and the leases of holders.

This is the executor's brain, kept free of Ray, pydantic and wall clocks so it is deterministic under
a fake clock. Every call takes ``now`` from the injected clock; decisions come back as values
(:class:`Ticket` outcomes), never as side effects on callers.

Fairness is stride scheduling over units. Each token has a *pass* in the resource's virtual time;
a grant of ``n`` units moves it forward by ``n / expected_use``, so a token's share of a contended
pool is proportional to its expected use. A token's *credit* is how far its pass lags the virtual
time, in units: ``(vtime - pass) * expected_use``, capped at ``credit_factor * expected_use`` (the
maximum credit), so a long-idle token gains at most that much advantage. Overuse pushes the pass
forward (debt); unused units given back pull it back (refund). Split and merge keep credit per unit
of expected use, so credit is divided or added in proportion.

Waiters queue per token (FIFO) and tokens compete by pass. A head waiter too large for the free
units lets smaller waiters go first only until they have taken as many units as it asked for; then
everyone waits for it. That keeps the pool busy without starving large requests.

Units leave a pool as *leases* to holders (processes, or brokers that re-lease). A holder serves
reservations from its lease without asking; it gives unused units back, renews its leases, and
when it stops renewing, the lease expires: concurrency slots come back, rate and capacity units
stay charged, because the holder may have used them.
"""

from __future__ import annotations

import heapq
import math
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from ray_quota._errors import (
    FailedReservation,
    LeaseEndedError,
    ForgedTokenError,
    IncompatibleTokensError,
    InvalidAmountError,
    QuotaError,
    QuotaTerminated,
    TokenClosedError,
    TokenMovedError,
    TokenStateError,
    UnknownResourceError,
)
from ray_quota._core.pools import Pool, RatePool, make_pool
from ray_quota._core.protocol import PREFETCH_FRACTION, Grant, TokenInfo
from ray_quota._spec import Enforcement, Kind, ResourceSpec, check_units

Clock = Callable[[], float]

_TOMBSTONES = 100_000  # closed token ids remembered, so late use says "closed", not "forged"
_BACKFILL_SCAN = 64  # waiters looked at when the head is blocked


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
        orphan_grace_s: how long a token whose every lease expired is kept for a Ray retry of
            its task to take it up again, before it is released.
    """

    credit_factor: float = 1.0
    lease_ttl_s: float = 10.0
    max_lease_fraction: float = PREFETCH_FRACTION
    bypass_factor: float = 1.0
    orphan_grace_s: float = 60.0




@dataclass(slots=True, eq=False)
class Ticket:
    """One acquire request; ``outcome`` is None while it waits."""

    id: int
    token_id: str
    holder: str
    amount: int
    outcome: Grant | QuotaError | None = None


@dataclass(slots=True, eq=False)
class _Token:
    id: str
    resource: str
    expected_use: int
    pass_: float
    claimant: str | None
    label: str | None
    generation: int = 0
    waiters: deque[_Waiter] = field(default_factory=deque)


@dataclass(slots=True, eq=False)
class _Waiter:
    ticket: Ticket
    token: _Token
    prefetch: int
    deadline: float
    seq: int
    version: int = 0
    bypassed: int = 0
    done: bool = False


@dataclass(slots=True, eq=False)
class _Lease:
    token_id: str
    holder: str
    resource: str
    units: int
    expires_at: float
    # Running totals the holder reported and that were applied: settling is idempotent.
    returned: int = 0
    used: int = 0
    debt: int = 0


@dataclass(slots=True, eq=False)
class _Resource:
    spec: ResourceSpec
    pool: Pool
    vtime: float = 0.0
    queue: list[tuple[float, int, int, _Waiter]] = field(default_factory=list)
    waiting: int = 0
    tokens: int = 0
    leased: int = 0
    leases: set[tuple[str, str]] = field(default_factory=set)  # (token id, holder)


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




@dataclass(frozen=True, slots=True)
class SavedResource:
    """A resource's durable state: its definition, pool level and virtual time."""

    spec: ResourceSpec
    pool: float
    vtime: float


@dataclass(frozen=True, slots=True)
class SavedToken:
    id: str
    resource: str
    expected_use: int
    pass_: float
    generation: int
    claimant: str | None
    label: str | None


@dataclass(frozen=True, slots=True)
class SavedLease:
    token_id: str
    holder: str
    resource: str
    units: int
    returned: int
    used: int
    debt: int


@dataclass(frozen=True, slots=True)
class Changes:
    """What changed since the last drain: rows to write and keys to delete."""

    resources: list[SavedResource]
    tokens: list[SavedToken]
    closed_tokens: list[str]
    leases: list[SavedLease]
    dropped_leases: list[tuple[str, str]]

    def __bool__(self) -> bool:
        return bool(self.resources or self.tokens or self.closed_tokens or self.leases
                    or self.dropped_leases)


class Scheduler:
    """Pools, tokens, waiters and leases of one environment.

    Example:
        >>> clock = iter(range(100)).__next__
        >>> sched = Scheduler({"tok": ResourceSpec("tok", Kind.CAPACITY, value=10)}, clock=clock)
        >>> token = sched.open_token("tok", expected_use=5, claimant="me")
        >>> sched.acquire(token.id, 0, "me", "proc-1", amount=4).outcome.units
        4
    """

    def __init__(
        self,
        resources: Mapping[str, ResourceSpec],
        *,
        clock: Clock,
        policy: Policy = Policy(),
        new_id: Callable[[], str] = lambda: secrets.token_urlsafe(16),
    ) -> None:
        self._clock = clock
        self.policy = policy
        self._new_id = new_id
        now = clock()
        self._resources = {name: _Resource(spec, make_pool(spec, now))
                           for name, spec in resources.items()}
        self._tokens: dict[str, _Token] = {}
        self._closed: OrderedDict[str, None] = OrderedDict()
        self._leases: dict[tuple[str, str], _Lease] = {}
        self._by_holder: dict[str, set[str]] = {}
        self._lease_count: dict[str, int] = {}  # token id -> its live leases
        self._deadlines: list[tuple[float, int, _Waiter]] = []
        self._expiries: list[tuple[float, str, str]] = []
        self._resolved: list[Ticket] = []
        self._orphans: dict[str, float] = {}  # token id -> when to release it
        # Leases that ended (expired or settled as final), with the debt applied by then: their
        # keys are never used again, so a late report cannot be applied to a fresh lease.
        self._ended: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._recalls: dict[str, set[str]] = {}
        # What changed since the last drain_changes(), for a durable store to write.
        self._dirty_tokens: set[str] = set()
        self._dirty_leases: set[tuple[str, str]] = set()
        self._dirty_resources: set[str] = set(self._resources)
        self._seq = 0
        self.lease_expiries = 0

    # ----------------------------------------------------------------------------------- tokens

    def open_token(self, resource: str, expected_use: int, *, claimant: str | None,
                   label: str | None = None) -> TokenInfo:
        """Create a token with no credit yet; ``claimant`` is the process that will use it."""
        res = self._resource(resource)
        check_units("expected_use", expected_use)
        token = _Token(self._new_id(), resource, expected_use, self._vtime_now(res), claimant,
                       label)
        self._tokens[token.id] = token
        self._dirty_tokens.add(token.id)
        res.tokens += 1
        return TokenInfo(token.id, res.spec, 0)

    def split(self, token_id: str, generation: int, claimant: str | None,
              child_expected_use: int) -> TokenInfo:
        """Move ``child_expected_use`` and the same share of credit (or debt) into a new token."""
        token = self._live(token_id, generation, claimant)
        check_units("child_expected_use", child_expected_use)
        if child_expected_use > token.expected_use:
            raise InvalidAmountError(
                f"cannot split {child_expected_use} from a token whose expected use is "
                f"{token.expected_use}")
        if child_expected_use == token.expected_use and token.waiters:
            raise TokenStateError("cannot split all expected use from a token while it waits")
        # Same pass means same credit per unit of weight: credit divides in proportion.
        child = _Token(self._new_id(), token.resource, child_expected_use, token.pass_,
                       claimant, token.label)
        token.expected_use -= child_expected_use
        self._tokens[child.id] = child
        self._dirty_tokens.update((token.id, child.id))
        res = self._resources[token.resource]
        res.tokens += 1
        return TokenInfo(child.id, res.spec, 0)

    def merge(self, token_id: str, generation: int, claimant: str | None,
              other_id: str, other_generation: int) -> None:
        """Add ``other``'s expected use and credit to the token; ``other`` is closed."""
        if other_id == token_id:
            raise IncompatibleTokensError("a token cannot be merged with itself")
        token = self._live(token_id, generation, claimant)
        other = self._live(other_id, other_generation, claimant)
        if other.resource != token.resource:
            raise IncompatibleTokensError(
                f"cannot merge a token of {other.resource!r} into one of {token.resource!r}")
        if other.waiters:
            raise TokenStateError("cannot merge a token while it has reservations waiting")
        self._absorb(token, other)

    def merge_back(self, child_id: str, generation: int, claimant: str | None,
                   parent_id: str) -> bool:
        """Return a child's expected use and credit to the token it was split from.

        The child's owner needs no right over the parent: adding to a token never hurts it.
        If the parent is gone, the child is simply closed. Returns whether it merged.
        """
        child = self._live(child_id, generation, claimant)
        parent = self._tokens.get(parent_id)
        if parent is None or parent.resource != child.resource or parent is child or \
                child.waiters:
            self._forget(child)
            return False
        self._absorb(parent, child)
        return True

    def _absorb(self, token: _Token, other: _Token) -> None:
        """Add ``other``'s expected use and credit (or debt) to ``token``; ``other`` is closed."""
        res = self._resources[token.resource]
        credit = self._credit(res, token) + self._credit(res, other)
        token.expected_use += other.expected_use
        token.pass_ = res.vtime - credit / max(1, token.expected_use)
        self._dirty_tokens.add(token.id)
        self._rekey(res, token)
        self._forget(other)

    def describe(self, token_id: str, generation: int, claimant: str | None) -> tuple[int, float]:
        """The token's expected use and credit, as the executor holds them."""
        token = self._live(token_id, generation, claimant)
        return token.expected_use, self._credit(self._resources[token.resource], token)

    def close_token(self, token_id: str, generation: int, claimant: str | None) -> None:
        """Close the token: its waiters fail and its weight leaves the scheduler."""
        self._forget(self._live(token_id, generation, claimant))

    def credit(self, token_id: str) -> float:
        """The token's credit in units; negative while it carries debt."""
        token = self._tokens[token_id]
        return self._credit(self._resources[token.resource], token)

    def token_label(self, token_id: str) -> str | None:
        token = self._tokens.get(token_id)
        return token.label if token else None

    def token_key(self, token_id: str) -> tuple[str, str | None] | None:
        """The token's resource and label (for metrics), or None once it is gone."""
        token = self._tokens.get(token_id)
        return (token.resource, token.label) if token else None

    def expected_use_by_label(self) -> dict[tuple[str, str | None], tuple[int, int]]:
        """Live tokens and their total expected use, per resource and label (for metrics)."""
        totals: dict[tuple[str, str | None], tuple[int, int]] = {}
        for token in self._tokens.values():
            count, use = totals.get((token.resource, token.label), (0, 0))
            totals[(token.resource, token.label)] = (count + 1, use + token.expected_use)
        return totals

    # ---------------------------------------------------------------------------------- acquire

    def acquire(self, token_id: str, generation: int, claimant: str | None, holder: str,
                amount: int, *, prefetch: int = 0, timeout: float | None = None) -> Ticket:
        """Ask for ``amount`` units (plus up to ``prefetch`` spare) into ``holder``'s lease.

        The ticket comes back granted, failed, or waiting; a waiting ticket is resolved by a later
        call and reported by :meth:`poll`.

        Raises:
            InvalidAmountError: ``amount`` is not a whole number from 1 to the resource's ceiling.
            TokenStateError, ForgedTokenError: the token cannot be used.
        """
        token = self._live(token_id, generation, claimant)
        if (token_id, holder) in self._ended:
            raise LeaseEndedError("this lease ended (it expired or was settled); ask under a "
                                  "new lease key")
        res = self._resources[token.resource]
        spec = res.spec
        check_units("amount", amount)
        if amount > spec.ceiling:
            raise InvalidAmountError(
                f"{spec.name!r}: {amount} units is more than the limit can ever grant "
                f"({spec.ceiling})")
        if token.expected_use == 0:
            raise TokenStateError("the token has no expected use left: merge a child back first")
        now = self._clock()
        self._seq += 1
        ticket = Ticket(self._seq, token_id, holder, amount)
        deadline = now + _wait_allowed(spec, timeout)
        waiter = _Waiter(ticket, token, max(0, int(prefetch)), deadline, self._seq)
        if not token.waiters:
            # A returning token regains at most its maximum credit.
            token.pass_ = max(token.pass_, res.vtime - self._max_credit(token) / token.expected_use)
            self._dirty_tokens.add(token.id)
        token.waiters.append(waiter)
        res.waiting += 1
        contention_starts = res.waiting == 1
        if len(token.waiters) == 1:
            self._push(res, waiter)
        self._dispatch(res, now)
        if ticket.outcome is None:
            if deadline <= now or (spec.enforcement is not Enforcement.THROTTLE
                                   and deadline != math.inf
                                   and (estimate := self._estimate(res, waiter, now)) is not None
                                   and now + estimate > deadline):
                self._fail(res, waiter, now)
            else:
                if deadline != math.inf:
                    heapq.heappush(self._deadlines, (deadline, waiter.seq, waiter))
                if contention_starts:
                    self._recall(res)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Withdraw a waiting ticket (its caller gave up); no effect once resolved."""
        token = self._tokens.get(ticket.token_id)
        if token is None or ticket.outcome is not None:
            return
        for waiter in token.waiters:
            if waiter.ticket is ticket:
                self._remove_waiter(self._resources[token.resource], waiter)
                ticket.outcome = TokenStateError("reservation cancelled")
                self._dispatch(self._resources[token.resource], self._clock())
                return

    def estimate_wait(self, token_id: str, amount: int) -> float | None:
        """Seconds until ``amount`` units could be granted to the token if it asked now.

        Exact for rate resources given the refill phase and the queue that would be ahead;
        None for capacity and concurrency, where it depends on when others give back.
        """
        token = self._tokens[token_id]
        res = self._resources[token.resource]
        if not isinstance(res.pool, RatePool):
            return None
        now = self._clock()
        weight = max(token.expected_use, 1)
        if token.waiters:  # behind its own queued requests
            key = token.pass_ + sum(w.ticket.amount for w in token.waiters) / weight
        else:
            key = max(token.pass_, res.vtime - self._max_credit(token) / weight)
        ahead = self._ahead(res, key, math.inf, None)
        return res.pool.time_until(ahead + amount, now)

    # ----------------------------------------------------------------------- returns and leases

    def give_back(self, token_id: str, holder: str, units: int = 0, *, used: int = 0,
                  debt: int = 0) -> None:
        """Settle part of a lease: ``units`` unused go back to the pool, ``used`` were consumed,
        ``debt`` were consumed beyond any grant (overuse).

        Accepted whatever the token's generation: settling is always safe. Units of a lease
        that already expired are ignored, since expiry settled them; debt is charged regardless.
        """
        check_units("units", units, allow_zero=True)
        check_units("used", used, allow_zero=True)
        check_units("debt", debt, allow_zero=True)
        now = self._clock()
        lease = self._leases.get((token_id, holder))
        token = self._tokens.get(token_id)
        if lease is not None:
            res = self._resources[lease.resource]
        elif token is not None:
            res = self._resources[token.resource]
        else:
            return
        if res.spec.kind is Kind.CONCURRENCY:
            units, used = units + used, 0  # a slot is free again however it was "used"
        if lease is not None and (units or used):
            used = min(used, lease.units)
            units = min(units, lease.units - used)
            lease.units -= units + used
            res.leased -= units + used
            res.pool.give_back(units, now)
        if lease is not None and units:
            if token is not None and token.expected_use:
                floor = res.vtime - self._max_credit(token) / token.expected_use
                token.pass_ = max(floor, token.pass_ - units / token.expected_use)
        if debt:
            res.pool.charge_debt(debt, now)
            if token is not None and token.expected_use:
                token.pass_ += debt / token.expected_use
        if token is not None:
            self._dirty_tokens.add(token.id)
            self._rekey(res, token)
        self._dirty_leases.add((token_id, holder))
        self._dirty_resources.add(res.spec.name)
        self._dispatch(res, now)

    def settle(self, token_id: str, holder: str, returned: int, used: int, debt: int, *,
               final: bool = False) -> None:
        """Apply a holder's running totals for its lease of the token.

        Totals, not increments: a report that arrives twice, late or out of order changes
        nothing the first did. ``final`` says the holder will never use this lease again, so
        whatever it still holds by the executor's count (a grant whose answer was lost, say)
        goes back to the pool and the lease ends.
        """
        lease = self._leases.get((token_id, holder))
        if lease is None:
            ended_debt = self._ended.get((token_id, holder))
            if ended_debt is not None and debt > ended_debt:
                # Expiry settled the units, not overuse declared since: that is still owed.
                self._ended[(token_id, holder)] = debt
                self.give_back(token_id, holder, debt=debt - ended_debt)
            return
        if final:
            # Ended first, so that units freed below are not granted back under this key.
            self._ended[(token_id, holder)] = lease.debt
        fresh_returned = max(0, returned - lease.returned)
        fresh_used = max(0, used - lease.used)
        fresh_debt = max(0, debt - lease.debt)
        lease.returned += fresh_returned
        lease.used += fresh_used
        lease.debt += fresh_debt
        if fresh_returned or fresh_used or fresh_debt:
            self.give_back(token_id, holder, fresh_returned, used=fresh_used, debt=fresh_debt)
        if final:
            if lease.units:
                self.give_back(token_id, holder, lease.units)
            self._end_lease(lease)

    def renew_lease(self, token_id: str, holder: str) -> bool | None:
        """Extend one lease; None if there is none (it expired), else whether others wait."""
        lease = self._leases.get((token_id, holder))
        if lease is None:
            return None
        lease.expires_at = self._clock() + self.policy.lease_ttl_s
        heapq.heappush(self._expiries, (lease.expires_at, token_id, holder))
        return self._resources[lease.resource].waiting > 0

    def renew(self, holder: str) -> dict[str, bool]:
        """Extend every lease of ``holder``; returns, per token, whether others are waiting.

        A token missing from the answer has no lease any more (it expired or was settled):
        the holder must not serve its spare units.
        """
        now = self._clock()
        expires = now + self.policy.lease_ttl_s
        contended = {}
        for token_id in self._by_holder.get(holder, ()):
            lease = self._leases[(token_id, holder)]
            lease.expires_at = expires
            heapq.heappush(self._expiries, (expires, token_id, holder))
            contended[token_id] = self._resources[lease.resource].waiting > 0
        return contended

    def adopt(self, token_id: str, from_key: str, to_key: str, units: int, returned: int,
              used: int, debt: int) -> bool:
        """Move ``units`` of the lease ``from_key`` into a new lease ``to_key`` whose totals
        start at ``returned``, ``used`` and ``debt``: a broker's process re-attaching directly.

        The process keeps serving the units it held from the broker, under its own key, with its
        running totals as they were. ``debt`` is charged again, because the executor cannot tell
        whether the broker passed it on before it failed: an overcharge, never an overgrant.
        Returns False, changing nothing, if ``from_key`` no longer holds a lease (it expired,
        and expiry settled its units) or ``to_key`` was used before; True if ``to_key`` is
        already this adoption (a repeated call).
        """
        for what, value in (("units", units), ("returned", returned), ("used", used),
                            ("debt", debt)):
            check_units(what, value, allow_zero=True)
        if (token_id, to_key) in self._leases:
            return True
        source = self._leases.get((token_id, from_key))
        if source is None or (token_id, to_key) in self._ended:
            return False
        moved = min(units, source.units)
        source.units -= moved
        now = self._clock()
        lease = self._add_lease(_Lease(token_id, to_key, source.resource, moved,
                                       now + self.policy.lease_ttl_s, returned=returned,
                                       used=used))
        self._dirty_leases.add((token_id, from_key))
        if debt:
            lease.debt = debt
            self.give_back(token_id, to_key, debt=debt)
        return True

    def take_recalls(self) -> dict[str, set[str]]:
        """Holders to tell, per token, that others now wait: they should stop serving locally
        and give spare units back. Drained by the call."""
        recalls, self._recalls = self._recalls, {}
        return recalls

    def held(self, token_id: str, holder: str) -> int:
        """Units in ``holder``'s lease of the token."""
        lease = self._leases.get((token_id, holder))
        return lease.units if lease else 0

    # --------------------------------------------------------------------------------- the loop

    def poll(self) -> list[Ticket]:
        """Grant what now fits, expire what is due, and return tickets resolved since last poll.

        Grants come first: a request that can be served exactly at its deadline is served.
        """
        now = self._clock()
        for res in self._resources.values():
            if res.waiting:
                self._dispatch(res, now)
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, waiter = heapq.heappop(self._deadlines)
            if not waiter.done:
                self._fail(self._resources[waiter.token.resource], waiter, now)
        while self._expiries and self._expiries[0][0] <= now:
            expires_at, token_id, holder = heapq.heappop(self._expiries)
            lease = self._leases.get((token_id, holder))
            if lease is not None and lease.expires_at == expires_at:
                self._expire(lease, now)
        if self._orphans:
            self._release_orphans(now)
        for res in self._resources.values():
            if res.waiting:
                self._dispatch(res, now)
        resolved, self._resolved = self._resolved, []
        return resolved

    def next_wakeup(self) -> float | None:
        """When :meth:`poll` next has something to do with no other call in between, or None."""
        now = self._clock()
        times = []
        if self._deadlines:
            times.append(self._deadlines[0][0])
        if self._expiries:
            times.append(self._expiries[0][0])
        for res in self._resources.values():
            head = self._peek(res)
            if head is not None and isinstance(res.pool, RatePool):
                # The head, or a smaller waiter allowed past it while it is blocked.
                smallest = min((w.ticket.amount for w in self._may_pass(res, head)),
                               default=head.ticket.amount)
                wait = res.pool.time_until(min(head.ticket.amount, smallest), now)
                if wait is not None:
                    times.append(now + wait)
        return min(times) if times else None

    # ----------------------------------------------------------------------- limits and status

    def set_limit(self, spec: ResourceSpec) -> None:
        """Change a resource's limit at run time; what is spent or in use is kept."""
        res = self._resource(spec.name)
        if spec.kind is not res.spec.kind:
            raise InvalidAmountError(
                f"{spec.name!r}: cannot change a {res.spec.kind.value} resource into "
                f"{spec.kind.value}")
        now = self._clock()
        res.pool.resize(spec, now)
        res.spec = spec
        for _, _, waiter in list(self._valid(res.queue)):
            for queued in list(waiter.token.waiters):  # asks for more than can ever be granted
                if queued.ticket.amount > spec.ceiling:
                    self._remove_waiter(res, queued)
                    self._resolve(queued, InvalidAmountError(
                        f"{spec.name!r}: {queued.ticket.amount} units is more than the new "
                        f"limit can ever grant ({spec.ceiling})"))
        self._dirty_resources.add(spec.name)
        self._recall(res)  # holders give spare units back, so the new limit binds at once
        self._dispatch(res, now)

    def specs(self) -> dict[str, ResourceSpec]:
        return {name: res.spec for name, res in self._resources.items()}

    def status(self) -> list[ResourceStatus]:
        """One snapshot per resource."""
        now = self._clock()
        leases: dict[str, int] = {}
        for lease in self._leases.values():
            if lease.units:
                leases[lease.resource] = leases.get(lease.resource, 0) + 1
        return [
            ResourceStatus(name, res.spec.kind.value, res.spec.value, res.pool.available(now),
                           res.pool.in_use(now), res.waiting, res.tokens, leases.get(name, 0),
                           res.leased)
            for name, res in self._resources.items()
        ]

    def pool(self, resource: str) -> Pool:
        return self._resource(resource).pool

    # ---------------------------------------------------------------------------- durability

    def drain_changes(self) -> Changes:
        """Everything that changed since the last call, to be written before replies go out."""
        now = self._clock()
        resources = [SavedResource(res.spec, res.pool.save(now), res.vtime)
                     for name in self._dirty_resources if (res := self._resources.get(name))]
        tokens, closed = [], []
        for token_id in self._dirty_tokens:
            token = self._tokens.get(token_id)
            if token is None:
                closed.append(token_id)
            else:
                tokens.append(SavedToken(token.id, token.resource, token.expected_use,
                                         token.pass_, token.generation, token.claimant,
                                         token.label))
        leases, dropped = [], []
        for key in self._dirty_leases:
            lease = self._leases.get(key)
            if lease is None:
                dropped.append(key)
            else:
                leases.append(SavedLease(lease.token_id, lease.holder, lease.resource,
                                         lease.units, lease.returned, lease.used, lease.debt))
        self._dirty_resources.clear()
        self._dirty_tokens.clear()
        self._dirty_leases.clear()
        return Changes(resources, tokens, closed, leases, dropped)

    def restore(self, resources: Iterable[SavedResource], tokens: Iterable[SavedToken],
                leases: Iterable[SavedLease], elapsed_s: float) -> None:
        """Take up a saved state, ``elapsed_s`` seconds old; every lease gets a fresh TTL so
        holders that come back can renew, and the rest expire as if their holder had died."""
        now = self._clock()
        for saved in resources:
            res = self._resources.get(saved.spec.name)
            if res is None:
                continue  # the saved state wins over a new manifest only for known resources
            res.spec = saved.spec
            res.pool = make_pool(saved.spec, now)
            res.pool.load(saved.pool, elapsed_s, now)
            res.vtime = saved.vtime
        for saved_token in tokens:
            res = self._resources.get(saved_token.resource)
            if res is None:
                continue
            self._tokens[saved_token.id] = _Token(
                saved_token.id, saved_token.resource, saved_token.expected_use, saved_token.pass_,
                saved_token.claimant, saved_token.label, saved_token.generation)
            res.tokens += 1
        expires = now + self.policy.lease_ttl_s
        for saved_lease in leases:
            res = self._resources.get(saved_lease.resource)
            if res is None:
                continue
            self._add_lease(_Lease(saved_lease.token_id, saved_lease.holder,
                                   saved_lease.resource, saved_lease.units, expires,
                                   saved_lease.returned, saved_lease.used, saved_lease.debt))
            res.leased += saved_lease.units
        self.drain_changes()

    # -------------------------------------------------------------------------------- internals

    def _resource(self, name: str) -> _Resource:
        try:
            return self._resources[name]
        except KeyError:
            known = ", ".join(sorted(self._resources)) or "none"
            raise UnknownResourceError(f"no resource {name!r} (known: {known})") from None

    def _live(self, token_id: str, generation: int, claimant: str | None) -> _Token:
        token = self._tokens.get(token_id)
        if token is None:
            if token_id in self._closed:
                raise TokenClosedError("the token was closed or merged into another")
            raise ForgedTokenError("this executor never issued that token")
        if generation > token.generation:
            # First use after a move: the receiving process takes the token up.
            token.generation, token.claimant = generation, claimant
            self._dirty_tokens.add(token.id)
        elif generation < token.generation:
            raise TokenMovedError("the token was passed to another process, which owns it now")
        elif token.claimant is not None and claimant != token.claimant:
            raise TokenMovedError("the token was already taken up by another process")
        return token

    def _forget(self, token: _Token) -> None:
        res = self._resources[token.resource]
        now = self._clock()
        while token.waiters:
            waiter = token.waiters[0]
            self._remove_waiter(res, waiter)
            self._resolve(waiter, TokenClosedError("the token was closed while waiting"))
        del self._tokens[token.id]
        self._dirty_tokens.add(token.id)
        res.tokens -= 1
        self._closed[token.id] = None
        if len(self._closed) > _TOMBSTONES:
            self._closed.popitem(last=False)
        self._dispatch(res, now)

    def _vtime_now(self, res: _Resource) -> float:
        """Where a token joining now starts: never ahead of the most-behind waiter, so a stream
        of new tokens cannot starve those already waiting."""
        head = self._peek(res)
        return res.vtime if head is None else max(res.vtime, head.token.pass_)

    def _max_credit(self, token: _Token) -> float:
        return self.policy.credit_factor * token.expected_use

    def _credit(self, res: _Resource, token: _Token) -> float:
        return min(self._max_credit(token), (res.vtime - token.pass_) * token.expected_use)

    def _push(self, res: _Resource, waiter: _Waiter) -> None:
        waiter.version += 1
        heapq.heappush(res.queue, (waiter.token.pass_, waiter.seq, waiter.version, waiter))

    def _rekey(self, res: _Resource, token: _Token) -> None:
        if token.waiters:
            self._push(res, token.waiters[0])

    @staticmethod
    def _valid(entries: Iterable[tuple[float, int, int, _Waiter]]
               ) -> Iterable[tuple[float, int, _Waiter]]:
        """The live entries of a queue, as (pass, seq, waiter)."""
        for pass_, seq, version, waiter in entries:
            if not waiter.done and version == waiter.version:
                yield pass_, seq, waiter

    def _peek(self, res: _Resource) -> _Waiter | None:
        queue = res.queue
        while queue:
            _, _, version, waiter = queue[0]
            if not waiter.done and version == waiter.version:
                return waiter
            heapq.heappop(queue)
        return None

    def _dispatch(self, res: _Resource, now: float) -> None:
        pool = res.pool
        while (head := self._peek(res)) is not None:
            available = pool.available(now)
            if head.ticket.amount <= available:
                self._grant(res, head, available, now)
                continue
            if available < 1 or head.bypassed >= self._bypass_budget(head):
                return  # nobody can pass the head: skip the scan
            for waiter in self._may_pass(res, head):
                amount = waiter.ticket.amount
                if amount <= available and head.bypassed + amount <= self._bypass_budget(head):
                    self._grant(res, waiter, available, now)
                    head.bypassed += amount
                    available = pool.available(now)
            return

    def _bypass_budget(self, head: _Waiter) -> int:
        return math.ceil(head.ticket.amount * self.policy.bypass_factor)

    def _may_pass(self, res: _Resource, head: _Waiter) -> list[_Waiter]:
        """Waiters allowed past a blocked head, within its bypass budget: those no further on in
        virtual time than the head, or that a fluid fair share would finish before it. Others
        would let a token of small requests take a large one's share."""
        budget = self._bypass_budget(head) - head.bypassed
        head_pass, head_finish = head.token.pass_, _finish(head)
        return [w for _, _, w in self._valid(heapq.nsmallest(_BACKFILL_SCAN, res.queue))
                if w is not head and w.ticket.amount <= budget
                and (w.token.pass_ <= head_pass or _finish(w) <= head_finish)]

    def _grant(self, res: _Resource, waiter: _Waiter, available: int, now: float) -> None:
        token, ticket = waiter.token, waiter.ticket
        if (token.id, ticket.holder) in self._ended:
            # Its lease ended while it waited: granting under that key would start a fresh
            # lease that the holder's running totals no longer match.
            self._remove_waiter(res, waiter)
            self._resolve(waiter, LeaseEndedError("this lease ended while the request waited; "
                                                  "ask under a new lease key"))
            return
        self._remove_waiter(res, waiter)
        extra = 0
        if waiter.prefetch and res.waiting == 0:
            cap = max(1, int(res.spec.ceiling * self.policy.max_lease_fraction))
            extra = max(0, min(waiter.prefetch, cap, available - ticket.amount))
        units = ticket.amount + extra
        res.pool.take(units, now)
        res.vtime = max(res.vtime, token.pass_)
        token.pass_ += units / token.expected_use
        self._rekey(res, token)
        key = (token.id, ticket.holder)
        lease = self._leases.get(key)
        expires = now + self.policy.lease_ttl_s
        if lease is None:
            lease = self._add_lease(_Lease(token.id, ticket.holder, token.resource, 0, expires))
        else:
            lease.expires_at = expires
            heapq.heappush(self._expiries, (expires, token.id, ticket.holder))
        lease.units += units
        res.leased += units
        self._dirty_tokens.add(token.id)
        self._dirty_leases.add(key)
        self._dirty_resources.add(token.resource)
        self._resolve(waiter, Grant(units, self.policy.lease_ttl_s, res.waiting > 0))

    def _fail(self, res: _Resource, waiter: _Waiter, now: float) -> None:
        spec = res.spec
        estimate = self._estimate(res, waiter, now)
        self._remove_waiter(res, waiter)
        error: QuotaError
        if spec.enforcement is Enforcement.TERMINATE:
            error = QuotaTerminated(spec.name, waiter.ticket.amount)
        else:
            error = FailedReservation(spec.name, waiter.ticket.amount, estimate)
        self._resolve(waiter, error)
        self._dispatch(res, now)  # a blocked head leaving may unblock the rest

    def _estimate(self, res: _Resource, waiter: _Waiter, now: float) -> float | None:
        if not isinstance(res.pool, RatePool):
            return None
        token = waiter.token
        key = token.pass_ + sum(w.ticket.amount for w in token.waiters
                                if w.seq < waiter.seq) / max(token.expected_use, 1)
        ahead = self._ahead(res, key, waiter.seq, waiter)
        return res.pool.time_until(ahead + waiter.ticket.amount, now)

    def _ahead(self, res: _Resource, key: float, seq: float, mine: _Waiter | None) -> int:
        """Units that stride order serves before a request keyed (key, seq): every queued
        request, each keyed by its token's pass once the requests before it are granted."""
        ahead = 0
        for _, _, head in self._valid(res.queue):
            token = head.token
            pass_ = token.pass_
            for waiter in token.waiters:
                if waiter is mine or (pass_, waiter.seq) >= (key, seq):
                    break
                ahead += waiter.ticket.amount
                pass_ += waiter.ticket.amount / max(token.expected_use, 1)
        return ahead

    def _remove_waiter(self, res: _Resource, waiter: _Waiter) -> None:
        token = waiter.token
        was_head = token.waiters and token.waiters[0] is waiter
        token.waiters.remove(waiter)
        waiter.done = True
        res.waiting -= 1
        if was_head and token.waiters:
            self._push(res, token.waiters[0])

    def _resolve(self, waiter: _Waiter, outcome: Grant | QuotaError) -> None:
        waiter.done = True
        waiter.ticket.outcome = outcome
        self._resolved.append(waiter.ticket)

    def _expire(self, lease: _Lease, now: float) -> None:
        res = self._resources[lease.resource]
        if res.spec.kind is Kind.CONCURRENCY:
            res.pool.give_back(lease.units, now)  # slots are free again; units may have been used
        res.leased -= lease.units
        self._end_lease(lease)
        self.lease_expiries += 1
        # A token whose every holder stopped renewing belongs to processes that are gone (or
        # cut off for a whole time-to-live): release it after a grace period in which a Ray
        # retry of its task may take it up, or it would count as live for ever.
        if lease.token_id not in self._lease_count:
            self._orphans[lease.token_id] = now + self.policy.orphan_grace_s
        self._dispatch(res, now)

    def _release_orphans(self, now: float) -> None:
        for token_id, due in list(self._orphans.items()):
            token = self._tokens.get(token_id)
            if token is None:
                del self._orphans[token_id]
            elif due <= now:
                del self._orphans[token_id]
                res = self._resources[token.resource]
                if not token.waiters and token_id not in self._lease_count:
                    self._forget(token)

    def _recall(self, res: _Resource) -> None:
        for token_id, holder in res.leases:
            self._recalls.setdefault(holder, set()).add(token_id)

    def _end_lease(self, lease: _Lease) -> None:
        self._ended[(lease.token_id, lease.holder)] = lease.debt
        if len(self._ended) > _TOMBSTONES:
            self._ended.popitem(last=False)
        self._drop_lease(lease)

    def _add_lease(self, lease: _Lease) -> _Lease:
        key = (lease.token_id, lease.holder)
        self._leases[key] = lease
        self._by_holder.setdefault(lease.holder, set()).add(lease.token_id)
        self._resources[lease.resource].leases.add(key)
        self._lease_count[lease.token_id] = self._lease_count.get(lease.token_id, 0) + 1
        heapq.heappush(self._expiries, (lease.expires_at, lease.token_id, lease.holder))
        self._dirty_leases.add(key)
        return lease

    def _drop_lease(self, lease: _Lease) -> None:
        del self._leases[(lease.token_id, lease.holder)]
        left = self._lease_count.pop(lease.token_id) - 1
        if left:
            self._lease_count[lease.token_id] = left
        self._dirty_leases.add((lease.token_id, lease.holder))
        self._dirty_resources.add(lease.resource)
        self._resources[lease.resource].leases.discard((lease.token_id, lease.holder))
        tokens = self._by_holder[lease.holder]
        tokens.discard(lease.token_id)
        if not tokens:
            del self._by_holder[lease.holder]


def _finish(waiter: _Waiter) -> float:
    """A waiter's finish tag: its token's pass once it is granted."""
    return waiter.token.pass_ + waiter.ticket.amount / waiter.token.expected_use




def _wait_allowed(spec: ResourceSpec, timeout: float | None) -> float:
    """Seconds a waiter may wait: the resource's wait limit, shortened by the caller's timeout."""
    if spec.wait_limit_s is not None:
        limit = spec.wait_limit_s
    else:
        limit = math.inf if spec.enforcement is Enforcement.THROTTLE else 0.0
    return limit if timeout is None else min(limit, max(0.0, timeout))
