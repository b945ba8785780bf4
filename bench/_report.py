"""Shared by the micro-benchmarks: repeat a run and print each figure's median."""

from __future__ import annotations

import statistics
from collections.abc import Callable


def report_medians(title: str, run: Callable[[], dict[str, float]], repeat: int) -> None:
    """Call ``run`` ``repeat`` times; print the median of each figure it returns."""
    runs = [run() for _ in range(repeat)]
    print(f"{title}, median of {repeat} runs")
    width = max(len(key) for key in runs[0])
    for key in runs[0]:
        print(f"  {key:<{width}} {statistics.median(r[key] for r in runs):>12,.0f}")
