"""What both clients share for channels: the events a subscription yields (published
messages, job events, gaps), and the bounded inbox that holds them until the application
takes them."""

from __future__ import annotations

import collections
from typing import Any, Final, NamedTuple

from .errors import Lagged

MAX_INBOX: Final = 10_000  # events one subscription holds that the application has not taken


class ChannelMessage(NamedTuple):
    """One published message, as a subscription receives it."""

    channel: str
    data: bytes


class JobEvent(NamedTuple):
    """One job event (see the README's "Job events"): ``seq`` increases broker-wide;
    ``fields`` holds the event's small extras (``priority``, ``delay``, ``error``,
    ``reason``, ``progress``, ``note``, ``result_size``, ``settings``). ``id`` is None for
    a queue's admin events."""

    seq: int
    ts: float
    queue: str
    id: int | None
    event: str
    attempts: int
    fields: dict[str, Any]

    @property
    def channel(self) -> str:
        kind = "admin" if self.event in ADMIN_EVENTS else self.event
        return f"queue.{self.queue}.{kind}"

    @classmethod
    def from_wire(cls, payload: dict[str, Any]) -> JobEvent:
        fields = {key: value for key, value in payload.items() if key not in _EVENT_KEYS}
        return cls(
            payload["seq"],
            payload["ts"],
            payload["queue"],
            payload["id"],
            payload["event"],
            payload["attempts"],
            fields,
        )


class Gap(NamedTuple):
    """The job events from ``from_seq`` up to ``first_seq`` are gone (the broker keeps
    only its last ``--event-buffer``, and none from before a restart): the subscription
    goes on from ``first_seq``."""

    from_seq: int
    first_seq: int


Event = ChannelMessage | JobEvent | Gap
ADMIN_EVENTS: Final = frozenset({"paused", "resumed", "configured", "queue_deleted"})
_EVENT_KEYS: Final = frozenset({"seq", "ts", "queue", "id", "event", "attempts"})


def is_push(frame: Any) -> bool:
    """Whether a frame from the broker is a pushed one ``[id, kind, payload]`` (a reply's
    second element is a bool, a push's a string)."""
    return type(frame) is list and len(frame) == 3 and type(frame[1]) is str


class Inbox:
    """The events of one subscription not yet taken, and how it ended (once it has)."""

    def __init__(self, subscription: int) -> None:
        self.subscription = subscription
        self.events: collections.deque[Event] = collections.deque()
        self.ended = False
        self.error: Exception | None = None  # why it ended, None for an unsubscribe

    def feed(self, kind: str, payload: Any) -> bool:
        """Take one pushed frame; False if it ended the subscription by overflowing the
        inbox (the broker must then be told to unsubscribe)."""
        if self.ended:
            return True
        if not isinstance(payload, dict):
            return True
        if kind == "lagged":
            self.end(Lagged(payload.get("channel"), payload.get("seq")))
            return True
        if kind == "message":
            event: Event = ChannelMessage(payload["channel"], payload["data"])
        elif kind == "event":
            event = JobEvent.from_wire(payload)
        elif kind == "gap":
            event = Gap(payload["from_seq"], payload["first_seq"])
        else:
            return True  # a kind this client does not know is skipped
        if len(self.events) >= MAX_INBOX:
            seq = event.seq if isinstance(event, JobEvent) else None
            self.end(Lagged(payload.get("channel"), seq))
            return False
        self.events.append(event)
        return True

    def end(self, error: Exception | None) -> None:
        if not self.ended:
            self.ended, self.error = True, error

    def take(self) -> Event | None:
        """The next event; None if there is none yet; raises how it ended once it has
        ended and nothing is left (``StopIteration`` after an unsubscribe)."""
        if self.events:
            return self.events.popleft()
        if self.ended:
            if self.error is not None:
                raise self.error
            raise StopIteration
        return None
