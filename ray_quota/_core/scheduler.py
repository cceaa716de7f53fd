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

The parts: :mod:`.tokens` registers tokens and who may use them; :mod:`.resource` is one
resource's pool, virtual time and :mod:`.fair_queue`, granting into the :mod:`.ledger` of leases;
:mod:`.state` holds the rows a store writes. :class:`Scheduler` is the facade that drives them.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterable, Mapping

from ray_quota._core.credentials import claims
from ray_quota._core.fair_queue import Ticket, Waiter
from ray_quota._core.ledger import Lease, LeaseLedger, fresh_debt
from ray_quota._core.pools import Pool
from ray_quota._core.protocol import RECALL_GRACE_S, ProviderSignal, TokenInfo
from ray_quota._core.resource import Policy, Resource, ResourceStatus
from ray_quota._core.state import (
    ChangeLog,
    Changes,
    LeaseKey,
    SavedLease,
    SavedResource,
    SavedToken,
)
from ray_quota._core.tokens import Token, TokenRegistry, check_parent
from ray_quota._errors import (
    IncompatibleTokensError,
    InvalidAmountError,
    LeaseEndedError,
    TokenClosedError,
    TokenStateError,
    UnknownResourceError,
)
from ray_quota._spec import Enforcement, Kind, ResourceSpec, check_units

__all__ = ["Policy", "ResourceStatus", "Scheduler", "Ticket"]

Clock = Callable[[], float]
# A lease's running totals as a holder reports them: token id, key, returned, used, debt, final.
Totals = tuple[str, str, int, int, int, bool]


class Scheduler:
    """Pools, tokens, waiters and leases of one environment.

    Example:
        >>> from ray_quota._spec import Kind
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
        now = clock()
        # What changed since the last drain_changes(), for a durable store to write.
        self._changes = ChangeLog(resources)
        self._leases = LeaseLedger(self._changes)
        self._leases.tick(now)
        self._tokens = TokenRegistry(new_id, self._changes, grace_s=policy.orphan_grace_s,
                                     on_revive=self._revived)
        self._resolved: list[Ticket] = []  # since the last poll, appended to by the resources
        self._resources = {name: Resource(spec, now, policy, self._leases, self._changes,
                                          self._resolved)
                           for name, spec in resources.items()}
        self._seq = 0
        self.lease_expiries = 0

    # ----------------------------------------------------------------------------------- tokens

    def open_token(self, resource: str, expected_use: int, *, claimant: str | None,
                   label: str | None = None) -> TokenInfo:
        """Create a token with no credit yet; ``claimant`` is the process that will use it."""
        res = self._resource(resource)
        check_units("expected_use", expected_use)
        token = self._tokens.open(resource, expected_use, pass_=res.start_pass(),
                                  claimant=claimant, label=label)
        self._tokens.orphaned(token.id, self._clock())  # until its process names or uses it
        res.tokens += 1
        return TokenInfo(token.id, res.spec, 0)

    def split(self, token_id: str, generation: int, claimant: str | None,
              child_expected_use: int) -> TokenInfo:
        """Move ``child_expected_use`` and the same share of credit (or debt) into a new token."""
        token = self._tokens.check(token_id, generation, claimant)
        check_units("child_expected_use", child_expected_use)
        if child_expected_use > token.expected_use:
            raise InvalidAmountError(
                f"cannot split {child_expected_use} from a token whose expected use is "
                f"{token.expected_use}")
        if child_expected_use == token.expected_use and token.waiters:
            raise TokenStateError("cannot split all expected use from a token while it waits")
        self._tokens.live(token_id, generation, claimant)  # refused no more: take it up
        # Same pass means same credit per unit of weight: credit divides in proportion.
        child = self._tokens.open(token.resource, child_expected_use, pass_=token.pass_,
                                  claimant=claimant, label=token.label, parent=token.id)
        self._tokens.orphaned(child.id, self._clock())
        res = self._resources[token.resource]
        res.reweigh(token, token.expected_use - child_expected_use)
        res.queue.touch(child)  # it counts as active as its parent did, for its part
        self._changes.tokens.add(token.id)
        res.tokens += 1
        return TokenInfo(child.id, res.spec, 0)

    def merge(self, token_id: str, generation: int, claimant: str | None,
              other_id: str, other_generation: int, *, finals: Iterable[Totals] = ()) -> None:
        """Add ``other``'s expected use and credit to the token; ``other`` is closed.

        ``finals`` (lease totals, as :meth:`settle` takes them) are settled once every check
        passed and before the merge: a refused merge changes nothing.
        """
        token, other = self.check_merge(token_id, generation, claimant, other_id,
                                        other_generation)
        self._settle_all(finals)
        self._tokens.live(token_id, generation, claimant)  # refused no more: take them up
        self._tokens.live(other_id, other_generation, claimant)
        self._absorb(token, other)

    def merge_back(self, child_id: str, generation: int, claimant: str | None,
                   parent_id: str, *, finals: Iterable[Totals] = ()) -> bool:
        """Return a child's expected use and credit to the token it was split from.

        The child's owner needs no right over the parent: adding to a token never hurts it.
        If the parent is gone, the child is simply closed. Returns whether it merged.
        Reservations of the child still waiting fail, as a close fails them: the task that
        gives its child back is done with it, and its expected use goes back all the same.
        ``finals`` are settled once the child passed its checks (see :meth:`merge`).

        Raises:
            IncompatibleTokensError: ``parent_id`` is not the token the child was split from
                (its debt would land on a token of the caller's choosing); nothing changes.
        """
        self.check_parent(child_id, parent_id)
        child = self._tokens.live(child_id, generation, claimant)
        self._settle_all(finals)
        parent = self._tokens.get(child.parent or "")  # parent_id may be gone (check_parent)
        if parent is None or parent.resource != child.resource or parent is child:
            self._forget(child)
            return False
        self._fail_waiters(child)
        self._absorb(parent, child)
        return True

    def check_merge(self, token_id: str, generation: int, claimant: str | None,
                    other_id: str, other_generation: int) -> tuple[Token, Token]:
        """The two tokens of a merge, if it may go ahead; changes nothing.

        Raises:
            IncompatibleTokensError: the same token, or tokens of different resources.
            TokenStateError: ``other`` has reservations waiting (or either cannot be used).
        """
        if other_id == token_id:
            raise IncompatibleTokensError("a token cannot be merged with itself")
        token = self._tokens.check(token_id, generation, claimant)
        other = self._tokens.check(other_id, other_generation, claimant)
        if other.resource != token.resource:
            raise IncompatibleTokensError(
                f"cannot merge a token of {other.resource!r} into one of {token.resource!r}")
        if other.waiters:
            raise TokenStateError("cannot merge a token while it has reservations waiting")
        return token, other

    def check_parent(self, child_id: str, parent_id: str) -> None:
        """Refuse a merge back into another token than the child's parent (see
        :func:`check_parent`), changing nothing."""
        check_parent(self._tokens, child_id, parent_id)

    def check_token(self, token_id: str, generation: int, claimant: str | None) -> None:
        """Refuse, changing nothing, a call the token's owner could not make (see
        :meth:`TokenRegistry.check`): run before a call's lease totals are applied."""
        self._tokens.check(token_id, generation, claimant)

    def _absorb(self, token: Token, other: Token) -> None:
        """Add ``other``'s expected use and credit (or debt) to ``token``; ``other`` is closed."""
        res = self._resources[token.resource]
        credit = res.credit(token) + res.credit(other)
        token.expected_use += other.expected_use
        token.pass_ = res.vtime - credit / max(1, token.expected_use)
        self._changes.tokens.add(token.id)
        res.queue.rekey(token)
        self._tokens.hand_children(other.id, token.id)
        self._forget(other)

    def describe(self, token_id: str, generation: int, claimant: str | None) -> tuple[int, float]:
        """The token's expected use and credit, as the executor holds them."""
        token = self._tokens.live(token_id, generation, claimant)
        return token.expected_use, self._resources[token.resource].credit(token)

    def close_token(self, token_id: str, generation: int, claimant: str | None, *,
                    finals: Iterable[Totals] = ()) -> None:
        """Close the token: its waiters fail and its weight leaves the scheduler. ``finals``
        are settled once the caller may use the token (see :meth:`merge`)."""
        token = self._tokens.live(token_id, generation, claimant)
        self._settle_all(finals)
        # Revivable by a retry (see :mod:`.tokens`) unless another process still holds units of
        # it: debt that one reports meanwhile is charged to the pool alone, the token being gone.
        self._forget(token, revivable=not self._leases.has_leases(token.id))

    def _revived(self, token: Token) -> None:
        """A retry took a closed token up again (see :mod:`.tokens`): it counts again, behind
        the tokens waiting now and with any debt it had, and is released if nobody uses it."""
        res = self._resources[token.resource]
        token.pass_ = max(res.start_pass(), token.pass_)
        res.tokens += 1
        self._tokens.orphaned(token.id, self._clock())

    def credit(self, token_id: str) -> float:
        """The token's credit in units; negative while it carries debt."""
        token = self._tokens[token_id]
        return self._resources[token.resource].credit(token)

    def token_label(self, token_id: str) -> str | None:
        token = self._tokens.get(token_id)
        return token.label if token else None

    def token_key(self, token_id: str) -> tuple[str, str | None] | None:
        """The token's resource and label (for metrics), or None once it is gone."""
        token = self._tokens.get(token_id)
        return (token.resource, token.label) if token else None

    def expected_use_by_label(self) -> dict[tuple[str, str | None], tuple[int, int]]:
        """Live tokens and their total expected use, per resource and label (for metrics)."""
        return self._tokens.expected_use_by_label()

    # ---------------------------------------------------------------------------------- acquire

    def acquire(self, token_id: str, generation: int, claimant: str | None, key: str,
                amount: int, *, prefetch: int = 0, timeout: float | None = None) -> Ticket:
        """Ask for ``amount`` units (plus up to ``prefetch`` spare) into the lease ``key``.

        The ticket comes back granted, failed, or waiting; a waiting ticket is resolved by a later
        call and reported by :meth:`poll`.

        Raises:
            InvalidAmountError: ``amount`` is not a whole number from 1 to the resource's ceiling.
            TokenStateError, ForgedTokenError: the token cannot be used.
        """
        token = self._tokens.check(token_id, generation, claimant)
        if self._leases.is_ended((token_id, key)):
            raise LeaseEndedError("this lease ended (it expired or was settled); ask under a "
                                  "new lease key")
        res = self._resources[token.resource]
        check_units("amount", amount)
        res.check_amount(amount)
        if token.expected_use == 0:
            raise TokenStateError("the token has no expected use left: merge a child back first")
        self._tokens.live(token_id, generation, claimant)  # refused no more: take it up
        now = self._clock()
        self._seq += 1
        ticket = Ticket(self._seq, token_id, key, amount)
        wait_s, recall_only = _wait_allowed(res.spec, timeout)
        res.admit(Waiter(ticket, token, max(0, int(prefetch)), now + wait_s, self._seq), now,
                  recall_only=recall_only)
        return ticket

    def feedback(self, token_id: str, generation: int, claimant: str | None,
                 signal: ProviderSignal) -> None:
        """What the provider said of a request the token reserved for (DESIGN 8): see
        :meth:`Resource.heed`. Only the token's holder may say it."""
        token = self._tokens.check(token_id, generation, claimant)
        self._resources[token.resource].heed(signal, self._clock())

    def cancel(self, ticket: Ticket) -> None:
        """Withdraw a waiting ticket (its caller gave up); no effect once resolved."""
        token = self._tokens.get(ticket.token_id)
        if token is None or ticket.outcome is not None:
            return
        for waiter in token.waiters:
            if waiter.ticket is ticket:
                res = self._resources[token.resource]
                res.queue.leave(waiter)
                ticket.outcome = TokenStateError("reservation cancelled")
                res.dispatch(self._clock())
                return

    def estimate_wait(self, token_id: str, amount: int) -> float | None:
        """Seconds until ``amount`` units could be granted to the token if it asked now.

        Exact for rate resources given the refill phase and the queue that would be ahead;
        None for capacity and concurrency, where it depends on when others give back.
        """
        token = self._tokens[token_id]
        return self._resources[token.resource].estimate_wait(token, amount, self._clock())

    # ----------------------------------------------------------------------- returns and leases

    def give_back(self, token_id: str, key: str, units: int = 0, *, used: int = 0,
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
        lease = self._leases.get((token_id, key))
        token = self._tokens.get(token_id)
        if lease is not None:
            res = self._resources[lease.resource]
        elif token is not None:
            res = self._resources[token.resource]
        else:
            return
        res.give_back(lease, token, units, used, debt, now)
        if token is not None:
            self._changes.tokens.add(token.id)
        self._changes.leases.add((token_id, key))
        self._changes.resources.add(res.name)
        res.dispatch(now)

    def settle(self, token_id: str, key: str, returned: int, used: int, debt: int, *,
               final: bool = False) -> None:
        """Apply a holder's running totals for its lease of the token.

        Totals, not increments: a report that arrives twice, late or out of order changes
        nothing the first did. ``final`` says the holder will never use this lease again, so
        whatever it still holds by the executor's count (a grant whose answer was lost, say)
        goes back to the pool and the lease ends.
        """
        for what, total in (("returned", returned), ("used", used), ("debt", debt)):
            check_units(what, total, allow_zero=True)  # all checked before any total moves
        lease_id, lease = (token_id, key), self._leases.get((token_id, key))
        cap = self._overuse_cap(token_id, lease)
        if lease is None:
            ended_debt = self._leases.ended_debt(lease_id)
            if ended_debt is not None and (late := self._leases.take_late_debt(
                    lease_id, fresh_debt(debt, ended_debt, cap), cap)):
                # Expiry settled the units, not overuse declared since: that is still owed.
                self._leases.mark_ended(lease_id, ended_debt + late)
                self.give_back(token_id, key, debt=late)
            return
        if final:
            # Ended first, so that units freed below are not granted back under this key.
            self._leases.mark_ended(lease_id, lease.debt)
        new_returned, new_used, new_debt = lease.advance_totals(returned, used, debt, cap)
        self._changes.leases.add(lease_id)  # totals (and moved units) to store, even if absorbed
        new_used, new_returned = lease.absorb_moved(
            new_used, new_returned,
            slots=self._resources[lease.resource].spec.kind is Kind.CONCURRENCY)
        if new_returned or new_used or new_debt:
            self.give_back(token_id, key, new_returned, used=new_used, debt=new_debt)
        if final:
            if lease.units:
                self.give_back(token_id, key, lease.units)
            self._leases.end(lease)
            self._maybe_orphaned(token_id, self._clock())

    def renew_lease(self, token_id: str, key: str) -> bool | None:
        """Extend one lease; None if there is none (it expired), else whether others wait."""
        lease = self._leases.get((token_id, key))
        if lease is None:
            return None
        self._leases.extend(lease, self._clock() + self.policy.lease_ttl_s)
        return self._resources[lease.resource].queue.waiting > 0

    def named(self, token_id: str, sent: int | None) -> bool:
        """A renewal names the token (see :func:`~ray_quota._core.protocol.name_key`): keep it,
        unless it is gone or, for a name of a token sent at generation ``sent``, taken up
        since. Returns whether the name keeps it (its namer names it again next time)."""
        token = self._tokens.get(token_id)
        if token is None or (sent is not None and token.generation >= sent):
            return False
        self._tokens.seen(token_id, self._clock())
        return True

    def renew(self, key: str) -> dict[str, bool]:
        """Extend every lease under the lease key ``key``; returns, per token, whether others
        wait.

        A token missing from the answer has no lease any more (it expired or was settled):
        the holder must not serve its spare units.
        """
        expires = self._clock() + self.policy.lease_ttl_s
        return {lease.token_id: self._resources[lease.resource].queue.waiting > 0
                for lease in self._leases.extend_key(key, expires)}

    def adopt(self, token_id: str, from_key: str, to_key: str, units: int, returned: int,
              used: int, debt: int) -> bool:
        """Move ``units`` of the lease ``from_key`` into a new lease ``to_key`` whose totals
        start at ``returned``, ``used`` and ``debt``: a broker's process re-attaching directly.

        The process keeps serving the units it held from the broker, under its own key, with its
        running totals as they were. ``debt`` is charged again, because the executor cannot tell
        whether the broker passed it on before it failed: an overcharge, never an overgrant.
        The broker may not have failed (it was out of reach): it still counts the moved units
        in its lease, and gives them back when the process's sub-lease expires there. Those
        returns make up for the move and free nothing (see :meth:`Lease.absorb_moved`).
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
        if source is None or self._leases.is_ended((token_id, to_key)):
            return False
        moved = min(units, source.units)
        source.units -= moved
        source.moved_out += moved
        lease = self._leases.add(Lease(token_id, to_key, source.resource, moved,
                                       self._clock() + self.policy.lease_ttl_s,
                                       returned=returned, used=used))
        self._changes.leases.add((token_id, from_key))
        if debt := fresh_debt(debt, 0, self._overuse_cap(token_id, lease)):
            lease.debt = debt
            self.give_back(token_id, to_key, debt=debt)
        return True

    def claimed_by(self, token_id: str, value: str) -> bool:
        """Whether the claim value ``value`` is the live token's own (see :func:`claims`)."""
        token = self._tokens.get(token_id)
        return token is not None and claims(token.claimant, value)

    def lease_key_ending(self, token_id: str, suffix: str) -> str | None:
        """The key of a live lease of the token that ends with ``suffix`` (a broker's lease,
        named by its adoption secret's digest), or None. A scan: adoptions are rare."""
        return next((key for tid, key in self._leases if tid == token_id
                     and key.endswith(suffix)), None)

    def _overuse_cap(self, token_id: str, lease: Lease | None) -> int:
        """The most debt one report may add on the token's resource (its ``max_overuse``)."""
        token = self._tokens.get(token_id)
        name = lease.resource if lease is not None else token.resource if token else None
        return self._resources[name].spec.overuse_cap if name is not None else 0

    def take_recalls(self) -> dict[str, set[str]]:
        """Holders to tell, per token, that others now wait: they should stop serving locally
        and give spare units back. Drained by the call."""
        return self._leases.take_recalls()

    def held(self, token_id: str, key: str) -> int:
        """Units in the token's lease under ``key``."""
        lease = self._leases.get((token_id, key))
        return lease.units if lease else 0

    # --------------------------------------------------------------------------------- the loop

    def poll(self) -> list[Ticket]:
        """Grant what now fits, expire what is due, and return tickets resolved since last poll.

        Grants come first: a request that can be served exactly at its deadline is served.
        """
        now = self._clock()
        self._leases.tick(now)
        self._dispatch_all(now)
        for res in self._resources.values():
            res.fail_due(now)
        for lease in self._leases.due(now):
            self._expire(lease, now)
        if self._tokens.has_orphans:
            self._release_orphans(now)
        self._dispatch_all(now)
        resolved = list(self._resolved)
        self._resolved.clear()
        return resolved

    def _dispatch_all(self, now: float) -> None:
        for res in self._resources.values():
            if res.queue.waiting:
                res.dispatch(now)

    def next_wakeup(self) -> float | None:
        """When :meth:`poll` next has something to do with no other call in between, or None."""
        now = self._clock()
        times = [res.wakeup(now) for res in self._resources.values()]
        times.append(self._leases.next_expiry())
        return min((t for t in times if t is not None), default=None)

    # ----------------------------------------------------------------------- limits and status

    def set_limit(self, spec: ResourceSpec) -> None:
        """Change a resource's limit at run time; what is spent or in use is kept."""
        self._resource(spec.name).set_limit(spec, self._clock())

    def specs(self) -> dict[str, ResourceSpec]:
        return {name: res.spec for name, res in self._resources.items()}

    def status(self) -> list[ResourceStatus]:
        """One snapshot per resource."""
        now = self._clock()
        leases: dict[str, int] = {}
        for lease in self._leases.values():
            if lease.units:
                leases[lease.resource] = leases.get(lease.resource, 0) + 1
        return [res.status(now, leases.get(name, 0)) for name, res in self._resources.items()]

    def pool(self, resource: str) -> Pool:
        return self._resource(resource).pool

    # ---------------------------------------------------------------------------- durability

    def drain_changes(self) -> Changes:
        """Everything that changed since the last call, to be written before replies go out."""
        now = self._clock()

        def resource_row(name: str) -> SavedResource | None:
            res = self._resources.get(name)
            return res.saved(now) if res else None

        def token_row(token_id: str) -> SavedToken | None:
            token = self._tokens.get(token_id)
            return token.saved() if token else None

        def lease_row(key: LeaseKey) -> SavedLease | None:
            lease = self._leases.get(key)
            return lease.saved() if lease else None

        return self._changes.drain(resource_row, token_row, lease_row)

    def restore(self, resources: Iterable[SavedResource], tokens: Iterable[SavedToken],
                leases: Iterable[SavedLease], elapsed_s: float,
                ended: Iterable[tuple[str, str, int]] = ()) -> None:
        """Take up a saved state, ``elapsed_s`` seconds old; every lease gets a fresh TTL so
        holders that come back can renew, and the rest expire as if their holder had died.
        Keys of leases that ended stay ended: a holder cannot start one afresh under them."""
        now = self._clock()
        for token_id, key, debt in ended:
            self._leases.mark_ended((token_id, key), debt)
        for saved in resources:
            res = self._resources.get(saved.spec.name)
            if res is not None:  # the saved state wins over a new manifest for known resources
                res.load(saved, elapsed_s, now)
        for saved_token in tokens:
            res = self._resources.get(saved_token.resource)
            if res is not None:
                self._tokens.add(Token.from_saved(saved_token))
                res.tokens += 1
        expires = now + self.policy.lease_ttl_s
        for saved_lease in leases:
            res = self._resources.get(saved_lease.resource)
            if res is not None:
                self._leases.add(Lease(saved_lease.token_id, saved_lease.key,
                                       saved_lease.resource, saved_lease.units, expires,
                                       saved_lease.returned, saved_lease.used, saved_lease.debt,
                                       moved_out=saved_lease.moved_out))
                res.leased += saved_lease.units
        for token_id in self._tokens:  # orphans are not stored: their grace starts again
            self._maybe_orphaned(token_id, now)
        self.drain_changes()

    # -------------------------------------------------------------------------------- internals

    def _resource(self, name: str) -> Resource:
        try:
            return self._resources[name]
        except KeyError:
            known = ", ".join(sorted(self._resources)) or "none"
            raise UnknownResourceError(f"no resource {name!r} (known: {known})") from None

    def _forget(self, token: Token, *, revivable: bool = False) -> None:
        """Close the token: its waiters fail, and the queue moves on without it."""
        res = self._resources[token.resource]
        self._fail_waiters(token)
        if not self._tokens.close(token, revivable=revivable):
            # Its ended keys' marks and late-debt counts go with it; a token a retry may
            # revive keeps them (they go once idle), or each revival would reset the counts.
            self._leases.token_closed(token.id)
        res.close(token)
        res.dispatch(self._clock())

    def _fail_waiters(self, token: Token) -> None:
        """The token's waiting reservations fail: it is being closed (or given back)."""
        res = self._resources[token.resource]
        while token.waiters:
            waiter = token.waiters[0]
            res.queue.leave(waiter)
            res.resolve(waiter, TokenClosedError("the token was closed while waiting"))

    def _settle_all(self, finals: Iterable[Totals]) -> None:
        for token_id, key, returned, used, debt, final in finals:
            self.settle(token_id, key, returned, used, debt, final=final)

    def _expire(self, lease: Lease, now: float) -> None:
        res = self._resources[lease.resource]
        res.expire(lease, now)
        self._leases.end(lease)
        self.lease_expiries += 1
        # A token whose every holder stopped renewing may belong to processes that are gone (or
        # cut off for a whole time-to-live): unless a renewal names it, it is released after a
        # grace, or it would count as live for ever.
        self._maybe_orphaned(lease.token_id, now)
        res.dispatch(now)

    def _maybe_orphaned(self, token_id: str, now: float) -> None:
        """The token may hold nothing now: if so, it is an orphan (see :mod:`.tokens`)."""
        if token_id in self._tokens and not self._leases.has_leases(token_id):
            self._tokens.orphaned(token_id, now)

    def _release_orphans(self, now: float) -> None:
        """Release the tokens nothing named for a grace; a split child's share (expected use
        and credit, or debt) goes back to its parent if that is live, as a merge back would."""
        for token in self._tokens.orphans_due(now):
            if self._leases.has_leases(token.id):
                continue  # held again: the end of its last lease makes it an orphan again
            if token.waiters:
                self._tokens.orphaned(token.id, now)  # a wait that fails holds nothing
            elif (parent := self._tokens.get(token.parent or "")) is not None \
                    and parent.resource == token.resource and parent is not token:
                self._absorb(parent, token)
            else:
                self._forget(token)


def _wait_allowed(spec: ResourceSpec, timeout: float | None) -> tuple[float, bool]:
    """Seconds a waiter may wait (the resource's wait limit, shortened by the caller's timeout),
    and whether only for spare recalled from others: with no wait limit, a throttle resource
    waits for ever, a reject or terminate one the recall grace (see :meth:`Resource.admit`)."""
    recall_only = spec.wait_limit_s is None and spec.enforcement is not Enforcement.THROTTLE
    limit = RECALL_GRACE_S if recall_only else spec.wait_limit_s
    if limit is None:
        limit = math.inf
    return (limit if timeout is None else min(limit, max(0.0, timeout))), recall_only
