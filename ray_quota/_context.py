"""Which tokens are in scope here: the ones a quota'd task received, or a `with token:` block."""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING, Any

from ray_quota._errors import TokenStateError

if TYPE_CHECKING:
    from ray_quota._token import QuotaToken

_SCOPE: contextvars.ContextVar[dict[str, QuotaToken]] = contextvars.ContextVar(
    "ray_quota_scope", default={})


def enter_scope(*tokens: QuotaToken) -> Any:
    """Put tokens in scope, by resource; returns what :func:`leave_scope` needs."""
    scope = dict(_SCOPE.get())
    for token in tokens:
        scope[token.resource] = token
    return _SCOPE.set(scope)


def leave_scope(reset: Any) -> None:
    _SCOPE.reset(reset)


# An actor's tokens live as long as the actor; its method calls run in other contexts. A task's
# are seen by every thread of its process while it runs (a worker runs one task at a time), so
# threads the task starts reach them too.
_ACTOR_SCOPE: dict[str, QuotaToken] = {}
_TASK_SCOPE: dict[str, QuotaToken] = {}


def set_actor_scope(tokens: dict[str, QuotaToken]) -> None:
    """Give this actor process its tokens for every method call."""
    _ACTOR_SCOPE.clear()
    _ACTOR_SCOPE.update(tokens)


def set_task_scope(tokens: dict[str, QuotaToken]) -> None:
    """Give every thread of this process the running task's tokens (none: the task ended)."""
    _TASK_SCOPE.clear()
    _TASK_SCOPE.update(tokens)


def _scope() -> dict[str, QuotaToken]:
    scope = _SCOPE.get()
    if _ACTOR_SCOPE or _TASK_SCOPE:
        return {**_ACTOR_SCOPE, **_TASK_SCOPE, **scope}
    return scope


def in_scope(resource: str) -> QuotaToken | None:
    """The token in scope for ``resource``, if any."""
    return _scope().get(resource)


def current_token(resource: str | None = None) -> QuotaToken:
    """The token this task or block holds for ``resource`` (or its only one).

    Example:
        >>> @ray_quota.quota("llm-tokens", expected_use=1000)
        ... @ray.remote
        ... def summarize(doc):
        ...     with ray_quota.current_token().reserve(800) as reservation:
        ...         reservation.commit(call_llm(doc))

    Raises:
        TokenStateError: no token (or several, and no ``resource`` named) is in scope.
    """
    scope = _scope()
    if resource is not None:
        if resource in scope:
            return scope[resource]
        raise TokenStateError(f"no token for {resource!r} is in scope here "
                              f"(in scope: {sorted(scope) or 'none'})")
    if len(scope) == 1:
        return next(iter(scope.values()))
    raise TokenStateError("name the resource: tokens in scope here are "
                          f"{sorted(scope) or 'none'}")
