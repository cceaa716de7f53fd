"""QuotaToken and Reservation: the handles user code holds.

All state that matters lives in the executor; a handle holds an id, a generation that moves with
it, the claim that proves it may use the token, and a :class:`LocalLease` of units it can hand out
without asking anyone. A moved handle's pickled bytes carry proofs that let whoever unpickles them
take the token up (see :mod:`ray_quota._core.credentials`); the id alone lets nobody.
"""

from __future__ import annotations

import asyncio
import enum
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import ray

from ray_quota._runtime import endings, giveback, identity, renewer, routing, rpc
from ray_quota._runtime.steps import Abandoned, Sleep, Steps, run, run_async
from ray_quota._observability import observe as _observe
from ray_quota._errors import (
    ExecutorUnavailableError,
    ForgedTokenError,
    LeaseEndedError,
    IncompatibleTokensError,
    QuotaTerminated,
    TokenClosedError,
    TokenMovedError,
    TokenStateError,
)
from ray_quota._core.credentials import add_proofs, claim_value
from ray_quota._core.holder import LeaseSet, LocalLease, capped_use
from ray_quota._core.protocol import (
    RENEW_INTERVAL_S,
    Adoption,
    Grant,
    ProviderSignal,
    Renewed,
    Report,
    TokenInfo,
    check_signal,
    check_timeout,
    prefetch_cap,
)
from ray_quota._spec import Kind, ResourceSpec, check_units
from ray_quota._token_async import AsyncTokenOps


class _State(enum.Enum):
    LIVE = "live"
    MOVED = "moved"
    CLOSED = "closed"


class QuotaToken(AsyncTokenOps):
    """An unforgeable right to consume one resource, weighted by its expected use.

    Example:
        >>> token = QuotaToken("llm-tokens", expected_use=1000)
        >>> with token.reserve(500) as reservation:
        ...     used = call_llm()
        ...     reservation.commit(used)
        >>> child = token.split(200)     # pass `child` to a Ray task; it moves there

    Args:
        resource: a resource of the executor's environment.
        expected_use: the units one reservation is expected to take; the token's weight.
        label: an optional tag (a team, a job) carried into metrics and inherited by splits.

    Each operation has an asyncio twin (``await QuotaToken.open_async(...)``, ``split_async``,
    ...) that never blocks the event loop; see :mod:`ray_quota._token_async`.
    """

    __slots__ = ("_id", "_spec", "_environment", "_cluster", "_generation", "_label",
                 "_expected_use", "_leases", "_lock", "_state", "_verified", "_parent",
                 "_scope", "_claimant", "_proofs", "_received_at", "__weakref__")

    def __init__(self, resource: str, expected_use: int, *, label: str | None = None) -> None:
        run(self._opening(resource, expected_use, label))

    def _opening(self, resource: str, expected_use: int, label: str | None) -> Steps[None]:
        check_units("expected_use", expected_use)
        if label is not None and not isinstance(label, str):
            raise TypeError(f"label must be a string, not {type(label).__name__}")
        claimant = identity.claimant()
        opened: TokenInfo = yield from rpc.calling("open_token", resource, expected_use,
                                                   claimant, label)
        # After the call, which refreshes a view of a replaced executor.
        info = yield from rpc.informing()
        self._setup(opened.id, opened.spec, info.environment, info.cluster_id, 0, label,
                    expected_use)
        self._claimant = claimant
        self._verified = True

    def _setup(self, token_id: str, spec: ResourceSpec, environment: str, cluster: str,
               generation: int, label: str | None, expected_use: int) -> None:
        self._id = token_id
        self._spec = spec
        self._environment = environment
        self._cluster = cluster
        self._generation = generation
        self._label = label
        self._expected_use = expected_use
        self._leases = LeaseSet(token_id, spec.kind, max_prefetch=prefetch_cap(spec),
                                new_key=identity.lease_key)
        self._lock = threading.Lock()
        self._state = _State.LIVE
        self._verified = False
        self._parent: str | None = None  # the token this one was split from
        self._scope: Any = None
        self._proofs: tuple[str, ...] = ()  # from the pickled bytes: they take the token up
        endings.own(self)  # it ends with this process, if nothing ends it first
        self._received_at: float | None = None  # moved here then, and not used since
        renewer.track(self)  # from the start: renewals name it while it holds no lease

    # -------------------------------------------------------------------------- properties

    @property
    def resource(self) -> str:
        return self._spec.name

    @property
    def environment(self) -> str:
        return self._environment

    @property
    def expected_use(self) -> int:
        """The expected use as this handle last learned it (see :meth:`describe`)."""
        return self._expected_use

    def describe(self) -> tuple[int, float]:
        """Ask the executor for this token's expected use and credit (negative: debt)."""
        return run(self._describing())

    def _describing(self) -> Steps[tuple[int, float]]:
        self._usable()
        yield from self._verifying()
        expected_use, credit = yield from rpc.calling("describe", self._id, self._generation,
                                                      self._claimant)
        self._expected_use = expected_use
        return expected_use, credit

    @property
    def label(self) -> str | None:
        return self._label

    @property
    def spec(self) -> ResourceSpec:
        """The resource's limit as this token last learned it."""
        return self._spec

    def __repr__(self) -> str:
        # Never the id: it is the capability.
        return (f"QuotaToken(resource={self.resource!r}, expected_use={self._expected_use}, "
                f"label={self._label!r}, state={self._state.value!r})")

    # ----------------------------------------------------------------------------- reserve

    def reserve(self, amount: int, timeout: float | None = None) -> Reservation:
        """Reserve ``amount`` units, from the local lease when it can, else from the executor.

        Waits as the resource's enforcement says, at most ``timeout`` seconds if given.

        Raises:
            FailedReservation: the units could not be had in time (reject, or a timeout).
            QuotaTerminated: a ``terminate`` resource could not grant in time.
            InvalidAmountError: ``amount`` is not a whole number the resource can ever grant, or
                ``timeout`` is not None nor a finite number of seconds from 0 (NaN and
                infinity are refused; None waits as long as the resource allows).
        """
        local = self._try_local(amount, timeout)
        return local if local is not None else run(self._acquiring(amount, timeout))

    async def reserve_async(self, amount: int, timeout: float | None = None) -> Reservation:
        """The asyncio twin of :meth:`reserve`, for async actors and Ray Serve deployments."""
        local = self._try_local(amount, timeout)
        return local if local is not None else await run_async(self._acquiring(amount, timeout))

    def _acquiring(self, amount: int, timeout: float | None) -> Steps[Reservation]:
        """Ask the executor (or the node's broker) for ``amount``: the logic of both twins,
        which differ only in how they wait (see :mod:`ray_quota._runtime.steps`)."""
        delays = rpc.retry_delays()
        while True:
            yield from self._verifying()
            lease, sent_at, args = self._acquire_args(amount, timeout)
            try:
                grant = yield from routing.leasing("acquire", *args, resource=self.resource)
            except QuotaTerminated as exc:
                self._terminate(exc)
                raise
            except LeaseEndedError:
                self._renew_lease(lease)
                continue
            except ExecutorUnavailableError:
                delay = self._lost(lease, delays)
            except Abandoned as abandoned:  # reserve_async was cancelled while it waited
                _give_back_late(self, lease, amount, abandoned.late, sent_at)
                raise
            else:
                return self._granted(lease, amount, grant, sent_at)
            yield Sleep(delay)

    def _try_local(self, amount: int, timeout: float | None) -> Reservation | None:
        started = time.perf_counter()
        self._usable()
        if type(amount) is not int or amount < 1:
            check_units("amount", amount)  # raises; the ceiling is checked by the executor,
            # whose limits may have changed since this handle learned them
        if timeout is not None:
            check_timeout("timeout", timeout)  # NaN too: it would compare as no wait at all
        with self._lock:
            lease = self._leases.take(amount, time.monotonic())
        if lease is None:
            return None
        _observe.reserved(self._cluster, self._spec.name, self._label, _observe.LOCAL,
                          _observe.GRANTED, amount, time.perf_counter() - started)
        return Reservation(self, amount, lease)

    def _acquire_args(self, amount: int, timeout: float | None) -> tuple[LocalLease, float, tuple]:
        renewer.track(self)
        with self._lock:
            lease = self._leases.current
            prefetch = lease.prefetch()
        sent_at = time.monotonic()
        return lease, sent_at, (self._id, self._generation, self._claimant, lease.key,
                                amount, prefetch, timeout)

    def _granted(self, lease: LocalLease, amount: int, grant: Grant,
                 sent_at: float) -> Reservation:
        with self._lock:
            if not self._leases.granted(lease, amount, grant, sent_at=sent_at):
                # Closed or moved while this request waited: the units are not ours to use.
                self._usable()
                raise TokenClosedError("the token was released while this reservation waited")
        _observe.reserved(self._cluster, self._spec.name, self._label, _observe.EXECUTOR,
                          _observe.GRANTED, amount, time.monotonic() - sent_at)
        return Reservation(self, amount, lease)

    def _renew_lease(self, lease: LocalLease) -> None:
        """The executor ended this lease (it expired): carry on under a new one."""
        with self._lock:
            self._leases.ended(lease)

    def _lost(self, lease: LocalLease, delays: Iterator[float]) -> float:
        """An acquire's answer was lost (the executor died): whatever it granted is unknown, so
        settle this lease as final once its reservations close, and ask again under a new one.

        Returns how long to pause first; raises the error once an executor restart would have
        finished.
        """
        with self._lock:
            self._leases.lost(lease)
        delay = next(delays, None)
        if delay is None:
            raise ExecutorUnavailableError("the ray_quota executor did not come back")
        return delay

    @staticmethod
    def _terminate(exc: QuotaTerminated) -> None:
        """End the actor that asked; a task ends by the exception itself, which Ray won't retry."""
        if ray.is_initialized() and ray.get_runtime_context().get_actor_id():
            print(f"ray_quota: ending this actor: {exc}", file=sys.stderr, flush=True)
            ray.actor.exit_actor()

    # ---------------------------------------------------------------------- split and merge

    def split(self, child_expected_use: int) -> QuotaToken:
        """Move ``child_expected_use`` and the same share of credit into a new token.

        Raises:
            InvalidAmountError: more than this token's expected use (checked by the executor,
                which knows what children gave back); nothing changes.
        """
        return run(self._splitting(child_expected_use))

    def _splitting(self, child_expected_use: int) -> Steps[QuotaToken]:
        self._usable()
        check_units("child_expected_use", child_expected_use)
        yield from self._verifying()
        opened, self._expected_use = yield from rpc.calling(
            "split", self._id, self._generation, self._claimant, child_expected_use)
        child = QuotaToken.__new__(QuotaToken)
        child._setup(opened.id, opened.spec, self._environment, self._cluster, 0, self._label,
                     child_expected_use)
        child._verified = True
        child._claimant = self._claimant
        child._parent = self._id
        return child

    def merge(self, other: QuotaToken) -> None:
        """Add ``other``'s expected use and credit to this token; ``other`` is used up.

        Raises:
            IncompatibleTokensError: different resources or environments, or ``other is self``.
        """
        run(self._merging(other))

    def _merging(self, other: QuotaToken) -> Steps[None]:
        if not isinstance(other, QuotaToken):
            raise TypeError(f"can only merge a QuotaToken, not {type(other).__name__}")
        if other is self:
            raise IncompatibleTokensError("a token cannot be merged with itself")
        self._usable()
        other._usable()
        if (other._cluster, other._environment, other.resource) != (
                self._cluster, self._environment, self.resource):
            raise IncompatibleTokensError(
                f"cannot merge a token of {other._environment}/{other.resource} into one of "
                f"{self._environment}/{self.resource}")
        if other._reserved():
            raise TokenStateError("cannot merge a token that has open reservations")
        yield from self._verifying()
        yield from other._verifying()
        # One claim for both: the other's proofs too, in case it was moved here and not yet used.
        yield from routing.leasing("merge", self._id, self._generation,
                           add_proofs(self._claimant, other._proofs), other._id,
                           other._generation, other._final_reports())
        other._state = _State.CLOSED
        self._expected_use += other._expected_use

    # ------------------------------------------------------------------------ release/move

    def close(self) -> None:
        """Release the token: spare units go back and its weight leaves the scheduler.

        Open reservations are charged in full. Closing twice is harmless.
        """
        run(self._closing())

    def _closing(self) -> Steps[None]:
        if self._state is not _State.LIVE:
            return
        reports = self._final_reports()
        self._state = _State.CLOSED
        # Waited for: code that closes a token means "now" (and may end its process next,
        # which would lose a queued close); the fan-out path queues its own (_end_cleanly).
        yield from routing.leasing("close", self._id, self._generation, self._claimant, reports)

    def return_to_parent(self) -> bool:
        """Give this token's expected use and credit back to the token it was split from.

        If that token is gone, this one is simply released. Either way this handle is used up.
        Returns whether it merged.
        """
        return run(self._returning())

    def _returning(self) -> Steps[bool]:
        self._usable()
        if self._parent is None:
            yield from self._closing()
            return False
        yield from self._verifying()
        reports = self._final_reports()
        self._state = _State.CLOSED
        return bool((yield from routing.leasing("merge_back", self._id, self._generation,
                                                self._claimant, self._parent, reports)))

    def _end_cleanly(self, *, wait: bool = True) -> bool:
        """Its holder ended and could still report (the task returned or raised, the actor or
        the driver exits): open reservations count as ``commit(0)``, and the token goes back to
        the one it was split from, or is released. Returns whether it merged back; unless
        ``wait``, queues the give-back instead (see :mod:`ray_quota._runtime.giveback`) and
        returns False."""
        if self._state is not _State.LIVE:
            return False
        self._verify()
        reports = self._final_reports(open_used=False)
        self._state = _State.CLOSED
        if not wait:
            if self._parent is None:
                giveback.queue("close", self._id, self._generation, self._claimant, reports)
            else:
                giveback.queue("merge_back", self._id, self._generation, self._claimant,
                               self._parent, reports)
            return False
        if self._parent is None:
            routing.lease_call("close", self._id, self._generation, self._claimant, reports)
            return False
        return bool(routing.lease_call("merge_back", self._id, self._generation, self._claimant,
                                       self._parent, reports))

    def _leave_for_retry(self) -> None:
        """The task raised and Ray will run it again: give back every unit this handle holds
        (open reservations count as ``commit(0)``: it could say so), but keep the token live,
        so the retry, which takes the same argument up again, can use it. This handle is used
        up."""
        if self._state is not _State.LIVE:
            return
        reports = self._final_reports(open_used=False)
        self._state = _State.MOVED
        if reports:
            routing.send("settle", reports)

    def __enter__(self) -> QuotaToken:
        """Put the token in scope (see :func:`ray_quota.current_token`) until the block ends,
        then close it."""
        from ray_quota._context import enter_scope

        self._scope = enter_scope(self)
        return self

    def __exit__(self, *exc: object) -> None:
        from ray_quota._context import leave_scope

        if self._scope is not None:
            leave_scope(self._scope)
            self._scope = None
        self.close()

    def __del__(self, _finalizing: Callable[[], bool] = sys.is_finalizing) -> None:
        # At interpreter exit Ray is already down (the executor takes the token back when its
        # lease expires) and module globals may be None: do nothing, and never print.
        if _finalizing():
            return
        try:
            state = getattr(self, "_state", None)
            if state is None or state is _State.CLOSED or not ray.is_initialized():
                return  # closed: its close (merge, merge back) carried its final reports
            reports = self._final_reports()
            if state is _State.LIVE:
                routing.send("close", self._id, self._generation, self._claimant, reports)
            elif reports:
                routing.send("settle", reports)
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickling moves the token: this handle stops working, the unpickled one takes over.

        The bytes carry this process's proof of its claim at this generation (and the proofs
        this handle was moved here with, in case it never used the token), which whoever
        unpickles them needs to take the token up; a Ray retry of the same task may again.
        """
        self._usable()
        self._state = _State.MOVED  # the renewer gives this handle's spare units back
        # Named by this process until taken up: it may wait in Ray's queue for long.
        renewer.sent(self._id, self._generation + 1)
        proofs = (claim_value(identity.CLAIM_KEY, self._id, self._generation),
                  *self._proofs)[:MAX_PROOFS]
        return (_rebuild, (self._id, self._spec, self._environment, self._cluster,
                           self._generation + 1, self._label, self._expected_use, self._parent,
                           proofs))

    # --------------------------------------------------------------------------- internals

    def _usable(self) -> None:
        if self._state is _State.MOVED:
            raise TokenMovedError(
                "this token was passed to another task or actor, which owns it now; "
                "split it first to keep a share")
        if self._state is _State.CLOSED:
            raise TokenClosedError("this token was closed or merged into another token")

    def _verify(self) -> None:
        run(self._verifying())

    def _verifying(self) -> Steps[None]:
        self._received_at = None  # a call follows, which takes a moved token up
        if not self._verified:
            if self._cluster != (yield from rpc.informing()).cluster_id:
                rpc.reset()  # our cached view may predate a new executor
                if self._cluster != (yield from rpc.informing()).cluster_id:
                    raise ForgedTokenError("this token was issued by another cluster's executor")
            self._verified = True

    def _reserved(self) -> int:
        with self._lock:
            return self._leases.reserved

    def _settle(self, lease: LocalLease, amount: int, used: int) -> None:
        """A reservation closed: overuse is charged at once, and under contention spare goes
        back at once. Unused units of an uncontended rate lease go back with the next batch of
        give-backs (within moments, see :mod:`ray_quota._runtime.giveback`): nobody waits for
        them, and a task's end then sends them together with its token's give-back."""
        with self._lock:
            report = self._leases.settle(lease, amount, used)
            batched = self._spec.kind is Kind.RATE and not lease.contended and not report.debt \
                if report is not None else False
        if report is not None:
            (giveback.queue if batched else routing.send)("settle", [report])

    # The renewer's side (see :mod:`ray_quota._runtime.renewer`): the lease set, under the token's lock.

    def _recall(self) -> Report | None:
        """Others wait for this resource: give back spare units now."""
        with self._lock:
            return self._leases.recall()

    def _final_reports(self, *, open_used: bool = True) -> list[Report]:
        """Release every lease of this handle: open reservations count as used in full (or,
        unless ``open_used``, as unused: the holder ended and could say so)."""
        with self._lock:
            return self._leases.final_reports(open_used=open_used)

    def _reports(self, now: float) -> list[Report]:
        """The running totals of each lease; retired ones (and all, once moved) final once idle."""
        with self._lock:
            return self._leases.reports(now, live=self._state is _State.LIVE)

    def _take_up_if_idle(self, now: float) -> None:
        """A handle moved here and unused for a renewal interval: take the token up (its
        sender stops naming it then), so that it is released if this process dies unused.
        Without waiting for the answer: the renewal it comes with must not be held up."""
        received = self._received_at
        if received is None or now - received < RENEW_INTERVAL_S \
                or self._state is not _State.LIVE:
            return
        self._received_at = None
        if self._cluster == rpc.info().cluster_id:  # (a token of another cluster is refused)
            rpc.send("describe", self._id, self._generation, self._claimant)

    def _renewed(self, alive: Renewed, sent_at: float) -> None:
        with self._lock:
            self._leases.renewed(alive, sent_at)

    def _adoptions(self) -> list[Adoption]:
        """This handle's share of its broker's leases, to take over directly (the broker died)."""
        with self._lock:
            return self._leases.adoptions()

    def _adopted(self, adopted: set[tuple[str, str]]) -> None:
        """Leases in ``adopted`` are now the executor's directly; the others are gone."""
        with self._lock:
            self._leases.adopted(adopted)


_LATE: set[Any] = set()  # give-backs under way (asyncio keeps only weak references to tasks)


def _give_back_late(token: QuotaToken, lease: LocalLease, amount: int, late: Any,
                    sent_at: float) -> None:
    """A cancelled ``reserve_async``'s acquire was cancelled too, but may have been granted
    first: if so, take the grant into its lease and commit 0 at once, so the units are spare
    (given back under contention, as any spare is) instead of held by a reservation nobody has.
    """
    async def settle() -> None:
        try:
            grant = await late
        except Exception:  # noqa: BLE001 - cancelled in time (or lost): nothing was granted
            return
        if isinstance(grant, Grant):
            try:
                token._granted(lease, amount, grant, sent_at).commit(0)
            except Exception:  # noqa: BLE001 - the token closed meanwhile: its close gave back
                pass

    task = asyncio.get_running_loop().create_task(settle())
    _LATE.add(task)
    task.add_done_callback(_LATE.discard)


# A handle moved on before it was used keeps the proofs it came with: a chain of that many moves
# without a call in between still takes the token up.
MAX_PROOFS = 8


def _rebuild(token_id: str, spec: ResourceSpec, environment: str, cluster: str, generation: int,
             label: str | None, expected_use: int, parent: str | None,
             proofs: tuple[str, ...] = ()) -> QuotaToken:
    token = QuotaToken.__new__(QuotaToken)
    token._setup(token_id, spec, environment, cluster, generation, label, expected_use)
    token._parent = parent
    # Taken up by whoever unpickles it: the task (stable across Ray retries) or the actor, with
    # the proofs from the bytes. Kept for every later call, so threads of the same task use it.
    token._proofs = tuple(proofs)
    token._claimant = identity.claimant(token._proofs)
    token._received_at = time.monotonic()
    return token


class Reservation:
    """Units reserved from a token; commit what was really used.

    Example:
        >>> with token.reserve(500) as reservation:
        ...     reservation.commit(312)    # 188 units go back
    """

    __slots__ = ("_token", "_lease", "amount", "_open")

    def __init__(self, token: QuotaToken, amount: int, lease: LocalLease) -> None:
        self._token = token
        self._lease = lease
        self.amount = amount
        self._open = True

    def commit(self, used: int | None = None) -> None:
        """Settle the reservation: less than reserved returns the rest, more is charged as debt.

        ``used`` defaults to the amount reserved. For concurrency, commit frees the slots.

        Raises:
            TokenStateError: committed already, or the token was closed since.
            InvalidAmountError: ``used`` is not a whole number from 0 (nothing changes), or
                exceeds the reservation by more than the resource's ``max_overuse`` (the
                reservation is committed, charging that cap).
        """
        if not self._open:
            raise TokenStateError("this reservation was already committed")
        used = self.amount if used is None else used
        check_units("used", used, allow_zero=True)
        if self._token._state is _State.CLOSED:
            raise TokenClosedError("the token was closed; its open reservations were charged")
        self._open = False
        charged, too_much = capped_use(self._token._spec, self.amount, used)
        self._token._settle(self._lease, self.amount, charged)
        _observe.committed(self._token._cluster, self._token._spec.name, self._token._label,
                           self.amount, charged)
        if too_much is not None:
            raise too_much

    def refused(self, retry_after_s: float | None = None, *, remaining: int | None = None,
                reset_s: float | None = None) -> None:
        """Tell the executor that the provider refused this reservation's request (an HTTP
        429): the resource's effective limit is lowered for everyone and grants wait until
        ``retry_after_s`` has passed (DESIGN 8). ``remaining`` and ``reset_s``: what the
        provider says is left in its window, and when that resets, if it says so. Commit
        as usual afterwards (``commit(0)`` if nothing was used). Does not wait for an answer.

        Raises:
            InvalidAmountError: a value is not seconds or units from 0 (nothing is sent).
        """
        self._tell(ProviderSignal(True, retry_after_s, remaining, reset_s))

    def remaining(self, units: int, reset_s: float | None = None) -> None:
        """Tell the executor what the provider says is left in its window after this
        reservation's request (``x-ratelimit-remaining-*``): little left backs the effective
        limit off before the provider refuses. Does not wait for an answer.

        Raises:
            InvalidAmountError: a value is not seconds or units from 0 (nothing is sent).
        """
        self._tell(ProviderSignal(False, None, units, reset_s))

    def _tell(self, signal: ProviderSignal) -> None:
        check_signal(signal)
        token = self._token
        token._usable()
        # Straight to the executor, which keeps the limit; a broker would only pass it on.
        rpc.send("feedback", token._id, token._generation, token._claimant, self._lease.key,
                 signal, identity.SECRET)

    @property
    def committed(self) -> bool:
        return not self._open

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._open and self._token._state is not _State.CLOSED:
            self.commit(0)

    async def __aenter__(self) -> Reservation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__(*exc)

    def __del__(self, _finalizing: Callable[[], bool] = sys.is_finalizing) -> None:
        if _finalizing():  # as QuotaToken.__del__: nothing to give back to at exit
            return
        try:
            if getattr(self, "_open", False) and self._token._state is not _State.CLOSED:
                self.commit(0)
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass

    def __repr__(self) -> str:
        return f"Reservation(resource={self._token.resource!r}, amount={self.amount}, " \
               f"committed={not self._open})"


def with_reservation(token: QuotaToken, amount: int, fn: Callable[..., int], *args: Any,
                     timeout: float | None = None, **kwargs: Any) -> int:
    """Reserve ``amount``, run ``fn``, and commit what it says it used.

    Example:
        >>> used = with_reservation(token, 800, call_llm, prompt)   # call_llm returns tokens used

    If ``fn`` raises, the reservation counts as unused (``commit(0)``) and the error propagates.
    """
    with token.reserve(amount, timeout=timeout) as reservation:
        used = fn(*args, **kwargs)
        reservation.commit(used)
    return used


async def with_reservation_async(token: QuotaToken, amount: int,
                                 fn: Callable[..., Awaitable[int]], *args: Any,
                                 timeout: float | None = None, **kwargs: Any) -> int:
    """The asyncio twin of :func:`with_reservation`, for a coroutine function ``fn``."""
    async with await token.reserve_async(amount, timeout=timeout) as reservation:
        used = await fn(*args, **kwargs)
        reservation.commit(used)
    return used
