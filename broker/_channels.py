"""Live channels: who is subscribed to what, and publishing to them.

Delivery is at most once, to the subscriptions present when the publish runs; nothing is
stored. Each subscription belongs to one connection (its ``owner``) and is named by the
id of the request that made it; its messages go out as pushed frames
``[subscription_id, "message", {channel, data}]`` (see PROTOCOL.md).

Backpressure: a frame is pushed only while the connection has less than
``SUBSCRIBER_BUFFER`` bytes not yet taken by its peer. A subscription whose frame does not
fit gets one ``[subscription_id, "lagged", {channel}]`` frame and ends; the connection and
its other requests carry on. So what the broker holds for a slow subscriber is bounded,
and a publish never waits for one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol

from protocol import BadRequest, encode_frame, pack

from ._events import EVENT_PREFIX
from ._subjects import ONE, REST, SubjectTrie, matches, require_pattern

SUBSCRIBER_BUFFER: Final = 1 << 20  # bytes a connection's peer may be behind on pushes
MAX_PATTERNS: Final = 100  # patterns of one subscription
MAX_SUBSCRIPTIONS_PER_CONNECTION: Final = 1000
MAX_SUBSCRIPTIONS: Final = 100_000  # in the whole broker
_MESSAGE: Final = pack("message")


class Sink(Protocol):
    """Where a subscription's frames go (a connection)."""

    write_paused: bool  # its peer is behind: more is written once it catches up

    def push(self, frame: bytes, limit: int | None) -> bool:
        """Queue ``frame`` unless the peer is behind by more than ``limit`` bytes with it
        (None: no limit). False if it was not queued."""
        ...


@dataclass(slots=True, eq=False)
class Subscription:
    owner: int  # the connection's id
    request_id: int
    patterns: tuple[str, ...]
    sink: Sink
    events: bool = False  # a pattern may match a job event's channel
    cursor: int | None = None  # replaying held job events from this seq; None: live
    ended: bool = False

    def wants(self, channel: str) -> bool:
        return any(matches(pattern, channel) for pattern in self.patterns)

    def frame(self, kind: bytes, payload: bytes) -> bytes:
        """A pushed frame of this subscription: ``kind`` and ``payload`` packed already."""
        body = b"\x93" + pack(self.request_id) + kind + payload
        return len(body).to_bytes(4, "big") + body


class Channels:
    """Every live subscription, filed in a trie by pattern."""

    def __init__(self, max_subscriptions: int = MAX_SUBSCRIPTIONS) -> None:
        self._trie: SubjectTrie[Subscription] = SubjectTrie()
        self._by_owner: dict[int, dict[int, Subscription]] = {}
        self.count = 0
        self.event_subscriptions = 0  # those with a pattern that may match job events
        self.lagged_total = 0  # subscriptions ended for falling behind
        self.max_subscriptions = max_subscriptions

    def subscribe(self, owner: int, request_id: int, patterns: object, sink: Sink) -> Subscription:
        """Add a subscription and return it. ``BadRequest`` for bad patterns, a
        request id already naming one of the owner's subscriptions, or a full limit."""
        checked = _patterns(patterns)
        mine = self._by_owner.get(owner, {})
        if request_id in mine:
            raise BadRequest(f"subscribe: request id {request_id} already names a subscription")
        if len(mine) >= MAX_SUBSCRIPTIONS_PER_CONNECTION:
            raise BadRequest(
                f"subscribe: this connection already has {MAX_SUBSCRIPTIONS_PER_CONNECTION} "
                "subscriptions; unsubscribe some, or use more connections"
            )
        if self.count >= self.max_subscriptions:
            raise BadRequest(f"subscribe: the broker holds {self.count} subscriptions, its limit")
        events = any(may_match_events(pattern) for pattern in checked)
        subscription = Subscription(owner, request_id, tuple(checked), sink, events)
        self._by_owner.setdefault(owner, {})[request_id] = subscription
        for pattern in subscription.patterns:
            self._trie.add(pattern, subscription)
        self.count += 1
        self.event_subscriptions += events
        return subscription

    def unsubscribe(self, owner: int, request_id: int) -> bool:
        """End a subscription; False if the owner has none with that id (any more)."""
        subscription = self._by_owner.get(owner, {}).get(request_id)
        if subscription is None:
            return False
        self._remove(subscription)
        return True

    def drop_owner(self, owner: int) -> None:
        """End every subscription of a connection that went away."""
        for subscription in list(self._by_owner.get(owner, {}).values()):
            self._remove(subscription)

    def publish(self, channel: str, data: bytes) -> int:
        """Push ``data`` to every subscription matching ``channel``; returns how many took
        it. Assumes ``channel`` is a valid channel name."""
        if not self._trie:
            return 0
        payload = pack({"channel": channel, "data": data})
        reached = 0
        for subscription in self._trie.match(channel):
            if subscription.sink.push(subscription.frame(_MESSAGE, payload), SUBSCRIBER_BUFFER):
                reached += 1
            else:
                self.lagged(subscription, {"channel": channel})
        return reached

    def all_subscriptions(self) -> list[Subscription]:
        return [sub for mine in self._by_owner.values() for sub in mine.values()]

    def match(self, channel: str) -> set[Subscription]:
        return self._trie.match(channel)

    def lagged(self, subscription: Subscription, where: dict[str, object]) -> None:
        """End a subscription that fell behind, telling it where (see PROTOCOL.md)."""
        self._remove(subscription)
        self.lagged_total += 1
        frame = encode_frame([subscription.request_id, "lagged", where])
        subscription.sink.push(frame, None)

    def _remove(self, subscription: Subscription) -> None:
        mine = self._by_owner[subscription.owner]
        del mine[subscription.request_id]
        if not mine:
            del self._by_owner[subscription.owner]
        for pattern in subscription.patterns:
            self._trie.remove(pattern, subscription)
        self.count -= 1
        self.event_subscriptions -= subscription.events
        subscription.ended = True


def _patterns(value: object) -> list[str]:
    if not isinstance(value, list) or not value:
        raise BadRequest("subscribe: patterns must be a non-empty list of patterns")
    if len(value) > MAX_PATTERNS:
        raise BadRequest(f"subscribe: at most {MAX_PATTERNS} patterns per subscription")
    return list(dict.fromkeys(require_pattern(pattern, "subscribe") for pattern in value))


def may_match_events(pattern: str) -> bool:
    """Whether ``pattern`` may match a job event's channel (``queue.<queue>.<event>``)."""
    return pattern.partition(".")[0] in (EVENT_PREFIX, ONE, REST)
