"""Plain, frozen descriptions of resources: what the manifest hands to the scheduling core.

Nothing here imports pydantic or Ray; the core works on these values alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ray_quota._errors import InvalidAmountError

MAX_UNITS = 2**53  # amounts above this lose integer precision in the float arithmetic of rates
# The words a manifest may use for a rate's period, in seconds.
PERIOD_WORDS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}


class Kind(str, enum.Enum):
    """How a resource's units come back."""

    RATE = "rate"  # refills continuously, `value` units per `period_s`, holding at most `burst`
    CAPACITY = "capacity"  # a budget that never refills
    CONCURRENCY = "concurrency"  # slots held while a reservation is open


class Enforcement(str, enum.Enum):
    """What happens when a reservation cannot be granted within the wait limit."""

    REJECT = "reject"
    THROTTLE = "throttle"
    TERMINATE = "terminate"


@dataclass(frozen=True, slots=True)
class ResourceSpec:
    """One resource of one environment, already validated.

    Example:
        >>> spec = ResourceSpec("llm-tokens", Kind.RATE, value=600, period_s=60.0, burst=100)
        >>> spec.refill_per_s
        10.0
    """

    name: str
    kind: Kind
    value: int
    period_s: float = 0.0  # rate only
    burst: int = 0  # rate only; the most the pool holds
    enforcement: Enforcement = Enforcement.THROTTLE
    unit: str = "unit"
    wait_limit_s: float | None = None  # None: for ever (throttle), else only for recalled spare

    @property
    def refill_per_s(self) -> float:
        """Units added per second (rate resources); zero for the others."""
        return self.value / self.period_s if self.kind is Kind.RATE else 0.0

    @property
    def ceiling(self) -> int:
        """The largest single reservation the pool can ever grant."""
        return self.burst if self.kind is Kind.RATE else self.value


@dataclass(frozen=True, slots=True)
class Environment:
    """A named set of resources."""

    name: str
    resources: dict[str, ResourceSpec]


def check_units(what: str, value: object, *, allow_zero: bool = False) -> None:
    """Refuse anything but a whole number of units from 1 (or 0) to :data:`MAX_UNITS`.

    Raises:
        InvalidAmountError: naming ``what`` and the value.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidAmountError(f"{what} must be a whole number of units, not {value!r}")
    low = 0 if allow_zero else 1
    if not low <= value <= MAX_UNITS:
        raise InvalidAmountError(f"{what} must be from {low} to {MAX_UNITS}, not {value}")
