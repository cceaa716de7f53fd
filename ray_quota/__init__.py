"""ray_quota: fair, unforgeable quota tokens for the outside resources Ray tasks share.

Example:
    >>> import ray_quota
    >>> ray_quota.init(manifest="examples/quota.yaml", environment="local")
    >>> token = ray_quota.QuotaToken("llm-tokens", expected_use=1000)
    >>> with token.reserve(500) as reservation:
    ...     reservation.commit(312)
"""

from ray_quota._api import apply, info, init, metrics_address, set_limit, shutdown, status
from ray_quota._context import current_token
from ray_quota._decorate import QuotaExecutor, quota
from ray_quota._errors import (
    FailedReservation,
    ForgedTokenError,
    IncompatibleTokensError,
    InvalidAmountError,
    ManifestError,
    NotInitializedError,
    QuotaError,
    QuotaTerminated,
    TokenClosedError,
    TokenMovedError,
    TokenStateError,
    UnknownResourceError,
)
from ray_quota._executor import ExecutorInfo
from ray_quota._manifest import Manifest, load_manifest
from ray_quota._scheduler import Policy, ResourceStatus
from ray_quota._spec import Enforcement, Kind, ResourceSpec
from ray_quota._token import QuotaToken, Reservation, with_reservation, with_reservation_async

__all__ = [
    "Enforcement",
    "ExecutorInfo",
    "FailedReservation",
    "ForgedTokenError",
    "IncompatibleTokensError",
    "InvalidAmountError",
    "Kind",
    "Manifest",
    "ManifestError",
    "NotInitializedError",
    "Policy",
    "QuotaError",
    "QuotaExecutor",
    "QuotaTerminated",
    "QuotaToken",
    "Reservation",
    "ResourceSpec",
    "ResourceStatus",
    "TokenClosedError",
    "TokenMovedError",
    "TokenStateError",
    "UnknownResourceError",
    "apply",
    "current_token",
    "info",
    "init",
    "load_manifest",
    "metrics_address",
    "quota",
    "set_limit",
    "shutdown",
    "status",
    "with_reservation",
    "with_reservation_async",
]
