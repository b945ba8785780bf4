"""A fixed-bucket histogram kept as plain data, cheap enough for the hot path.

The broker observes into these as it works (a ``bisect`` and two additions per value) and
the metrics collector reads them at scrape time. Nothing here knows about Prometheus, so
the pure core can keep one per queue.
"""

from __future__ import annotations

import functools
from bisect import bisect_left
from collections.abc import Sequence
from typing import Final

# Upper bounds, in the unit the histogram observes. Each histogram also has a last bucket
# for everything above its highest bound.
REQUEST_SECONDS: Final = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
COMMIT_SECONDS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
BATCH_RECORDS: Final = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
PROCESSING_SECONDS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0,
)  # fmt: skip


class Histogram:
    """Counts of observed values per bucket, and their sum.

    ``counts[i]`` counts values ``v`` with ``bounds[i-1] < v <= bounds[i]`` (inclusive
    upper bounds, as Prometheus's ``le``); ``counts[-1]`` counts values above every bound."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = _checked(tuple(bounds))
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def empty(self) -> Histogram:
        """A new histogram with these bounds and nothing observed (the bounds are not
        checked again: a queue makes one each time it is made)."""
        fresh = Histogram.__new__(Histogram)
        fresh.bounds = self.bounds
        fresh.counts = [0] * len(self.counts)
        fresh.sum = 0.0
        return fresh

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        """How many values were observed."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, values at or below it)`` for each bound, then ``(inf, count)``."""
        pairs = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            pairs.append((float(bound), running))
        return pairs


@functools.cache
def _checked(bounds: tuple[float, ...]) -> tuple[float, ...]:
    """``bounds``, if distinct and ascending; checked once per set of bounds, as a queue
    makes a histogram each time it is made (for a lone worker, after each ack)."""
    if list(bounds) != sorted(set(bounds)) or not bounds:
        raise ValueError(f"bounds must be distinct and ascending, got {bounds!r}")
    return bounds
