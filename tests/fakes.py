"""Test doubles shared by the core's tests: nothing here sleeps or imports Ray."""

from __future__ import annotations


class FakeClock:
    """A monotonic clock that only moves when a test moves it.

    Example:
        >>> clock = FakeClock()
        >>> clock.advance(1.5)
        >>> clock()
        1.5
    """

    __slots__ = ("now",)

    def __init__(self, start: float = 0.0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        """Move the clock forward by ``dt`` seconds (never backward)."""
        if dt < 0:
            raise ValueError(f"a monotonic clock cannot go back {dt} seconds")
        self.now += dt

    def set(self, t: float) -> None:
        """Move the clock forward to ``t``."""
        self.advance(t - self.now)
