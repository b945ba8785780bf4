"""What both clients share for channels: the events a subscription yields, and the
bounded inbox that holds them until the application takes them."""

from __future__ import annotations

import collections
from typing import Any, Final, NamedTuple

from .errors import Lagged

MAX_INBOX: Final = 10_000  # events one subscription holds that the application has not taken


class ChannelMessage(NamedTuple):
    """One published message, as a subscription receives it."""

    channel: str
    data: bytes


def is_push(frame: Any) -> bool:
    """Whether a frame from the broker is a pushed one ``[id, kind, payload]`` (a reply's
    second element is a bool, a push's a string)."""
    return type(frame) is list and len(frame) == 3 and type(frame[1]) is str


class Inbox:
    """The events of one subscription not yet taken, and how it ended (once it has)."""

    def __init__(self, subscription: int) -> None:
        self.subscription = subscription
        self.events: collections.deque[ChannelMessage] = collections.deque()
        self.ended = False
        self.error: Exception | None = None  # why it ended, None for an unsubscribe

    def feed(self, kind: str, payload: Any) -> bool:
        """Take one pushed frame; False if it ended the subscription by overflowing the
        inbox (the broker must then be told to unsubscribe)."""
        if self.ended:
            return True
        if kind == "lagged":
            self.end(Lagged(payload.get("channel") if isinstance(payload, dict) else None))
        elif kind == "message" and isinstance(payload, dict):
            if len(self.events) >= MAX_INBOX:
                self.end(Lagged(payload.get("channel")))
                return False
            self.events.append(ChannelMessage(payload["channel"], payload["data"]))
        return True  # (a kind this client does not know is skipped)

    def end(self, error: Exception | None) -> None:
        if not self.ended:
            self.ended, self.error = True, error

    def take(self) -> ChannelMessage | None:
        """The next event; None if there is none yet; raises how it ended once it has
        ended and nothing is left (``StopIteration`` after an unsubscribe)."""
        if self.events:
            return self.events.popleft()
        if self.ended:
            if self.error is not None:
                raise self.error
            raise StopIteration
        return None
