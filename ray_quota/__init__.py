"""ray_quota: fair, unforgeable quota tokens for the outside resources Ray tasks share.

Example:
    >>> import ray_quota
    >>> ray_quota.init(manifest="examples/quota.yaml", environment="local")
    >>> token = ray_quota.QuotaToken("llm-tokens", expected_use=1000)
    >>> with token.reserve(500) as reservation:
    ...     reservation.commit(312)

Public names are resolved on first use, so importing a pure part of the package (the scheduling
core, the manifest) loads neither Ray nor anything else it does not need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Each public name, and the private module that defines it.
_WHERE = {
    "AccessDeniedError": "_errors",
    "Enforcement": "_spec",
    "ExecutorInfo": "_core.protocol",
    "FailedReservation": "_errors",
    "ForgedTokenError": "_errors",
    "IncompatibleTokensError": "_errors",
    "InvalidAmountError": "_errors",
    "Kind": "_spec",
    "Manifest": "_manifest",
    "ManifestError": "_errors",
    "NotInitializedError": "_errors",
    "Policy": "_core.scheduler",
    "QuotaError": "_errors",
    "QuotaExecutor": "_pool",
    "QuotaTerminated": "_errors",
    "QuotaToken": "_token",
    "Reservation": "_token",
    "ResourceSpec": "_spec",
    "ResourceStatus": "_core.scheduler",
    "StateMissingError": "_errors",
    "StateWriteError": "_errors",
    "TokenClosedError": "_errors",
    "TokenMovedError": "_errors",
    "TokenStateError": "_errors",
    "UnknownResourceError": "_errors",
    "apply": "_api",
    "current_token": "_context",
    "info": "_api",
    "init": "_api",
    "load_manifest": "_manifest",
    "metrics_address": "_api",
    "quota": "_decorate",
    "reset": "_api",
    "set_limit": "_api",
    "shutdown": "_api",
    "status": "_api",
    "with_reservation": "_token",
    "with_reservation_async": "_token",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'ray_quota' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ray_quota.{module}"), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from ray_quota._api import (
        apply,
        info,
        init,
        metrics_address,
        reset,
        set_limit,
        shutdown,
        status,
    )
    from ray_quota._context import current_token
    from ray_quota._core.protocol import ExecutorInfo
    from ray_quota._core.scheduler import Policy, ResourceStatus
    from ray_quota._decorate import quota
    from ray_quota._errors import (
        AccessDeniedError,
        FailedReservation,
        ForgedTokenError,
        IncompatibleTokensError,
        InvalidAmountError,
        ManifestError,
        NotInitializedError,
        QuotaError,
        QuotaTerminated,
        StateMissingError,
        StateWriteError,
        TokenClosedError,
        TokenMovedError,
        TokenStateError,
        UnknownResourceError,
    )
    from ray_quota._manifest import Manifest, load_manifest
    from ray_quota._pool import QuotaExecutor
    from ray_quota._spec import Enforcement, Kind, ResourceSpec
    from ray_quota._token import QuotaToken, Reservation, with_reservation, with_reservation_async
