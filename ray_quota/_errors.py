"""Every exception ray_quota raises.

    QuotaError (RuntimeError)
    ├── ManifestError (ValueError)       a manifest is invalid; names file, field path and reason
    ├── NotInitializedError              no executor is running; call ray_quota.init() first
    ├── ExecutorUnavailableError         the executor did not answer (it died or is restarting)
    ├── UnknownResourceError (KeyError)  the active environment has no such resource
    ├── InvalidAmountError (ValueError)  an amount or expected use is not a positive whole number in range
    ├── TokenStateError                  the token or reservation cannot do that any more
    │   ├── TokenMovedError              the token was passed to another process
    │   ├── TokenClosedError             the token was closed, merged away or released
    │   └── LeaseEndedError              a process's lease ended; it asks again under a new one
    ├── ForgedTokenError                 the token is not one this cluster's executor issued
    ├── IncompatibleTokensError (ValueError) merge across resources, environments or with itself
    ├── ProtocolError (TypeError)        a message to the executor has a field of the wrong type
    ├── AccessDeniedError (PermissionError) a call without the secret or claim its ids need
    ├── FailedReservation                a `reject` resource could not grant in time; `.estimated_wait_s`
    ├── QuotaTerminated                  a `terminate` resource ended the task or actor that asked
    ├── StateWriteError                  the executor could not save a call (disk full, locked); it changed nothing
    └── StateMissingError                the executor's saved state is missing or unreadable where it was expected

Each exception takes all its arguments through ``super().__init__`` so that it pickles, crosses Ray
and still matches ``isinstance`` in the caller.
"""

from __future__ import annotations

from typing import Any


class QuotaError(RuntimeError):
    """Base class of every ray_quota error."""


class ManifestError(QuotaError, ValueError):
    """A manifest could not be loaded; the message names the source, the field path and the reason."""


class NotInitializedError(QuotaError):
    """No ray_quota executor is reachable: call ``ray_quota.init(...)`` first."""


class ExecutorUnavailableError(QuotaError):
    """The executor did not answer: it died, is restarting, or Ray is shutting down."""


class UnknownResourceError(QuotaError, KeyError):
    """The active environment declares no resource of that name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InvalidAmountError(QuotaError, ValueError):
    """An amount or expected use is not a positive whole number the resource can grant."""


class TokenStateError(QuotaError):
    """The token or reservation is not in a state that allows this call."""


class TokenMovedError(TokenStateError):
    """The token was passed to another process, which now owns it."""


class TokenClosedError(TokenStateError):
    """The token was closed, released or merged into another token."""


class LeaseEndedError(TokenStateError):
    """A lease this process held ended (it expired, or was settled as final).

    Handled inside ray_quota: the process starts a new lease and asks again.
    """


class ForgedTokenError(QuotaError):
    """The token is unknown to this cluster's executor: forged, tampered with, or from elsewhere."""


class IncompatibleTokensError(QuotaError, ValueError):
    """Tokens of different resources or environments, or a token with itself, cannot merge."""


class ProtocolError(QuotaError, TypeError):
    """A message to the executor is malformed: a field has the wrong type or shape.

    The executor is a trust boundary, so it checks every message it receives; numbers out of
    range are :class:`InvalidAmountError` instead.
    """


class AccessDeniedError(QuotaError, PermissionError):
    """A call named a holder, a lease or a token without the secret or claim that proves it may.

    Ids are not secrets: lease keys and token ids travel. See :mod:`ray_quota._core.credentials`.
    """


class FailedReservation(QuotaError):
    """A reservation on a ``reject`` resource could not be granted.

    Attributes:
        resource: the resource's name.
        amount: the units asked for.
        estimated_wait_s: seconds until the units would be free (rate resources), else ``None``.
    """

    def __init__(self, resource: str, amount: int, estimated_wait_s: float | None = None) -> None:
        wait = "" if estimated_wait_s is None else f"; estimated wait {estimated_wait_s:.3f}s"
        super().__init__(f"{resource!r}: could not reserve {amount} units{wait}", resource,
                         amount, estimated_wait_s)
        self.resource = resource
        self.amount = amount
        self.estimated_wait_s = estimated_wait_s

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (type(self), (self.resource, self.amount, self.estimated_wait_s))


class QuotaTerminated(QuotaError):
    """A ``terminate`` resource could not grant in time and ended the task or actor that asked."""

    def __init__(self, resource: str, amount: int) -> None:
        super().__init__(f"{resource!r}: terminated; could not reserve {amount} units in time",
                         resource, amount)
        self.resource = resource
        self.amount = amount

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (type(self), (self.resource, self.amount))


class StateWriteError(QuotaError):
    """The executor could not save a call's changes (disk full, database locked).

    The call changed nothing: the executor went back to its last saved state. Asking again is
    safe once the disk has room.
    """


class StateMissingError(QuotaError):
    """The executor refused to start: its saved state is unreadable, or missing where it was
    expected (see README, "State and durability"). Starting afresh would refill spent budgets."""
