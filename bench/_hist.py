"""A small log-bucketed latency histogram in the style of HdrHistogram.

Values are non-negative integers (the bench records microseconds). Values below
``2**bits`` get a bucket each; above that, every power of two is split into ``2**(bits-1)``
equal buckets, so a bucket is never wider than ``2**(1-bits)`` of the values in it. With
the default 3 significant digits that is 1/1024: a percentile read back is within 0.1% of
the value recorded. Memory grows with the number of distinct buckets hit (a few thousand
at most), not with the number of samples, and two histograms with the same precision merge
by adding their counts, so each process records its own and the parent adds them up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def _bits_for(significant_digits: int) -> int:
    """The smallest ``bits`` whose bucket width 2**(1-bits) is under 10**-digits."""
    if not 1 <= significant_digits <= 5:
        raise ValueError(f"significant_digits must be 1..5, got {significant_digits}")
    return math.ceil(math.log2(2 * 10**significant_digits))


@dataclass(slots=True)
class Histogram:
    """Counts of values in log-spaced buckets; exact count, min, max and sum."""

    significant_digits: int = 3
    counts: dict[int, int] = field(default_factory=dict)
    count: int = 0
    total: int = 0
    min: int = 0
    max: int = 0
    _bits: int = field(init=False, repr=False)
    _half: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._bits = _bits_for(self.significant_digits)
        self._half = 1 << (self._bits - 1)

    def record(self, value: int) -> None:
        """Count one sample; negative values (clock noise) count as 0."""
        value = max(value, 0)
        shift = max(value.bit_length() - self._bits, 0)
        index = shift * self._half + (value >> shift)
        self.counts[index] = self.counts.get(index, 0) + 1
        if self.count == 0 or value < self.min:
            self.min = value
        self.max = max(self.max, value)
        self.count += 1
        self.total += value

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s samples to this one. Both must have the same precision."""
        if other.significant_digits != self.significant_digits:
            raise ValueError("cannot merge histograms of different precision")
        if other.count == 0:
            return
        for index, n in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + n
        self.min = other.min if self.count == 0 else min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count
        self.total += other.total

    def bucket_bounds(self, index: int) -> tuple[int, int]:
        """The lowest and highest value that land in bucket ``index``."""
        shift = max(index // self._half - 1, 0)
        lowest = (index - shift * self._half) << shift
        return lowest, lowest + (1 << shift) - 1

    def percentile(self, percent: float) -> int:
        """The value at or below which ``percent`` of the samples lie (0 if empty).

        Reports the highest value of the bucket holding that sample, clamped to the
        recorded min and max, so ``percentile(100)`` is the exact maximum."""
        if not 0 <= percent <= 100:
            raise ValueError(f"percent must be 0..100, got {percent}")
        if self.count == 0:
            return 0
        # Rounded first, so that float noise (99.9% of 1000 = 999.0000000000001) does not
        # move the rank up by one.
        rank = max(1, math.ceil(round(percent * self.count / 100, 9)))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return min(max(self.bucket_bounds(index)[1], self.min), self.max)
        return self.max

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def summary(self, scale: float = 1.0) -> dict[str, Any]:
        """count, mean, min, p50/p90/p99/p99.9 and max, each value divided by ``scale``."""
        figures: dict[str, Any] = {"count": self.count}
        figures["mean"] = self.mean / scale
        figures["min"] = self.min / scale
        for percent in PERCENTILES:
            figures[f"p{percent:g}"] = self.percentile(percent) / scale
        figures["max"] = self.max / scale
        return figures
