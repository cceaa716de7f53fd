"""Effective limits that learn from the provider (DESIGN 8): a pure controller on a passed-in clock.

A manifest's limit is a guess; the provider's real limit is lower when other consumers share its
key, and it says so with refusals (HTTP 429 and a ``Retry-After``). :class:`Feedback` keeps one
resource's *effective* limit, which the scheduler grants against:

- it starts at the manifest's limit and never goes above it, nor below ``floor`` of it;
- a refusal multiplies it by ``decrease`` and holds grants until the retry-after has passed.
  Refusals that come within half an interval of a cut are of requests sent before it: they
  extend the hold and restart the quiet time, but do not cut again;
- after each quiet interval with no refusal it grows back: quickly (half the gap at a time) up
  to ``margin`` below the limit where the last refusal came, then by ``increase`` of the
  manifest's limit per interval, probing for more, as TCP's congestion control does;
- a report of what the provider says remains (``remaining`` units until ``reset_s``) caps what
  may be granted now, and holds grants until the reset when nothing remains; little left (under
  ``decrease`` of the effective limit) and less than last said backs the limit off by
  ``margin`` before the provider refuses: with a provider's window as long as the period, this
  keeps the limit within a few per cent of the provider's, with no refusal at all once found.

Its parameters are a :class:`~ray_quota._spec.FeedbackSpec`, set per resource in the manifest.
"""

from __future__ import annotations

import math

from ray_quota._core.protocol import MAX_HOLD_S
from ray_quota._errors import InvalidAmountError
from ray_quota._spec import FeedbackSpec, Kind, ResourceSpec, check_seconds, check_units

# A provider's retry-after or reset longer than this is not believed (a day): a typo or a hostile
# report must not stop a resource for ever.


class Feedback:
    """One resource's effective limit, lowered by refusals and probed back up while none come.

    Example:
        >>> ctl = Feedback(FeedbackSpec(), ceiling=1000, interval_s=60.0, now=0.0)
        >>> ctl.refused(1.0, retry_after_s=2.0)
        >>> ctl.limit, ctl.hold_until
        (700.0, 3.0)
        >>> ctl.tick(61.0), ctl.limit    # a quiet interval later: half-way back towards 950
        (True, 825.0)
    """

    __slots__ = (
        "_cut_at",
        "_known",
        "_quiet_from",
        "_refusal_cut_at",
        "_remaining",
        "_stepped_at",
        "ceiling",
        "hold_until",
        "interval_s",
        "limit",
        "params",
    )

    def __init__(self, params: FeedbackSpec, ceiling: int, interval_s: float,
                 now: float) -> None:
        self.params = params
        self.ceiling = float(ceiling)  # the manifest's limit
        self.interval_s = interval_s
        self.limit = float(ceiling)  # the effective limit
        self.hold_until = -math.inf  # no grants before this
        self._known: float | None = None  # the effective limit when the last cut came
        self._cut_at = -math.inf  # the last cut
        self._refusal_cut_at = -math.inf  # the last cut that answered a refusal
        self._quiet_from = now  # the last refusal (or the start)
        self._stepped_at = now
        self._remaining: int | None = None  # what the provider last said remains

    @property
    def scale(self) -> float:
        """The effective limit as a fraction of the manifest's, in (0, 1]."""
        return self.limit / self.ceiling

    def refused(self, now: float, retry_after_s: float | None = None) -> None:
        """The provider refused a request at ``now``; it may say when to try again.

        Raises:
            InvalidAmountError: ``retry_after_s`` is not None or a finite number of seconds
                from 0 (nothing changes).
        """
        hold = _hold("retry_after_s", retry_after_s)
        if hold is not None:
            self.hold_until = max(self.hold_until, now + hold)
        self._quiet_from = now
        if now < self._refusal_cut_at + self.interval_s / 2:
            return  # a request sent before the last cut: the cut already answered it
        self._cut(now, self.params.decrease)
        self._refusal_cut_at = now  # (a back-off on what remains does not answer a refusal)

    def _cut(self, now: float, factor: float) -> None:
        self._known = self.limit
        self.limit = max(self.params.floor * self.ceiling, self.limit * factor)
        self._cut_at = now

    def remaining(self, now: float, units: int, reset_s: float | None = None) -> float:
        """The provider says ``units`` remain until its window resets in ``reset_s``: returns
        the most units that may be granted now (the caller caps its pool there). With nothing
        left, grants are held until the reset; with little left (less than ``decrease`` of
        the effective limit) and less than last said, the limit backs off by ``margin``, at
        most once per half interval, before the provider starts refusing.

        Raises:
            InvalidAmountError: ``units`` is not a whole number from 0, or ``reset_s`` not None
                or a finite number of seconds from 0 (nothing changes).
        """
        check_units("remaining", units, allow_zero=True)
        reset = _hold("reset_s", reset_s)
        if units == 0 and reset is not None:
            self.hold_until = max(self.hold_until, now + reset)
        falling = self._remaining is not None and units < self._remaining
        self._remaining = units
        if falling and units < self.limit * self.params.decrease:
            # Most of the provider's window is spent and less is left than last time: at this
            # limit it will soon refuse. Back off by the margin (once per half interval)
            # before it does. (Little left but more than before is a window refilling after
            # a refusal: the cut that answered it is enough.)
            self._quiet_from = now
            # Not within an interval of a refusal's cut either: the window still drains of
            # what was sent before it.
            if now >= max(self._cut_at + self.interval_s / 2,
                          self._refusal_cut_at + self.interval_s):
                self._cut(now, 1 - self.params.margin)
        return float(units)

    def tick(self, now: float) -> bool:
        """Grow the effective limit by one step if an interval passed with no refusal and
        since the last step; returns whether it changed."""
        if (now - self._quiet_from < self.interval_s or now - self._stepped_at < self.interval_s
                or self.limit >= self.ceiling):
            return False
        self._stepped_at = now
        step = self.params.increase * self.ceiling
        safe = self.ceiling if self._known is None else self._known * (1 - self.params.margin)
        if self.limit < safe:
            self.limit = min(safe, self.limit + max(step, (safe - self.limit) / 2))
        else:
            self.limit += step
        self.limit = min(self.ceiling, self.limit)
        return True

    def next_tick(self, now: float) -> float | None:
        """When :meth:`tick` may next change the limit, or None while it is at the ceiling."""
        if self.limit >= self.ceiling:
            return None
        return max(now, self._quiet_from + self.interval_s, self._stepped_at + self.interval_s)


def _hold(what: str, value: float | None) -> float | None:
    if value is None:
        return None
    seconds = check_seconds(what, value)
    if seconds > MAX_HOLD_S:
        raise InvalidAmountError(f"{what} must be at most {MAX_HOLD_S:g} seconds, not {seconds}")
    return seconds


def controller_for(spec: ResourceSpec, now: float) -> Feedback | None:
    """The controller of a rate resource's effective limit; None for capacity (a budget does
    not refill, so there is no rate to learn) and concurrency (slots are not refused by a
    provider's window)."""
    if spec.kind is not Kind.RATE:
        return None
    params = spec.feedback
    interval = spec.period_s if params.interval_s is None else params.interval_s
    return Feedback(params, spec.value, interval, now)
