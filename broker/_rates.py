"""Broker-wide rates (put/s, delivered/s, acked/s) for the overview, sampled only while
someone looks.

The core keeps per-queue totals and nothing broker-wide, so a sample sums them over every
queue: O(queues) once a second, yielding to the loop as it walks. Nobody pays for that
until an overview is asked for; the sampler then runs once a second and stops by itself
``IDLE_AFTER`` seconds after the last look. So the history is of the last ``HISTORY``
seconds someone was looking.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from typing import TYPE_CHECKING, Any, Final

from ._metrics import QueueTotals, deepest_queues

if TYPE_CHECKING:
    from ._server import BrokerServer

RATED: Final = ("put", "delivered", "acked")
INTERVAL: Final = 1.0  # seconds between samples
HISTORY: Final = 300  # samples kept: five minutes
IDLE_AFTER: Final = 60.0  # seconds without a look before sampling stops
RATE_WINDOW: Final = 5  # samples the current rate is averaged over


class RateSampler:
    """Samples the rated totals once a second while someone looks. Each sample walks the
    queues yielding to the loop (``deepest_queues``), so a broker of many queues is not
    held up by it."""

    def __init__(self, server: BrokerServer) -> None:
        self.server = server
        self.samples: collections.deque[tuple[float, dict[str, int]]] = collections.deque(
            maxlen=HISTORY
        )
        self._task: asyncio.Task[None] | None = None
        self._last_look = 0.0

    def look(self) -> None:
        """Someone looks: start sampling if not sampling yet, and keep sampling."""
        loop = self.server.loop
        self._last_look = loop.time()
        if self._task is None or self._task.done():
            self.samples.clear()  # a gap would read as one long, slow second
            self._task = loop.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        loop = self.server.loop
        while loop.time() - self._last_look <= IDLE_AFTER:
            totals = QueueTotals()
            await deepest_queues(self.server.core, 0, totals)
            self.samples.append((self.server.clock(), {key: totals.totals[key] for key in RATED}))
            await asyncio.sleep(INTERVAL)

    def rates(self) -> dict[str, float | None]:
        """``<total>_per_s`` over the last ``RATE_WINDOW`` samples (None: too few yet)."""
        samples = list(self.samples)[-RATE_WINDOW - 1 :]
        if len(samples) < 2:
            return {f"{key}_per_s": None for key in RATED}
        (t0, first), (t1, last) = samples[0], samples[-1]
        span = max(t1 - t0, 1e-9)
        return {f"{key}_per_s": round((last[key] - first[key]) / span, 3) for key in RATED}

    def history(self) -> list[dict[str, Any]]:
        """One point per sample after the first: its time and each rate since the one
        before."""
        points = []
        for (t0, before), (t1, after) in itertools.pairwise(self.samples):
            span = max(t1 - t0, 1e-9)
            point: dict[str, Any] = {"time": t1}
            for key in RATED:
                point[f"{key}_per_s"] = round((after[key] - before[key]) / span, 3)
            points.append(point)
        return points
