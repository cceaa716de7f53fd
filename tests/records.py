"""The checks the safety tests run on what workers recorded; they never read the executor's counters.

``jain`` and ``max_overlap`` are the benchmark's (``bench/check.py``). ``max_rate_excess`` here is
the plain point check, kept apart on purpose: ``tests/ray/test_bench.py`` checks the benchmark's
interval version against it.
"""

from __future__ import annotations

from collections.abc import Iterable

from bench.check import jain, max_overlap

__all__ = ["jain", "max_overlap", "max_rate_excess"]


def max_rate_excess(events: Iterable[tuple[float, float]], rate_per_s: float) -> float:
    """The largest ``net units in [t1, t2] - rate * (t2 - t1)`` over all windows.

    ``events`` are (time, units) pairs; safety of a token bucket means the result is at most its
    burst (plus declared debt and units leased before the window).
    """
    best = float("-inf")
    lowest_before = 0.0  # min over i of (prefix sum before event i) - rate * t_i
    total = 0.0
    for i, (t, units) in enumerate(sorted(events)):
        lowest_before = min(lowest_before, total - rate_per_s * t) if i else total - rate_per_s * t
        total += units
        best = max(best, total - rate_per_s * t - lowest_before)
    return best
