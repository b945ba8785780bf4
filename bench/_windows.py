"""Deliveries counted in windows of time, for the ``limited`` scenario: the busiest window
anywhere in a run (what a rate limit bounds), and the counts of consecutive whole windows
(whose median is the steady rate, the first burst aside). Windows are half-open,
``[start, start + width)``; every function assumes ``times`` sorted."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def busiest(times: Sequence[float], width: float) -> int:
    """The most of ``times`` that any one window of ``width`` holds."""
    best = start = 0
    for end, time in enumerate(times):
        while time - times[start] >= width:
            start += 1
        best = max(best, end - start + 1)
    return best


def whole_windows(times: Sequence[float], width: float) -> list[int]:
    """How many of ``times`` fall in each window of ``width`` laid end to end from the
    first of them; the last window, cut short by the end of the run, is left out."""
    if not times:
        return []
    first = times[0]
    counts = [0] * int((times[-1] - first) / width)
    for time in times:
        index = int((time - first) / width)
        if index < len(counts):
            counts[index] += 1
    return counts


def median_rate(times: Sequence[float], width: float) -> float | None:
    """The median count of the whole windows, per second (None: not one whole window)."""
    counts = whole_windows(times, width)
    return statistics.median(counts) / width if counts else None
