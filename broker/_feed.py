"""Job events to subscribers: live ones after each turn's commit, held ones on request.

Events are published once the commit holding their changes is done (at the end of the
turn in memory), so a subscriber never hears of a change a crash could undo. ``published``
is the last seq handed to live subscriptions.

A subscription made with ``from_seq`` first replays the ring's events from there, as
fast as its connection takes them (at most ``SUBSCRIBER_BUFFER`` bytes behind, more once
its peer catches up); while it replays, live publishing passes it by, and once its cursor
reaches ``published`` it is live. If ``from_seq`` is older than the ring, its first frame
is ``gap`` (the seqs it asked for that are gone); a replay overtaken by the ring (the peer
reads slower than events are made) ends with ``lagged`` at the seq it had reached, as a
live subscription that falls behind does.
"""

from __future__ import annotations

import math
from typing import Final

from protocol import BadRequest, encode_frame, pack

from ._channels import SUBSCRIBER_BUFFER, Channels, Subscription
from ._events import EventRing, channel_of, payload

_EVENT: Final = pack("event")


class EventFeed:
    """With ``linger`` (seconds), the ring records only while some subscription may
    match job events, and for ``linger`` seconds after the last one ended (so one that
    drops and comes back within that time misses nothing); otherwise events are only
    numbered, which costs next to nothing. None (or infinity): it always records."""

    def __init__(self, ring: EventRing, channels: Channels, linger: float | None = None) -> None:
        self.ring = ring
        self.channels = channels
        self.linger = None if linger == math.inf else linger
        self.idle_since: float | None = None  # when the last event subscription was seen
        if self.linger is not None:
            ring.stop()  # nobody subscribes yet
        self.published = ring.next_seq - 1
        # Replays not done, in the order they started, each with the gap frame still to
        # send before its first event (None once sent, or if there is none).
        self.replaying: dict[Subscription, bytes | None] = {}

    def check_from_seq(self, value: object) -> int:
        """``value`` if it is a seq a subscription may start from, else ``BadRequest``."""
        newest = self.published + 1
        if type(value) is not int or not 0 <= value <= newest:
            raise BadRequest(
                f"subscribe: from_seq must be an integer from 0 to {newest} (the next "
                f"event's seq), got {value!r}"
            )
        return value

    def watched(self) -> None:
        """A subscription that may match job events began: record them (again)."""
        self.idle_since = None
        if not self.ring.recording:
            self.ring.recording = True  # from the next event on; none before was wanted
            self.published = self.ring.next_seq - 1

    def start(self, subscription: Subscription, from_seq: int) -> None:
        """Replay held events from ``from_seq`` to ``subscription`` (from the next
        ``go_on``: after the subscribe's reply), then go live."""
        first = self.ring.first_seq
        gap = None
        if max(from_seq, 1) < first:
            gap = encode_frame(
                [subscription.request_id, "gap", {"from_seq": from_seq, "first_seq": first}]
            )
        subscription.cursor = max(from_seq, first)
        self.replaying[subscription] = gap

    def publish(self, now: float, upto: int | None = None) -> None:
        """Hand the events made since the last call, up to seq ``upto`` (None: all), to
        the live subscriptions."""
        last = self.ring.next_seq - 1 if upto is None else min(upto, self.ring.next_seq - 1)
        if last <= self.published:
            return
        start, self.published = self.published + 1, last
        if self.channels.event_subscriptions == 0:
            self._idle(now)
            return
        first = self.ring.first_seq
        if start < first:  # one turn made more events than the ring holds
            self._tell_gap(start, first)
        for event in self.ring.since(start, last):
            subscriptions = self.channels.match(channel_of(event))
            if not subscriptions:
                continue
            body = pack(payload(event))
            for subscription in subscriptions:
                if subscription.cursor is not None:
                    continue  # replaying: it takes this one from the ring in turn
                if not subscription.sink.push(subscription.frame(_EVENT, body), SUBSCRIBER_BUFFER):
                    self.channels.lagged(subscription, {"seq": event[0]})

    def _idle(self, now: float) -> None:
        if self.linger is None or not self.ring.recording:
            return
        if self.idle_since is None:
            self.idle_since = now
        elif now - self.idle_since >= self.linger:
            self.ring.stop()

    def go_on(self) -> bool:
        """Replay on wherever the peer is not behind. True if a replay is unfinished
        though its peer was not behind: it may go on as soon as this turn's frames are
        written (a peer that is behind says so when it catches up)."""
        more = False
        for subscription in list(self.replaying):
            if subscription.ended:
                del self.replaying[subscription]
            elif not subscription.sink.write_paused:
                self._replay(subscription)
                more = more or subscription in self.replaying
        return more

    def _replay(self, subscription: Subscription) -> None:
        cursor = subscription.cursor
        assert cursor is not None
        if cursor < self.ring.first_seq:  # overtaken by the ring while its peer was slow
            self.replaying.pop(subscription, None)
            self.channels.lagged(subscription, {"seq": cursor})
            return
        sink = subscription.sink
        gap = self.replaying[subscription]
        if gap is not None:
            sink.push(gap, None)
            self.replaying[subscription] = None
        for event in self.ring.since(cursor, self.published):
            channel = channel_of(event)
            if subscription.wants(channel):
                frame = subscription.frame(_EVENT, pack(payload(event)))
                if not sink.push(frame, SUBSCRIBER_BUFFER):
                    subscription.cursor = event[0]
                    return  # on when its peer has read some
        subscription.cursor = None
        self.replaying.pop(subscription, None)

    def _tell_gap(self, start: int, first: int) -> None:
        gap = {"from_seq": start, "first_seq": first}
        for subscription in self.channels.all_subscriptions():
            if subscription.events and subscription.cursor is None:
                frame = encode_frame([subscription.request_id, "gap", gap])
                subscription.sink.push(frame, None)
