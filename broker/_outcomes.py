"""What outlives a message: its result after an ack, and its dedup key's window.

Both are plain data owned by the core (no I/O): a map plus a heap of expiry times, pruned
lazily as time passes. Each notes what changed for the store, when the core tracks changes.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any, Final

NO_RESULT: Final[Any] = object()  # an ack that carries no result


@dataclass(frozen=True, slots=True)
class StoredResult:
    queue: str
    value: Any
    done_at: float
    expires_at: float


class Results:
    """Results of acked messages, kept until ``expires_at`` (the queue's result TTL)."""

    def __init__(self, track_changes: bool) -> None:
        self.by_id: dict[int, StoredResult] = {}
        self._expiry: list[tuple[float, int]] = []
        self.changed: dict[int, StoredResult | None] | None = {} if track_changes else None

    def keep(self, message_id: int, result: StoredResult) -> None:
        self.by_id[message_id] = result
        heapq.heappush(self._expiry, (result.expires_at, message_id))
        if self.changed is not None:
            self.changed[message_id] = result

    def get(self, message_id: int, now: float) -> StoredResult | None:
        result = self.by_id.get(message_id)
        return result if result is not None and result.expires_at > now else None

    def prune(self, now: float) -> None:
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            _, message_id = heapq.heappop(expiry)
            result = self.by_id.get(message_id)
            if result is not None and result.expires_at <= now:
                del self.by_id[message_id]
                if self.changed is not None:
                    self.changed[message_id] = None


@dataclass(frozen=True, slots=True)
class DedupEntry:
    """A key's message. ``expires_at`` is None while the message is live; once it is
    acked, dead-lettered or removed, the key stays taken until ``expires_at``."""

    message_id: int
    expires_at: float | None = None
    ended_as: str | None = None  # "done", "dead" or "gone", once ended


class DedupKeys:
    """Dedup keys by ``(queue, key)``. Only ended entries are stored on their own: live
    ones are rebuilt from the messages' records."""

    def __init__(self, track_changes: bool) -> None:
        self.entries: dict[tuple[str, str], DedupEntry] = {}
        self._expiry: list[tuple[float, str, str]] = []
        self.changed: dict[tuple[str, str], DedupEntry | None] | None = (
            {} if track_changes else None
        )

    def find(self, queue: str, key: str, now: float) -> int | None:
        """The id that a put with this key duplicates, if any."""
        entry = self.entries.get((queue, key))
        if entry is None or (entry.expires_at is not None and entry.expires_at <= now):
            return None
        return entry.message_id

    def live(self, queue: str, key: str, message_id: int) -> None:
        previous = self.entries.get((queue, key))
        self.entries[(queue, key)] = DedupEntry(message_id)
        if previous is not None and previous.expires_at is not None:
            self._note((queue, key), None)  # no longer stored on its own

    def ended(
        self, queue: str, key: str, message_id: int, now: float, window: float, ended_as: str
    ) -> None:
        """The message left the queue (``ended_as`` done, dead or gone): keep its key taken
        for ``window`` seconds."""
        entry = self.entries.get((queue, key))
        if entry is None or entry.message_id != message_id:
            return  # the key belongs to another message by now
        if window <= 0:
            del self.entries[(queue, key)]
            return
        ended = DedupEntry(message_id, now + window, ended_as)
        self.entries[(queue, key)] = ended
        heapq.heappush(self._expiry, (now + window, queue, key))
        self._note((queue, key), ended)

    def restore(self, queue: str, key: str, entry: DedupEntry) -> None:
        self.entries[(queue, key)] = entry
        if entry.expires_at is not None:
            heapq.heappush(self._expiry, (entry.expires_at, queue, key))

    def prune(self, now: float) -> None:
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            _, queue, key = heapq.heappop(expiry)
            entry = self.entries.get((queue, key))
            if entry is not None and entry.expires_at is not None and entry.expires_at <= now:
                del self.entries[(queue, key)]
                self._note((queue, key), None)

    def _note(self, where: tuple[str, str], entry: DedupEntry | None) -> None:
        if self.changed is not None:
            self.changed[where] = entry
