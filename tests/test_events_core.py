"""Job events in the pure core, with a fake clock: what each change records, the ring's
bounds and reads, and the feed that hands events to subscriptions (a fake sink)."""

from __future__ import annotations

import collections
from typing import Any

import pytest

from broker import Core, PutSpec
from broker._channels import Channels
from broker._events import EventRing, channel_of, payload
from broker._feed import EventFeed
from protocol import BadRequest, FrameDecoder

T0 = 1_000.0


def kinds(core: Core, since: int = 1) -> list[tuple[str, int | None, int]]:
    ring = core.events
    return [(e[3], e[4], e[5]) for e in ring.since(since, ring.next_seq - 1)]


def fields(core: Core, kind: str) -> list[dict[str, Any] | None]:
    ring = core.events
    return [e[6] for e in ring.since(1, ring.next_seq - 1) if e[3] == kind]


def test_a_lease_that_runs_out_is_expired_then_dead_when_attempts_are_used_up() -> None:
    core = Core(random=lambda: 0.5)
    core.configure(T0, "q", {"max_attempts": 1, "visibility_timeout": 5})
    (job,) = core.put(T0, "q", [PutSpec(body=b"x")])
    core.reserve(T0, ["q"], 1)
    core.tick(T0 + 6)
    assert kinds(core) == [
        ("configured", None, 0),
        ("put", job, 0),
        ("reserved", job, 1),
        ("expired", job, 1),
        ("dead", job, 1),
    ]
    assert fields(core, "expired") == [{"error": "lease expired"}]
    assert fields(core, "dead") == [{"reason": "max_attempts (1) used up"}]
    expired = next(e for e in core.events.events if e[3] == "expired")
    assert expired[1] == T0 + 5, "stamped with the lease's deadline, when it ran out"


def test_a_delay_coming_due_a_release_and_a_dead_letter_ttl() -> None:
    core = Core(random=lambda: 0.5)
    core.configure(T0, "q", {"dead_letter_ttl": 10})
    (job,) = core.put(T0, "q", [PutSpec(body=b"x", delay=2)])
    core.tick(T0 + 2)
    (message,) = core.reserve(T0 + 2, ["q"], 1)
    core.release(T0 + 2, [message])
    (message,) = core.reserve(T0 + 3, ["q"], 1)
    assert message.lease_token is not None
    core.bury(T0 + 3, job, message.lease_token, "bad")
    core.tick(T0 + 14)
    assert kinds(core, 2) == [
        ("put", job, 0),
        ("ready", job, 0),
        ("reserved", job, 1),
        ("released", job, 0),
        ("reserved", job, 1),
        ("dead", job, 1),
        ("removed", job, 1),
    ]
    assert fields(core, "put") == [{"priority": 0, "delay": 2}]
    assert fields(core, "removed") == [{"reason": "dead_letter_ttl"}]


def test_nack_with_backoff_names_its_delay_and_purge_dead_removes() -> None:
    core = Core(random=lambda: 0.5)
    core.configure(T0, "q", {"max_attempts": 2})
    (job,) = core.put(T0, "q", [PutSpec(body=b"x")])
    (message,) = core.reserve(T0, ["q"], 1)
    assert message.lease_token is not None
    core.nack(T0, [(job, message.lease_token)], error="e" * 5000)
    (nacked,) = fields(core, "nacked")
    assert nacked is not None and nacked["delay"] > 0 and nacked["error"] == "e" * 1024
    core.tick(T0 + 1000)
    (message,) = core.reserve(T0 + 1000, ["q"], 1)
    assert message.lease_token is not None
    core.nack(T0 + 1000, [(job, message.lease_token)])
    assert kinds(core, 6)[-2:] == [("nacked", job, 2), ("dead", job, 2)]
    assert core.purge_dead(T0 + 1000, "q") == 1
    assert kinds(core)[-1] == ("removed", job, 2)


def test_pause_resume_and_configure_are_admin_events() -> None:
    core = Core()
    core.configure(T0, "q", {"paused": True})
    core.configure(T0, "q", {"paused": True})  # no flip: nothing
    core.configure(T0, "q", {"paused": False, "max_attempts": 3})
    assert kinds(core) == [("paused", None, 0), ("resumed", None, 0), ("configured", None, 0)]
    assert fields(core, "configured") == [{"settings": ["max_attempts"]}]
    assert [channel_of(e) for e in core.events.events] == ["queue.q.admin"] * 3


def test_the_ring_keeps_its_last_events_and_reads_any_span() -> None:
    ring = EventRing(capacity=3)
    assert ring.first_seq == 1 and list(ring.since(1, 0)) == []
    for n in range(5):
        ring.emit(T0, "put", "q", n, 0)
    assert ring.first_seq == 3 and ring.next_seq == 6
    assert [e[0] for e in ring.since(1, 5)] == [3, 4, 5], "older ones are gone"
    assert [e[0] for e in ring.since(4, 4)] == [4]
    assert [e[0] for e in ring.since(4, 5)] == [4, 5]
    assert list(ring.since(6, 5)) == []
    with pytest.raises(ValueError):
        EventRing(capacity=0)
    assert payload(ring.events[0]) == {
        "seq": 3,
        "ts": T0,
        "queue": "q",
        "id": 2,
        "event": "put",
        "attempts": 0,
        "priority": 0,  # a plain put's fields, recorded as None
        "delay": 0.0,
    }


class FakeSink:
    """A connection whose peer reads nothing until told: takes ``room`` bytes."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.frames: list[Any] = []
        self.write_paused = False
        self._decoder = FrameDecoder(1 << 24)

    def push(self, frame: bytes, limit: int | None) -> bool:
        if limit is not None and self.frames and len(frame) > self.room:
            return False
        self.room -= len(frame)
        self._decoder.feed(frame)
        self.frames.append(self._decoder.next_frame())
        return True


def published(capacity: int, events: int) -> tuple[EventRing, Channels, EventFeed]:
    """A feed over a ring of ``capacity`` that has published ``events`` puts."""
    ring, channels = EventRing(capacity=capacity), Channels()
    feed = EventFeed(ring, channels)
    for n in range(events):
        ring.emit(T0, "put", "q", n, 0)
    feed.publish(T0)
    return ring, channels, feed


def test_a_replay_goes_on_as_its_peer_reads_and_then_is_live() -> None:
    ring, channels, feed = published(capacity=100, events=50)
    sink = FakeSink(room=1000)
    subscription = channels.subscribe(1, 7, ["queue.q.*"], sink)
    feed.start(subscription, 10)
    assert sink.frames == [], "nothing before the subscribe's reply"
    assert feed.go_on() is True
    got = len(sink.frames)
    assert 0 < got < 41 and subscription.cursor == 10 + got, "as much as fits, then waits"
    sink.room = 10**6
    assert feed.go_on() is False  # done: live from now
    assert [f[2]["seq"] for f in sink.frames] == list(range(10, 51))
    ring.emit(T0, "acked", "q", 1, 1)
    feed.publish(T0)
    assert sink.frames[-1][1:] == ["event", payload(ring.events[-1])]


def test_a_replay_overtaken_by_the_ring_ends_lagged_and_a_gap_comes_first() -> None:
    ring, channels, feed = published(capacity=10, events=15)
    sink = FakeSink(room=200)
    subscription = channels.subscribe(1, 7, ["queue.>"], sink)
    feed.start(subscription, 2)
    feed.go_on()
    assert sink.frames[0] == [7, "gap", {"from_seq": 2, "first_seq": 6}]
    for n in range(20):
        ring.emit(T0, "put", "q", n, 0)
    feed.publish(T0)
    sink.room = 10**6
    feed.go_on()
    assert sink.frames[-1][1] == "lagged" and subscription.ended
    stopped = sink.frames[-1][2]["seq"]
    assert [f[2]["seq"] for f in sink.frames[1:-1]] == list(range(6, stopped))


def test_from_seq_must_be_a_seq_that_was_or_is_next() -> None:
    feed = EventFeed(EventRing(), Channels())
    assert feed.check_from_seq(0) == 0 and feed.check_from_seq(1) == 1
    for bad in (-1, 2, "1", 1.0, True, None):
        with pytest.raises(BadRequest):
            feed.check_from_seq(bad)


def test_with_a_linger_events_are_kept_only_while_watched_and_for_the_linger_after() -> None:
    ring, channels = EventRing(capacity=100), Channels()
    feed = EventFeed(ring, channels, linger=10.0)
    ring.emit(T0, "put", "q", 1, 0)  # nobody watches: numbered, not kept
    feed.publish(T0)
    assert (ring.first_seq, ring.next_seq, len(ring.events)) == (2, 2, 0)
    subscription = channels.subscribe(1, 7, ["queue.>"], FakeSink(room=10**6))
    feed.watched()
    ring.emit(T0, "put", "q", 2, 0)
    feed.publish(T0)
    channels.unsubscribe(1, subscription.request_id)
    for now in (T0 + 1, T0 + 10.5):  # the linger starts at the first turn with nobody
        ring.emit(now, "put", "q", 3, 0)
        feed.publish(now)
    assert [e[0] for e in ring.events] == [2, 3, 4], "kept through the linger"
    ring.emit(T0 + 11.5, "put", "q", 4, 0)
    feed.publish(T0 + 11.5)
    assert ring.events == collections.deque() and not ring.recording
    assert ring.first_seq == ring.next_seq == 6, "the held ones are forgotten: a gap"
    channels.subscribe(1, 8, ["queue.q.put"], FakeSink(room=10**6))
    feed.watched()
    assert ring.recording and feed.published == 5
