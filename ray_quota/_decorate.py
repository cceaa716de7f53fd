"""Quotas on Ray tasks and actors: the ``@quota`` decorator.

Calling a quota'd task splits a child token off the caller's token for that resource (or opens a
fresh one if none is in scope) and moves it into the task. Inside, ``current_token()`` reaches it;
when the task ends, its unused expected use and credit go back to the parent.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray
from ray._private.ray_constants import DEFAULT_TASK_MAX_RETRIES
from ray.actor import ActorClass
from ray.remote_function import RemoteFunction

from ray_quota._context import (
    enter_scope,
    in_scope,
    leave_scope,
    set_actor_scope,
    set_task_scope,
)
from ray_quota._errors import QuotaError
from ray_quota._runtime import endings, renewer
from ray_quota._token import QuotaToken


@dataclass(frozen=True, slots=True)
class QuotaSpec:
    resource: str
    expected_use: int
    label: str | None


def quota(resource: str, expected_use: int, *, label: str | None = None) -> Callable[[Any], Any]:
    """Put a quota on a Ray remote function or actor class; apply it above ``@ray.remote``.

    Example:
        >>> @ray_quota.quota("llm-tokens", expected_use=1000)
        ... @ray.remote
        ... def summarize(doc):
        ...     with ray_quota.current_token().reserve(800) as reservation:
        ...         reservation.commit(call_llm(doc))
        >>> with ray_quota.QuotaToken("llm-tokens", expected_use=10_000):
        ...     ray.get([summarize.remote(d) for d in docs])   # each task gets a split child

    Stacking several ``@quota`` gives a task tokens for several resources. ``.options()`` keeps
    working, and a caller may pass ``token=`` to hand over a token of its own instead of a split.
    """
    if isinstance(expected_use, bool) or not isinstance(expected_use, int) or expected_use < 1:
        raise ValueError(f"expected_use must be a whole number from 1, not {expected_use!r}")
    spec = QuotaSpec(resource, expected_use, label)

    def wrap(target: Any) -> Any:
        if isinstance(target, QuotaRemoteFunction | QuotaActorClass):
            return target._with(spec)
        if isinstance(target, RemoteFunction):
            if inspect.isasyncgenfunction(target._function):
                raise TypeError("Ray runs async generators only as actor methods: put "
                                "@ray_quota.quota on the actor class")
            return QuotaRemoteFunction(target, (spec,))
        if isinstance(target, ActorClass):
            return QuotaActorClass(target, (spec,))
        raise TypeError("@ray_quota.quota goes above @ray.remote, on a remote function or an "
                        f"actor class, not on {type(target).__name__}")

    return wrap


def child_tokens(quotas: tuple[QuotaSpec, ...],
                 explicit: QuotaToken | None) -> dict[str, QuotaToken]:
    """One token per quota: the caller's own (``token=``), a split of the one in scope, or new."""
    children = {}
    for spec in quotas:
        if explicit is not None and explicit.resource == spec.resource:
            children[spec.resource] = explicit
            continue
        parent = in_scope(spec.resource)
        children[spec.resource] = (parent.split(spec.expected_use) if parent is not None else
                                   QuotaToken(spec.resource, spec.expected_use, label=spec.label))
    return children


def give_back(tokens: Iterable[QuotaToken]) -> None:
    """The task ended and can say so: each token's open reservations count as ``commit(0)``
    and it goes back to its parent (or is released). A token opened for this call alone is
    released without holding the task's end up (queued, see
    :mod:`ray_quota._runtime.giveback`); a split child's merge back is waited for, so that
    the caller, once it has the task's result, can split that expected use again."""
    for token in tokens:
        try:
            token._end_cleanly(wait=token._parent is not None)
        except QuotaError as exc:  # the work is done; a lost return only costs credit
            warnings.warn(f"ray_quota: could not return a token: {exc}", stacklevel=2)


@dataclass(frozen=True, slots=True)
class Retries:
    """A task's exception-retry options, as Ray applies them (its ``max_retries`` counts crash
    and exception retries alike; ``retry_exceptions`` is a bool or a list of exception types)."""

    max_retries: int
    retry_exceptions: bool | tuple[type[BaseException], ...]

    @classmethod
    def of(cls, options: dict[str, Any]) -> Retries:
        retry = options.get("retry_exceptions", False)
        return cls(options.get("max_retries", DEFAULT_TASK_MAX_RETRIES),
                   tuple(retry) if isinstance(retry, list | tuple) else bool(retry))

    def will_retry(self, error: BaseException) -> bool:
        """Whether Ray runs this task again after the attempt now running raised ``error``."""
        if self.retry_exceptions is False or not isinstance(error, Exception):
            return False
        if self.retry_exceptions is not True and not isinstance(error, self.retry_exceptions):
            return False
        attempt = _attempt()
        if attempt is None:
            return False  # give back: a retry then fails loudly rather than a parent losing units
        return self.max_retries < 0 or attempt < self.max_retries


def _attempt() -> int | None:
    """Which attempt of the running task this is (0 first), if this Ray tells (not public API)."""
    worker = getattr(ray._private.worker.global_worker, "core_worker", None)
    number = getattr(worker, "get_current_task_attempt_number", None)
    return number() if callable(number) else None


class _Attempt:
    """One attempt of a quota'd task and its tokens: in scope while its body runs (for every
    thread of the process), given back when it ends, unless it raised and Ray will run it
    again: then the retry takes them up again."""

    __slots__ = ("retried", "retries", "tokens")

    def __init__(self, call: tuple[dict[str, QuotaToken], Retries]) -> None:
        self.tokens, self.retries = call
        self.retried = False
        set_task_scope(self.tokens)

    def bind(self, accepts_token: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Fill the body's ``token`` parameter, if it has one and there is one token."""
        if accepts_token and "token" not in kwargs and len(self.tokens) == 1:
            kwargs["token"] = next(iter(self.tokens.values()))
        return kwargs

    @contextmanager
    def scope(self) -> Iterator[None]:
        reset = enter_scope(*self.tokens.values())
        try:
            yield
        finally:
            leave_scope(reset)

    def failed(self, error: BaseException) -> None:
        self.retried = self.retries.will_retry(error)

    def end(self) -> None:
        set_task_scope({})
        if self.retried:
            for token in self.tokens.values():
                token._leave_for_retry()
        else:
            give_back(self.tokens.values())


Call = tuple[dict[str, QuotaToken], Retries]


def _run_with_tokens(fn: Callable[..., Any], accepts_token: bool) -> Callable[..., Any]:
    """``fn`` as the task body, run by :class:`_Attempt`; a generator stays one, in scope for
    each step of its iteration, and gives back once it finishes or is closed (its consumer
    dropped the stream)."""

    def body(call: Call, *args: Any, **kwargs: Any) -> Any:
        attempt = _Attempt(call)
        try:
            with attempt.scope():
                return fn(*args, **attempt.bind(accepts_token, kwargs))
        except BaseException as error:
            attempt.failed(error)
            raise
        finally:
            attempt.end()

    def generator_body(call: Call, *args: Any, **kwargs: Any) -> Any:
        attempt = _Attempt(call)
        steps = fn(*args, **attempt.bind(accepts_token, kwargs))  # runs nothing yet
        try:
            while True:
                with attempt.scope():
                    try:
                        value = next(steps)
                    except StopIteration as stop:
                        return stop.value
                yield value
        except BaseException as error:
            attempt.failed(error)
            raise
        finally:
            with attempt.scope():
                steps.close()  # its own clean-up runs in scope too
            attempt.end()

    wrapper = generator_body if inspect.isgeneratorfunction(fn) else body
    # Not functools.wraps: Ray would check calls against fn's signature through __wrapped__.
    wrapper.__name__, wrapper.__qualname__ = fn.__name__, fn.__qualname__
    wrapper.__module__, wrapper.__doc__ = fn.__module__, fn.__doc__
    return wrapper


class QuotaRemoteFunction:
    """A Ray remote function whose calls carry quota tokens; use it like the original."""

    def __init__(self, target: RemoteFunction, quotas: tuple[QuotaSpec, ...],
                 remote: Any = None, options: dict[str, Any] | None = None) -> None:
        self._target = target
        self._quotas = quotas
        self._options = target._default_options if options is None else options
        self._retries = Retries.of(self._options)
        fn = target._function
        if remote is None:
            accepts = "token" in inspect.signature(fn).parameters
            body = _run_with_tokens(fn, accepts)
            options = target._default_options
            remote = ray.remote(**options)(body) if options else ray.remote(body)
        self._remote = remote

    def _with(self, spec: QuotaSpec) -> QuotaRemoteFunction:
        return QuotaRemoteFunction(self._target, (*self._quotas, spec))

    def options(self, **options: Any) -> QuotaRemoteFunction:
        """Ray's task options, as on the original remote function."""
        return QuotaRemoteFunction(self._target, self._quotas, self._remote.options(**options),
                                   {**self._options, **options})

    def remote(self, *args: Any, token: QuotaToken | None = None, **kwargs: Any) -> Any:
        """Submit the task with its tokens; returns Ray's ObjectRef, as the original does."""
        tokens = child_tokens(self._quotas, token)
        ref = self._remote.remote((tokens, self._retries), *args, **kwargs)
        if isinstance(ref, ray.ObjectRef):  # named until the task ends (see the renewer)
            renewer.until_done([child._id for child in tokens.values()], ref)
        return ref


class QuotaActorClass:
    """A Ray actor class whose instances hold quota tokens for their whole life."""

    def __init__(self, target: ActorClass, quotas: tuple[QuotaSpec, ...],
                 remote: Any = None) -> None:
        self._target = target
        self._quotas = quotas
        if remote is None:
            original = getattr(target, "__ray_actor_class__")

            class Holder(original):  # type: ignore[misc, valid-type]
                def __init__(self, __ray_quota_tokens: dict[str, QuotaToken], *args: Any,
                             **kwargs: Any) -> None:
                    set_actor_scope(__ray_quota_tokens)
                    super().__init__(*args, **kwargs)
                    endings.hook_actor()  # its tokens go back when it ends gracefully

            Holder.__name__, Holder.__qualname__ = original.__name__, original.__qualname__
            Holder.__module__ = original.__module__
            options = getattr(target, "_default_options", None)
            remote = ray.remote(**options)(Holder) if options else ray.remote(Holder)
        self._remote = remote

    def _with(self, spec: QuotaSpec) -> QuotaActorClass:
        return QuotaActorClass(self._target, (*self._quotas, spec))

    def options(self, **options: Any) -> QuotaActorClass:
        return QuotaActorClass(self._target, self._quotas, self._remote.options(**options))

    def remote(self, *args: Any, token: QuotaToken | None = None, **kwargs: Any) -> Any:
        """Create the actor with its tokens; returns Ray's actor handle."""
        return self._remote.remote(child_tokens(self._quotas, token), *args, **kwargs)
