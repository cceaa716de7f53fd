"""Plain, frozen descriptions of resources: what the manifest hands to the scheduling core.

Nothing here imports pydantic or Ray; the core works on these values alone.
"""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass

from ray_quota._errors import InvalidAmountError, ProtocolError

MAX_UNITS = 2**53  # amounts above this lose integer precision in the float arithmetic of rates
# The longest name of an environment or resource, unit or token label: labels become metric
# label values, and one rule keeps every name a scrape shows short.
MAX_NAME = 64
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
class FeedbackSpec:
    """How a resource's effective limit learns from the provider's refusals (DESIGN 8); the
    controller is :class:`ray_quota._core.feedback.Feedback`.

    Attributes:
        decrease: a refusal multiplies the effective limit by this (0 < decrease < 1).
        increase: after each quiet interval the effective limit grows by this fraction of the
            manifest's limit (0 < increase <= 1), never above the manifest's limit.
        interval_s: the quiet interval in seconds; None: the rate's period (1 s for the others).
        floor: the lowest effective limit, as a fraction of the manifest's (0.0001 to 1).
        margin: probing slows down this fraction below the limit where the last refusal came
            (0 <= margin < 1): one increase per interval there, then at the full step.
    """

    decrease: float = 0.7
    increase: float = 0.01
    interval_s: float | None = None
    floor: float = 0.05
    margin: float = 0.05


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
    # Units one commit may exceed its reservation by; None: the ceiling (see overuse_cap).
    max_overuse: int | None = None
    feedback: FeedbackSpec = FeedbackSpec()

    @property
    def refill_per_s(self) -> float:
        """Units added per second (rate resources); zero for the others."""
        return self.value / self.period_s if self.kind is Kind.RATE else 0.0

    @property
    def ceiling(self) -> int:
        """The largest single reservation the pool can ever grant."""
        return self.burst if self.kind is Kind.RATE else self.value

    @property
    def overuse_cap(self) -> int:
        """The most units one commit may exceed its reservation by, and so the most debt one
        commit charges: ``max_overuse``, by default the burst for rate, the limit otherwise."""
        return self.ceiling if self.max_overuse is None else self.max_overuse


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


def check_seconds(what: str, value: object) -> float:
    """A finite number of seconds from 0 (not a bool), as a float.

    Raises:
        InvalidAmountError: naming ``what`` and the value.
    """
    try:
        seconds = -1.0 if isinstance(value, bool) else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):  # not a number, or beyond a float
        seconds = -1.0
    if not isinstance(value, numbers.Real) or not math.isfinite(seconds) or seconds < 0:
        raise InvalidAmountError(f"{what} must be a finite number of seconds from 0, "
                                 f"not {_short(value)}")
    return seconds


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_name(what: str, value: object) -> str:
    """A string of 1 to :data:`MAX_NAME` characters.

    Raises:
        ProtocolError: not a string. InvalidAmountError: empty or too long.
    """
    if not isinstance(value, str):
        raise ProtocolError(f"{what} must be a str, not {type(value).__name__}")
    if not 1 <= len(value) <= MAX_NAME:
        raise InvalidAmountError(f"{what} must be 1 to {MAX_NAME} characters long, "
                                 f"not {len(value)}")
    return value


def check_spec(value: object, what: str = "spec") -> ResourceSpec:
    """A :class:`ResourceSpec` whose fields hold what the manifest allows, checked field by
    field: a spec that arrives in a message (``set_limit``) is untrusted.

    Raises:
        ProtocolError: not a ResourceSpec, or a field of the wrong type.
        InvalidAmountError: a value out of range (a limit from 1, a finite period above 0).
    """
    if not isinstance(value, ResourceSpec):
        raise ProtocolError(f"{what} must be a ResourceSpec, not {type(value).__name__}")
    check_name(f"{what}.name", value.name)
    for field, kind in (("kind", Kind), ("enforcement", Enforcement)):
        if not isinstance(getattr(value, field), kind):
            raise ProtocolError(f"{what}.{field} must be a {kind.__name__}, "
                                f"not {getattr(value, field)!r}")
    check_units(f"{what}.value", value.value)
    if value.kind is Kind.RATE:
        if check_seconds(f"{what}.period_s", value.period_s) == 0:
            raise InvalidAmountError(f"{what}.period_s must be greater than zero")
        check_units(f"{what}.burst", value.burst)
    elif not (_is_zero(value.period_s) and _is_zero(value.burst)):
        raise InvalidAmountError(f"{what}: only a rate has a period and a burst")
    check_name(f"{what}.unit", value.unit)
    if value.wait_limit_s is not None:
        check_seconds(f"{what}.wait_limit_s", value.wait_limit_s)
    if value.max_overuse is not None:
        check_units(f"{what}.max_overuse", value.max_overuse)
    check_feedback(value.feedback, f"{what}.feedback")
    return value


MIN_FLOOR = 1e-4  # the lowest feedback floor (see _FEEDBACK_RANGES)
# Each FeedbackSpec field: (lowest, highest, whether the lowest itself is allowed).
_FEEDBACK_RANGES = {"decrease": (0.0, 1.0, False), "increase": (0.0, 1.0, False),
                    # A floor near 0 would scale a slow rate's refill to nothing (a division
                    # by zero in the wait estimate): one part in ten thousand is the least.
                    "floor": (MIN_FLOOR, 1.0, True), "margin": (0.0, 1.0, True)}


def check_feedback(value: object, what: str = "feedback") -> FeedbackSpec:
    """A :class:`FeedbackSpec` whose fields are in range: ``decrease`` above 0 and below 1,
    ``increase`` above 0 up to 1, ``floor`` from 0.0001 up to 1, ``margin`` from 0 below 1, ``interval_s``
    None or a finite number of seconds above 0.

    Raises:
        ProtocolError: not a FeedbackSpec. InvalidAmountError: a field out of range.
    """
    if not isinstance(value, FeedbackSpec):
        raise ProtocolError(f"{what} must be a FeedbackSpec, not {type(value).__name__}")
    for field, (low, high, low_ok) in _FEEDBACK_RANGES.items():
        number = getattr(value, field)
        top_ok = field in ("increase", "floor")
        real = isinstance(number, numbers.Real) and not isinstance(number, bool)
        x = float(number) if real else math.nan
        ok = (math.isfinite(x) and (low <= x if low_ok else low < x)
              and (x <= high if top_ok else x < high))
        if not ok:
            rule = (f"{'from' if low_ok else 'above'} {low:g} "
                    f"{'up to' if top_ok else 'below'} {high:g}")
            raise InvalidAmountError(f"{what}.{field} must be a number {rule}, "
                                     f"not {_short(number)}")
    if value.interval_s is not None and check_seconds(f"{what}.interval_s",
                                                      value.interval_s) == 0:
        raise InvalidAmountError(f"{what}.interval_s must be greater than zero")
    return value


def _is_zero(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and value == 0
