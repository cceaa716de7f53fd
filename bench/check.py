"""Independent checks on what workers recorded; they never read a limiter's own counters.

Every grant is recorded by the worker that got it as an interval ``(sent, received, units)``: the
limiter granted it at some unknown instant inside that interval. A window ``[t1, t2]`` is only
charged with the grants that certainly fell inside it (``t1 <= sent`` and ``received <= t2``), so a
positive excess here is proof of over-admission, never an artefact of delivery delays.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence

Span = tuple[float, float, float]  # sent, received, units


def max_rate_excess(spans: Iterable[Span], rate_per_s: float) -> float:
    """The largest ``units certainly granted in [t1, t2] - rate * (t2 - t1)`` over all windows.

    A token bucket of rate ``rate_per_s`` and burst ``B`` is safe when the result is at most ``B``.
    With ``sent == received`` this is the classic point check (tests/records.py); here it runs in
    O(n log n) with a segment tree: sweep ``t2`` over receive times, and for every candidate ``t1``
    (a send time) keep ``units certainly inside + rate * t1``.
    """
    events = sorted(spans, key=lambda s: s[1])
    if not events:
        return 0.0
    starts = sorted({s for s, _, _ in events})
    size = 1
    while size < len(starts):
        size *= 2
    height = size.bit_length() - 1
    neg = -math.inf
    # tree[p]: max of the leaves below p, including the adds pending at p and below;
    # pending[p]: an add not yet pushed to p's children (internal nodes only).
    tree = [neg] * (2 * size)
    pending = [0.0] * size
    for i, s in enumerate(starts):
        tree[size + i] = rate_per_s * s
    for p in range(size - 1, 0, -1):
        tree[p] = max(tree[2 * p], tree[2 * p + 1])

    def apply(p: int, units: float) -> None:
        tree[p] += units
        if p < size:
            pending[p] += units

    def rebuild(p: int) -> None:
        while p > 1:
            p >>= 1
            tree[p] = max(tree[2 * p], tree[2 * p + 1]) + pending[p]

    def push(p: int) -> None:
        for shift in range(height, 0, -1):
            i = p >> shift
            if pending[i]:
                apply(2 * i, pending[i])
                apply(2 * i + 1, pending[i])
                pending[i] = 0.0

    def prefix_add(last: int, units: float) -> None:
        lo, hi = size, size + last + 1
        while lo < hi:
            if lo & 1:
                apply(lo, units)
                lo += 1
            if hi & 1:
                hi -= 1
                apply(hi, units)
            lo >>= 1
            hi >>= 1
        rebuild(size)
        rebuild(size + last)

    def prefix_max(last: int) -> float:
        lo, hi = size, size + last + 1
        push(lo)
        push(hi - 1)
        result = neg
        while lo < hi:
            if lo & 1:
                result = max(result, tree[lo])
                lo += 1
            if hi & 1:
                hi -= 1
                result = max(result, tree[hi])
            lo >>= 1
            hi >>= 1
        return result

    worst = neg
    for sent, received, units in events:
        prefix_add(bisect.bisect_right(starts, sent) - 1, units)
        last = bisect.bisect_right(starts, received) - 1
        worst = max(worst, prefix_max(last) - rate_per_s * received)
    return worst


def max_overlap(holds: Iterable[tuple[float, float, int]]) -> int:
    """The most units certainly held at once, from (start, end, units) intervals."""
    edges = []
    for start, end, units in holds:
        if end > start:
            edges.append((start, 1, units))
            edges.append((end, 0, -units))  # at equal times, releases count first
    held = peak = 0
    for _, _, delta in sorted(edges):
        held += delta
        peak = max(peak, held)
    return peak


def busy_fraction(holds: Iterable[tuple[float, float, int]], slots: int, start: float,
                  end: float) -> float:
    """Slot-seconds certainly in use inside [start, end], over slots x (end - start)."""
    used = sum(max(0.0, min(e, end) - max(s, start)) * units for s, e, units in holds)
    return used / (slots * (end - start)) if end > start else 0.0


def jain(values: Iterable[float]) -> float:
    """Jain's fairness index: 1.0 when all values are equal."""
    xs = list(values)
    total_sq = sum(x * x for x in xs)
    return sum(xs) ** 2 / (len(xs) * total_sq) if total_sq else 0.0


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, nearest rank; nan when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]
