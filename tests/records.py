"""Independent records of what was granted, and the checks the safety tests run on them.

Workers record each reservation themselves; these checks never read the executor's counters.
"""

from __future__ import annotations

from collections.abc import Iterable


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


def max_overlap(intervals: Iterable[tuple[float, float, int]]) -> int:
    """The most units held at once, from (start, end, units) intervals."""
    edges = []
    for start, end, units in intervals:
        edges.append((start, 1, units))
        edges.append((end, 0, -units))  # at equal times, releases count first
    held = peak = 0
    for _, _, delta in sorted(edges):
        held += delta
        peak = max(peak, held)
    return peak


def jain(values: Iterable[float]) -> float:
    """Jain's fairness index: 1.0 when all values are equal."""
    xs = list(values)
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))
