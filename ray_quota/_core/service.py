"""Everything the executor decides, on an injected clock, with no I/O.

:class:`ExecutorService` has one method per call the executor serves. Each checks the whole
message first (see the checks in :mod:`ray_quota._core.protocol`: the executor is a trust
boundary), then asks the :class:`Scheduler`, and answers a value; errors are answered as values
too, never raised, so that they cross Ray as themselves. What a call set in motion beyond its own
answer waits in an :class:`Outbox` that the caller takes with :meth:`ExecutorService.drain`:

- ``changes`` for the durable store,
- ``resolved``: waiting acquires that now have an outcome,
- ``recalls``: holders to tell that others wait for a token they hold units of.

The shell around it (the executor actor, or the scale model) writes ``changes`` first and only
then resolves waiters and posts recalls: nothing is acknowledged before it is on disk. A drain
hands a resolved ticket out together with the changes that decided it, and so does a call's
answer: its changes are in the drain that follows it.

Example:
    >>> from ray_quota._spec import Kind
    >>> clock = lambda: 0.0
    >>> service = ExecutorService({"conn": ResourceSpec("conn", Kind.CONCURRENCY, 1)},
    ...                           clock=clock)
    >>> token = service.open_token("conn", 1, "me", None)
    >>> service.acquire(token.id, 0, "me", "proc-1:0", 1, 0, None).outcome.units
    1
    >>> bool(service.drain().changes)  # the lease, to write before the answer goes out
    True
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from ray_quota._core.credentials import adoption_suffix, check_holder, check_keys, parse_via
from ray_quota._core.protocol import (
    IDLE_TICK_S,
    NAMED,
    Grant,
    LeaseAnswer,
    ProviderSignal,
    Renewed,
    Report,
    TokenInfo,
    check_acquire,
    check_adoptions,
    check_generation,
    check_id,
    check_label,
    check_reports,
    check_signal,
    check_timeout,
    check_token_call,
    holder_of,
    read_name,
)
from ray_quota._core.fair_queue import Ticket
from ray_quota._core.resource import Policy, ResourceStatus
from ray_quota._core.scheduler import Scheduler
from ray_quota._core.state import Changes, SavedLease, SavedResource, SavedToken
from ray_quota._errors import ManifestError, ProtocolError, QuotaError
from ray_quota._spec import Kind, ResourceSpec, check_spec, check_units

Clock = Callable[[], float]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Resolved:
    """A waiting acquire's outcome; a grant says how long it waited."""

    ticket: int
    outcome: Grant | QuotaError


@dataclass(frozen=True, slots=True)
class Recall:
    """Tell ``holder`` that others wait for these tokens: give spare back, serve nothing locally."""

    holder: str
    token_ids: frozenset[str]


@dataclass(frozen=True, slots=True)
class Outbox:
    """What calls set in motion since the last drain, in the order to act on it: write every
    ``changes`` (in order), then answer ``resolved`` and post ``recalls``."""

    changes: tuple[Changes, ...] = ()
    resolved: tuple[Resolved, ...] = ()
    recalls: tuple[Recall, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.changes or self.resolved or self.recalls)


class ExecutorService:
    """The executor's decisions over one environment's :class:`Scheduler`.

    Not thread-safe: the shell serves one call at a time (the actor's event loop does).

    Attributes:
        calls: grants, renewals and adoptions served, for tests of the local path.
        counts: every token and lease call served, by method.
    """

    __slots__ = (
        "_changes",
        "_clock",
        "_recalls",
        "_resolved",
        "_sched",
        "_waiting",
        "calls",
        "counts",
    )

    def __init__(self, resources: Mapping[str, ResourceSpec], *, clock: Clock,
                 policy: Policy = Policy(), new_id: Callable[[], str] | None = None) -> None:
        self._clock = clock
        extra = {} if new_id is None else {"new_id": new_id}
        self._sched = Scheduler(resources, clock=clock, policy=policy, **extra)
        self._waiting: dict[int, tuple[Ticket, float]] = {}  # ticket id -> ticket, arrived at
        self._changes: list[Changes] = []
        self._resolved: list[Resolved] = []
        self._recalls: list[Recall] = []
        self.calls = 0
        self.counts: Counter[str] = Counter()
        self._pump()  # every resource's initial state, for the first drain

    @property
    def scheduler(self) -> Scheduler:
        """The scheduler, for reading (metrics, the scale model's samples); change it only
        through the service's calls."""
        return self._sched

    @property
    def policy(self) -> Policy:
        return self._sched.policy

    def specs(self) -> dict[str, ResourceSpec]:
        return self._sched.specs()

    def restore(self, resources: Iterable[SavedResource], tokens: Iterable[SavedToken],
                leases: Iterable[SavedLease], elapsed_s: float,
                ended: Iterable[tuple[str, str, int]] = ()) -> dict[str, ResourceSpec]:
        """Take up a saved state ``elapsed_s`` old (see :meth:`Scheduler.restore`); returns
        the resources as saved, which win over the manifest's."""
        self._sched.restore(resources, tokens, leases, elapsed_s=elapsed_s, ended=ended)
        self._changes.clear()  # the initial state is superseded by the saved one, on disk
        return self._sched.specs()

    # ------------------------------------------------------------------------------ tokens

    def open_token(self, resource: str, expected_use: int, claimant: str,
                   label: str | None) -> TokenInfo | QuotaError:
        self.counts["open_token"] += 1
        try:
            check_id("resource", resource)
            check_units("expected_use", expected_use)
            check_id("claimant", claimant)
            check_label(label)
        except QuotaError as exc:
            return exc
        return self._guard(self._sched.open_token, resource, expected_use, claimant=claimant,
                           label=label)

    def split(self, token_id: str, generation: int, claimant: str,
              child_expected_use: int) -> tuple[TokenInfo, int] | QuotaError:
        """Split a child off; also answers the parent's expected use left."""
        self.counts["split"] += 1
        try:
            check_token_call(token_id, generation, claimant)
            check_units("child_expected_use", child_expected_use)
        except QuotaError as exc:
            return exc
        child = self._guard(self._sched.split, token_id, generation, claimant,
                            child_expected_use)
        if isinstance(child, QuotaError):
            return child
        return child, self._sched.describe(token_id, generation, claimant)[0]

    def merge(self, token_id: str, generation: int, claimant: str, other_id: str,
              other_generation: int, reports: list[Report],
              secret: object = None) -> None | QuotaError:
        """Check the call, settle the other token's final lease totals, then merge it into the
        token: a refused merge settles nothing. ``secret`` proves the reports' holder (see
        :mod:`~ray_quota._core.credentials`)."""
        self.counts["merge"] += 1
        try:
            check_token_call(token_id, generation, claimant)
            check_id("other_id", other_id)
            check_generation(other_generation)
            checked = _owned(check_reports(reports), secret)
            # Before the totals move: a merge refused changes nothing.
            self._sched.check_merge(token_id, generation, claimant, other_id, other_generation)
        except QuotaError as exc:
            return exc
        return self._guard(self._sched.merge, token_id, generation, claimant, other_id,
                           other_generation, finals=checked)

    def merge_back(self, token_id: str, generation: int, claimant: str, parent_id: str,
                   reports: list[Report], secret: object = None) -> bool | QuotaError:
        """Check the call, settle a child's final lease totals, then give it back to its parent."""
        self.counts["merge_back"] += 1
        try:
            check_token_call(token_id, generation, claimant)
            check_id("parent_id", parent_id)
            checked = _owned(check_reports(reports), secret)
            self._sched.check_token(token_id, generation, claimant)  # before totals move
            self._sched.check_parent(token_id, parent_id)
        except QuotaError as exc:
            return exc
        return self._guard(self._sched.merge_back, token_id, generation, claimant, parent_id,
                           finals=checked)

    def describe(self, token_id: str, generation: int,
                 claimant: str) -> tuple[int, float] | QuotaError:
        self.counts["describe"] += 1
        try:
            check_token_call(token_id, generation, claimant)
        except QuotaError as exc:
            return exc
        return self._guard(self._sched.describe, token_id, generation, claimant)

    def close(self, token_id: str, generation: int, claimant: str,
              reports: list[Report], secret: object = None) -> None | QuotaError:
        """Check the call, settle the token's final lease totals, then close it."""
        self.counts["close"] += 1
        try:
            check_token_call(token_id, generation, claimant)
            checked = _owned(check_reports(reports), secret)
            self._sched.check_token(token_id, generation, claimant)  # before totals move
        except QuotaError as exc:
            return exc
        return self._guard(self._sched.close_token, token_id, generation, claimant,
                           finals=checked)

    # ------------------------------------------------------------------------------ leases

    def acquire(self, token_id: str, generation: int, claimant: str, key: str, amount: int,
                prefetch: int, timeout: float | None, secret: object = None
                ) -> Ticket | QuotaError:
        """Ask for ``amount`` (plus up to ``prefetch``) into the lease ``key``, whose holder's
        secret is ``secret``.

        The ticket's outcome is there at once, or it is None and the outcome comes in a later
        drain's ``resolved`` (unless the ticket is cancelled first).
        """
        self.counts["acquire"] += 1
        self.calls += 1
        arrived = self._clock()
        try:
            checked_timeout = check_acquire(token_id, generation, claimant, key, amount,
                                            prefetch, timeout)
            check_keys([key], secret)
            ticket = self._sched.acquire(token_id, generation, claimant, key, amount,
                                         prefetch=prefetch, timeout=checked_timeout)
        except QuotaError as exc:
            return exc  # refused before anything changed
        if ticket.outcome is None:
            self._waiting[ticket.id] = (ticket, arrived)
        self._pump()
        return ticket

    def feedback(self, token_id: str, generation: int, claimant: str, key: str,
                 signal: ProviderSignal, secret: object = None) -> None | QuotaError:
        """What the provider said of a request reserved under the lease ``key`` (DESIGN 8):
        only the token's holder (its claim, and the key's secret) may lower a limit."""
        self.counts["feedback"] += 1
        try:
            check_token_call(token_id, generation, claimant)
            check_id("key", key)
            checked = check_signal(signal)
            check_keys([key], secret)
        except QuotaError as exc:
            return exc
        return self._guard(self._sched.feedback, token_id, generation, claimant, checked)

    def cancel(self, ticket_id: int) -> None:
        """The caller of a waiting acquire gave up: withdraw it (no effect once resolved)."""
        if isinstance(ticket_id, bool) or not isinstance(ticket_id, int):
            return  # no ticket has that id
        waiting = self._waiting.pop(ticket_id, None)
        if waiting is not None:
            # No pump: a grant the withdrawal makes possible goes out with the next tick.
            self._sched.cancel(waiting[0])

    def settle(self, reports: list[Report], secret: object = None) -> None | QuotaError:
        """Apply lease totals without renewing (overuse, recalls, handles that went away)."""
        self.counts["settle"] += 1
        try:
            checked = _owned(check_reports(reports), secret)
        except QuotaError as exc:
            return exc
        self._settle(checked)
        return None

    def renew(self, holder: str, reports: list[Report],
              secret: object = None) -> Renewed | QuotaError:
        """Apply a holder's lease totals and extend its leases (its own only: ``secret``
        proves the holder).

        Answers, per live lease (token id, key), whether others wait and for how long it may be
        trusted; a lease missing from the answer has ended and its holder starts a new one.
        A report that is a name (see :func:`~ray_quota._core.protocol.name_key`) keeps its
        token instead, and is answered :data:`NAMED` while it does.
        """
        self.counts["renew"] += 1
        self.calls += 1
        try:
            check_holder(check_id("holder", holder), secret)
            checked = _owned(check_reports(reports), secret)
        except QuotaError as exc:
            return exc
        names = {report: read_name(report) for report in checked}
        self._settle([report for report in checked if not names[report][0]])
        alive = {}
        ttl = self._sched.policy.lease_ttl_s
        for report in checked:
            is_name, sent = names[report]
            if is_name:  # a token held idle, or sent and not taken up yet: keep it
                if self._sched.named(report.token_id, sent):
                    alive[(report.token_id, report.key)] = NAMED
            elif report.final:
                continue
            elif (contended := self._sched.renew_lease(report.token_id, report.key)) is not None:
                alive[(report.token_id, report.key)] = LeaseAnswer(contended, ttl)
        return alive

    def adopt(self, entries: list[Any],
              secret: object = None) -> list[tuple[str, str]] | QuotaError:
        """Processes whose broker failed take over the units it re-leased to them: each entry
        (an :class:`Adoption`) moves a process's share of the broker's lease into a lease of
        its own (see :meth:`Scheduler.adopt`). The entry names the broker's lease by its
        adoption secret (``via``), which the broker gave only to its processes, and the new
        lease by a key of the caller (``secret``). Answers the (token id, key) of the leases
        now held directly."""
        self.counts["adopt"] += 1
        self.calls += 1
        try:
            checked = check_adoptions(entries)
            check_keys([entry.to_key for entry in checked], secret)
        except QuotaError as exc:
            return exc
        adopted = []
        for entry in checked:
            if not self._sched.claimed_by(entry.token_id, parse_via(entry.via)[1]):
                continue  # the via's claim is no longer the token's: it moved away
            # No broker lease of the token has this adoption secret (it ended, or never was):
            # nothing to take over, unless this is a repeated call.
            from_key = self._sched.lease_key_ending(entry.token_id,
                                                    adoption_suffix(entry.via)) or ""
            if self._guard(self._sched.adopt, entry.token_id, from_key, *entry[2:]) is True:
                adopted.append((entry.token_id, entry.to_key))
        return adopted

    def watch(self, holder: str, timeout_s: float, secret: object = None) -> None | QuotaError:
        """Check and count a recall watch (``secret`` proves the holder: recalls are answered
        to their own holder only); the shell does the waiting."""
        self.counts["watch"] += 1
        try:
            check_holder(check_id("holder", holder), secret)
            check_timeout("timeout_s", timeout_s)
        except QuotaError as exc:
            return exc
        return None

    # ------------------------------------------------------------------------------ limits

    def status(self) -> list[ResourceStatus]:
        return self._sched.status()

    def set_limit(self, spec: ResourceSpec) -> None | QuotaError:
        """Change one resource's limit; what is spent or in use is kept."""
        try:
            check_spec(spec)  # validated like the manifest, before anything changes
        except QuotaError as exc:
            return exc
        result = self._guard(self._sched.set_limit, spec)
        self._pump()
        return result

    def apply(self, resources: Mapping[str, ResourceSpec]) -> list[str] | ManifestError:
        """Apply a changed manifest's resources (already validated): changed limits take
        effect; the resource set and each resource's kind must stay. Answers one line per
        changed resource, or refuses, changing nothing."""
        refused = _check_resources(resources)
        if refused is not None:
            return refused
        old = self._sched.specs()
        if set(resources) != set(old):
            return ManifestError(
                f"apply cannot add or remove resources (running: {sorted(old)}, "
                f"new: {sorted(resources)}); restart the executor for that")
        changed = {name: spec for name, spec in resources.items() if spec != old[name]}
        for name, spec in changed.items():  # all checked before any is applied
            if spec.kind is not old[name].kind:
                return ManifestError(f"{name}: cannot change a {old[name].kind.value} resource "
                                     f"into {spec.kind.value}")
        for spec in changed.values():
            self._sched.set_limit(spec)
        self._pump()
        return [describe_change(old[name], spec) for name, spec in changed.items()]

    def change_limit(self, resource: str, value: int) -> None | QuotaError:
        """Change only one resource's limit value, on its definition as it is now (a rate's
        burst that equals its value follows it), so other changes made since are kept."""
        try:
            check_id("resource", resource)
            check_units("limit", value)
            spec = self._sched.pool(resource).spec  # unknown: UnknownResourceError
        except QuotaError as exc:
            return exc
        follows = spec.kind is Kind.RATE and spec.burst == spec.value
        return self.set_limit(dataclasses.replace(spec, value=value,
                                                  burst=value if follows else spec.burst))

    def reset(self, resources: list[str]) -> list[str] | QuotaError:
        """An operator refills ``resources``: what was spent is forgotten, units in live leases
        stay held. Answers one line per resource; an unknown name refuses, changing nothing."""
        try:
            if not isinstance(resources, list) or not resources:
                raise ProtocolError("resources must be a non-empty list of names")
            for name in resources:
                self._sched.pool(check_id("resource", name))  # unknown: UnknownResourceError
        except QuotaError as exc:
            return exc
        now = self._clock()
        leased = {status.name: status.leased_units for status in self._sched.status()}
        lines = []
        for name in dict.fromkeys(resources):
            pool = self._sched.pool(name)
            refilled = pool.refill(leased[name], now)
            self._sched.set_limit(pool.spec)  # saves the refilled pool and serves its waiters
            lines.append(f"{name}: {refilled:,} refilled, {pool.available(now):,} available")
        self._pump()
        return lines

    # ---------------------------------------------------------------------- ticks and drains

    def tick(self) -> None:
        """Grant what refills made fit, fail waits past their limit, expire leases."""
        self._pump()

    def next_wakeup(self) -> float:
        """When to tick next with no call in between, on the service's clock: when something
        falls due, but at least every :data:`IDLE_TICK_S` (lease expiries are looked for that
        often) and never in the past."""
        now = self._clock()
        due = self._sched.next_wakeup()
        return now + (IDLE_TICK_S if due is None else min(IDLE_TICK_S, max(0.0, due - now)))

    def drain(self) -> Outbox:
        """Everything since the last drain; write its changes before acting on the rest.

        The first drain holds every resource's initial state (none after :meth:`restore`).
        """
        outbox = Outbox(tuple(self._changes), tuple(self._resolved), tuple(self._recalls))
        self._changes.clear()
        self._resolved.clear()
        self._recalls.clear()
        return outbox

    # ---------------------------------------------------------------------------- internals

    def _guard(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | QuotaError:
        """Errors are answers; and whatever the call did goes to the outbox."""
        try:
            return fn(*args, **kwargs)
        except QuotaError as exc:
            return exc
        finally:
            self._pump()

    def _settle(self, reports: list[Report]) -> None:
        for token_id, key, returned, used, debt, final in reports:
            self._sched.settle(token_id, key, returned, used, debt, final=final)
        self._pump()

    def _pump(self) -> None:
        """Move what the scheduler decided into the outbox: changes first, then the waiting
        tickets it resolved and the recalls, addressed to the holders of the lease keys."""
        tickets = self._sched.poll()
        changes = self._sched.drain_changes()
        if changes:
            self._changes.append(changes)
        now = self._clock()
        for ticket in tickets:
            waiting = self._waiting.pop(ticket.id, None)
            if waiting is None or ticket.outcome is None:
                continue  # answered at once by its acquire, or withdrawn
            outcome = ticket.outcome
            if isinstance(outcome, Grant):
                # The lease was renewed this long after the request was sent: its holder may
                # trust it that much longer.
                outcome = dataclasses.replace(outcome, waited_s=now - waiting[1])
            self._resolved.append(Resolved(ticket.id, outcome))
        for key, token_ids in self._sched.take_recalls().items():
            self._recalls.append(Recall(holder_of(key), frozenset(token_ids)))


def describe_change(old: ResourceSpec, new: ResourceSpec) -> str:
    """``llm-tokens: value 60000 -> 30000, burst 2000 -> 1000``: only the fields that changed."""
    fields = [f"{field} {_plain(getattr(old, field))} -> {_plain(getattr(new, field))}"
              for field in ResourceSpec.__dataclass_fields__
              if getattr(old, field) != getattr(new, field)]
    return f"{new.name}: " + ", ".join(fields)


def _plain(value: object) -> object:
    return getattr(value, "value", value)  # enums by their manifest word


def _owned(reports: list[Report], secret: object) -> list[Report]:
    """The reports, if ``secret`` proves the holder of every lease they name."""
    check_keys([report.key for report in reports], secret)
    return reports


def _check_resources(resources: object) -> ManifestError | None:
    """A manifest's resources as :meth:`ExecutorService.apply` takes them: each a valid spec
    under its own name."""
    if not isinstance(resources, Mapping):
        return ManifestError(f"resources must be a mapping, not {type(resources).__name__}")
    for name, spec in resources.items():
        try:
            check_spec(spec, f"resources[{name!r}]")
        except QuotaError as exc:
            return ManifestError(str(exc))
        if spec.name != name:
            return ManifestError(f"resources[{name!r}] is named {spec.name!r}")
    return None
