"""Where a ready message stands in its queue: how many ready messages go before it, in
O(log n), and about how long until it is delivered.

A queue's ready heap cannot count what is ahead of a message without a scan, so the first
``status`` of one of its ready messages builds a ``ReadyRanks`` for that queue: its ready
messages' delivery keys in a sorted list (O(ready log ready), once). From then on the core
keeps it in step, O(log n) each time a message of that queue becomes ready or stops being
ready; queues nobody asks about cost nothing.

The delivery key orders as the ready FIFOs do (higher priority first, then the one ready
first, then the lower id: one put's messages share a seq), packed in one int:
``(PRIORITY_MAX - priority) << 128 | seq << 64 | id``.

The estimate (``eta_s``) comes from the queue's deliveries between the asks of the last
``RATE_WINDOW`` seconds; absent until two asks at least ``MIN_SPAN`` apart have seen
deliveries.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Any, Final

from sortedcontainers import SortedList

PRIORITY_MAX: Final = 2**31 - 1
RATE_WINDOW: Final = 60.0  # seconds of deliveries the rate is measured over
SAMPLE_EVERY: Final = 1.0  # seconds: asks closer together than this share a sample
MIN_SPAN: Final = 1.0  # seconds of deliveries needed before an estimate


def delivery_key(priority: int, seq: int, message_id: int) -> int:
    return (PRIORITY_MAX - priority) << 128 | seq << 64 | message_id


class ReadyRanks:
    __slots__ = ("_keys", "_samples")

    def __init__(self, keys: Iterable[int]) -> None:
        self._keys = SortedList(keys)
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, priority: int, seq: int, message_id: int) -> None:
        self._keys.add(delivery_key(priority, seq, message_id))

    def remove(self, priority: int, seq: int, message_id: int) -> None:
        self._keys.discard(delivery_key(priority, seq, message_id))

    def place(
        self, priority: int, seq: int, message_id: int, now: float, delivered: int
    ) -> dict[str, Any]:
        """``position`` of the ready message with this key (how many ready messages of
        its queue come before it), and ``eta_s`` when known; ``delivered`` is the
        queue's delivery total so far."""
        position = self._keys.bisect_left(delivery_key(priority, seq, message_id))
        place: dict[str, Any] = {"position": position}
        rate = self._delivery_rate(now, delivered)
        if rate is not None:
            place["eta_s"] = round((position + 1) / rate, 3)
        return place

    def _delivery_rate(self, now: float, delivered: int) -> float | None:
        """Deliveries per second since the oldest sample of the window (None: unknown)."""
        samples = self._samples
        if not samples or now - samples[-1][0] >= SAMPLE_EVERY:
            samples.append((now, delivered))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW:
            samples.popleft()
        since, before = samples[0]
        span = now - since
        if span < MIN_SPAN or delivered <= before:
            return None
        return (delivered - before) / span
