"""A binary heap with lazy deletion.

Entries are tuples whose last two items are ``(seq, message_id)``; everything before them
is the sort key. Removing an entry is O(1): the owner makes it stale (the message moved on,
so ``is_live(entry)`` turns false) and calls ``discard()``. Stale entries are skipped when
they reach the top, and the heap is rebuilt when they outnumber live ones, so memory stays
proportional to live entries and every operation is O(log n) amortised.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

Entry = tuple[Any, ...]

_COMPACT_MIN = 1024


class LazyHeap:
    __slots__ = ("_entries", "_is_live", "_stale")

    def __init__(self, is_live: Callable[[Entry], bool]) -> None:
        self._entries: list[Entry] = []
        self._is_live = is_live
        self._stale = 0

    def __len__(self) -> int:
        """Live entries (exact as long as every staled entry was ``discard``-ed once)."""
        return len(self._entries) - self._stale

    def push(self, entry: Entry) -> None:
        heapq.heappush(self._entries, entry)

    def load(self, entries: list[Entry]) -> None:
        """Add many entries at once (recovery): O(n) instead of n pushes."""
        self._entries.extend(entries)
        heapq.heapify(self._entries)

    def peek(self) -> Entry | None:
        """The smallest live entry, or None. Drops stale entries found on top."""
        entries = self._entries
        while entries:
            top = entries[0]
            if self._is_live(top):
                return top
            heapq.heappop(entries)
            self._stale = max(0, self._stale - 1)
        return None

    def pop(self) -> Entry | None:
        top = self.peek()
        if top is not None:
            heapq.heappop(self._entries)
        return top

    def discard(self) -> None:
        """Note that one entry went stale; compact when stale ones dominate."""
        self._stale += 1
        if self._stale > _COMPACT_MIN and self._stale * 2 > len(self._entries):
            self.compact()

    def compact(self) -> None:
        self._entries = self.live_entries()
        heapq.heapify(self._entries)
        self._stale = 0

    def live_entries(self) -> list[Entry]:
        """Every live entry, in no particular order. O(n): never on the hot path."""
        return [entry for entry in self._entries if self._is_live(entry)]
