"""Job events: every lifecycle change, numbered broker-wide, kept in a bounded ring.

The core records each change as it makes it (``EventRing.emit``): one tuple appended to
a ``deque`` with a fixed length, so with nobody subscribed an event costs a tuple and
nothing else, and the ring never holds more than its capacity (the oldest fall out).
Nothing is encoded until a subscriber wants the event (``payload``).

An event of a message goes on channel ``queue.<queue>.<event>`` (``queue.orders.acked``);
the admin events (``ADMIN_EVENTS``) go on ``queue.<queue>.admin``. Channels whose first
token is ``queue`` are the broker's: nobody may publish on them.

``seq`` increases by one per event, across the whole broker; the store keeps a ceiling
for it ahead of use, with the ids, so a restarted broker numbers its events above every
event of an earlier run (its ring starts empty: a subscriber asking for older ones is
told of the gap).
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator
from typing import Any, Final

EVENT_BUFFER: Final = 100_000  # events kept by default (--event-buffer)
MIN_EVENT_BUFFER: Final = 1_000
EVENT_LINGER: Final = 300.0  # seconds events are kept after the last subscriber (--event-linger)
EVENT_PREFIX: Final = "queue"  # the first token of every event channel
ADMIN_EVENTS: Final = frozenset({"paused", "resumed", "configured", "queue_deleted"})
MAX_ERROR: Final = 1024  # characters of an error or reason an event carries

# (seq, ts, queue, event, message id or None, attempts, small fields or None)
Event = tuple[int, float, str, str, int | None, int, dict[str, Any] | None]
# The small fields of an event recorded with None: a plain put's, kept once for all.
DEFAULT_FIELDS: Final[dict[str, dict[str, Any]]] = {"put": {"priority": 0, "delay": 0.0}}


class EventRing:
    """The last ``capacity`` events, and the seq the next one gets. While not
    ``recording`` an event is only numbered (the server stops recording while nobody
    subscribes to events, see ``_feed``); what it holds is always the events from
    ``first_seq`` to ``next_seq - 1``, one after the other."""

    __slots__ = ("events", "next_seq", "recording")

    def __init__(self, capacity: int = EVENT_BUFFER, next_seq: int = 1) -> None:
        if capacity < 1:
            raise ValueError("an event ring holds at least one event")
        self.events: collections.deque[Event] = collections.deque(maxlen=capacity)
        self.next_seq = next_seq
        self.recording = True

    def stop(self) -> None:
        """Number events from now on without keeping them; forget those held."""
        self.recording = False
        self.events.clear()

    def emit(
        self,
        now: float,
        event: str,
        queue: str,
        message_id: int | None,
        attempts: int,
        fields: dict[str, Any] | None = None,
    ) -> None:
        seq = self.next_seq
        self.next_seq = seq + 1
        if self.recording:
            self.events.append((seq, now, queue, event, message_id, attempts, fields))

    @property
    def first_seq(self) -> int:
        """The oldest seq still held (``next_seq`` when the ring is empty)."""
        events = self.events
        return events[0][0] if events else self.next_seq

    def since(self, seq: int, last: int) -> Iterator[Event]:
        """The held events from ``seq`` (or the oldest held, if later) to ``last``."""
        events = self.events
        if not events or seq > last:
            return iter(())
        start = max(0, seq - events[0][0])
        return itertools.islice(events, start, start + last - max(seq, events[0][0]) + 1)


def channel_of(event: Event) -> str:
    kind = event[3]
    return f"{EVENT_PREFIX}.{event[2]}.{'admin' if kind in ADMIN_EVENTS else kind}"


def payload(event: Event) -> dict[str, Any]:
    """An event as subscribers get it (see PROTOCOL.md)."""
    seq, ts, queue, kind, message_id, attempts, fields = event
    wire = {
        "seq": seq,
        "ts": ts,
        "queue": queue,
        "id": message_id,
        "event": kind,
        "attempts": attempts,
    }
    fields = fields or DEFAULT_FIELDS.get(kind)
    if fields:
        wire.update(fields)
    return wire


def cut(text: str | None) -> str | None:
    """An error or reason as an event carries it: at most ``MAX_ERROR`` characters."""
    return text if text is None or len(text) <= MAX_ERROR else text[:MAX_ERROR]
