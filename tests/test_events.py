"""Job events on a real daemon: one job's whole sequence in seq order, replay from a seq
after a reconnect with nothing missed or repeated, a gap when the ring has moved on, seqs
that go on above the old ones after a restart, a subscriber that never reads (it lags;
the broker's memory stays bounded and other clients carry on), admin events, bad input."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client import ChannelMessage, Client, Gap, JobEvent
from client.errors import BadRequest, Lagged

from .conftest import REPO_ROOT, BrokerProcess, RawConnection, start_broker, stop_broker
from .test_channels import _rss_bytes
from .test_metrics import scrape, value

TIMEOUT = 5.0


def events_of(subscription: Any, count: int) -> list[Any]:
    got = []
    for _ in range(count):
        event = subscription.get(TIMEOUT)
        assert event is not None, f"only {len(got)} of {count} events came: {got}"
        got.append(event)
    return got


def summary(events: list[JobEvent]) -> list[tuple[str, int | None, int]]:
    return [(event.event, event.id, event.attempts) for event in events]


def test_one_job_put_reserve_nack_reserve_ack_in_seq_order(broker: BrokerProcess) -> None:
    with broker.client() as watcher, broker.client() as client:
        subscription = watcher.subscribe("queue.ev.one.>")
        job = client.put("ev.one", b"x", priority=7)
        (first,) = client.reserve("ev.one", wait=TIMEOUT)
        client.nack(first, delay=0, error="try again")
        (second,) = client.reserve("ev.one", wait=TIMEOUT)
        client.ack(second, result=b"done!")
        events = events_of(subscription, 5)
        assert summary(events) == [
            ("put", job, 0),
            ("reserved", job, 1),
            ("nacked", job, 1),
            ("reserved", job, 2),
            ("acked", job, 2),
        ]
        seqs = [event.seq for event in events]
        assert seqs == list(range(seqs[0], seqs[0] + 5)), "one seq after the other"
        assert events[0].fields == {"priority": 7, "delay": 0.0}
        assert events[2].fields == {"delay": 0.0, "error": "try again"}
        assert events[4].fields["result_size"] > 0
        assert all(event.queue == "ev.one" for event in events)
        assert [event.channel for event in events][:2] == [
            "queue.ev.one.put",
            "queue.ev.one.reserved",
        ]
        assert events[0].ts <= events[-1].ts
        assert subscription.get(0.2) is None


def test_dead_letters_replay_cancel_purge_and_progress(broker: BrokerProcess) -> None:
    with broker.client() as watcher, broker.client() as client:
        subscription = watcher.subscribe("queue.ev.life.*")
        doomed = client.put("ev.life", b"a")
        (message,) = client.reserve("ev.life", wait=TIMEOUT)
        client.progress(message, 50, "half")
        client.bury(message, reason="x" * 2000)
        client.replay("ev.life")
        cancelled = client.put("ev.life", b"b", delay=60)
        client.cancel(cancelled)
        purged = client.put("ev.life", b"c")
        client.purge("ev.life")
        events = events_of(subscription, 10)
        assert summary(events) == [
            ("put", doomed, 0),
            ("reserved", doomed, 1),
            ("progress", doomed, 1),
            ("dead", doomed, 1),
            ("replayed", doomed, 0),
            ("put", cancelled, 0),
            ("cancelled", cancelled, 0),
            ("put", purged, 0),
            ("purged", doomed, 0),  # (ready again after the replay)
            ("purged", purged, 0),
        ]
        assert events[2].fields == {"progress": 50, "note": "half"}
        assert events[3].fields == {"reason": "x" * 1024}, "a reason is cut to 1 KiB"
        assert events[5].fields["delay"] == 60


def test_admin_events(broker: BrokerProcess) -> None:
    with broker.client() as watcher, broker.client() as client:
        subscription = watcher.subscribe("queue.ev.admin.admin")
        client.pause("ev.admin")
        client.resume("ev.admin")
        client.configure("ev.admin", max_attempts=3, visibility_timeout=10)
        client.put("ev.admin", b"not an admin event")
        events = events_of(subscription, 3)
        assert [(event.event, event.id) for event in events] == [
            ("paused", None),
            ("resumed", None),
            ("configured", None),
        ]
        assert events[2].fields == {"settings": ["max_attempts", "visibility_timeout"]}
        assert subscription.get(0.2) is None


def test_replay_from_a_seq_after_a_reconnect_misses_and_repeats_nothing(
    broker: BrokerProcess,
) -> None:
    with broker.client() as client:
        with broker.client() as watcher:
            subscription = watcher.subscribe("queue.ev.again.>")
            for n in range(10):
                client.put("ev.again", b"%d" % n)
            seen = events_of(subscription, 4)  # then the watcher goes away
        for _ in range(10):
            (message,) = client.reserve("ev.again", wait=TIMEOUT)
            client.ack(message)
        with broker.client() as watcher:
            resumed = watcher.subscribe("queue.ev.again.>", from_seq=seen[-1].seq + 1)
            rest = events_of(resumed, 26)
            assert resumed.get(0.2) is None
            client.put("ev.again", b"live")
            live = events_of(resumed, 1)
        everything = seen + rest + live
        seqs = [event.seq for event in everything]
        assert seqs == list(range(seqs[0], seqs[0] + 31)), "none missed, none twice"
        assert [event.event for event in everything].count("acked") == 10
        assert live[0].event == "put"


def test_a_seq_older_than_the_ring_gets_a_gap_first(tmp_path: Path) -> None:
    broker = start_broker(tmp_path / "broker.log", "--event-buffer", "1000")
    try:
        with broker.client() as client:
            client.subscribe("queue.ev.gap.none")  # someone watches: events are kept
            client.put_many("ev.gap", [b"x"] * 1500)
            watcher = client.subscribe("queue.ev.gap.put", from_seq=1)
            first = watcher.get(TIMEOUT)
            assert isinstance(first, Gap)
            assert first.from_seq == 1 and first.first_seq == 501
            replayed = events_of(watcher, 1000)
            assert [event.seq for event in replayed] == list(range(501, 1501))
            assert watcher.get(0.2) is None
            assert watcher.next_seq == 1501
    finally:
        stop_broker(broker)


def test_seqs_go_on_above_the_old_ones_after_kill_9(
    tmp_path: Path, brokers: list[BrokerProcess]
) -> None:
    brokers.append(start_broker(tmp_path / "broker.log"))
    with brokers[0].client() as client:
        subscription = client.subscribe("queue.ev.crash.put")
        client.put("ev.crash", b"before")
        (before,) = events_of(subscription, 1)
    brokers[0].process.kill()
    brokers[0].process.wait()
    brokers.append(start_broker(tmp_path / "broker2.log"))
    with brokers[1].client() as client:
        subscription = client.subscribe("queue.ev.crash.put", from_seq=before.seq)
        gap = subscription.get(TIMEOUT)
        assert isinstance(gap, Gap), "the ring of the old run is gone, and it says so"
        assert gap.from_seq == before.seq and gap.first_seq > before.seq
        client.put("ev.crash", b"after")
        (after,) = events_of(subscription, 1)
        assert after.seq > before.seq
    stop_broker(brokers[1])


def test_channel_subscribers_and_event_subscribers_share_a_connection(
    broker: BrokerProcess,
) -> None:
    with broker.client() as client:
        everything = client.subscribe(">")
        client.publish("news.today", b"hello")
        job = client.put("ev.mixed", b"x")
        got = events_of(everything, 2)
        assert got[0] == ChannelMessage("news.today", b"hello")
        assert isinstance(got[1], JobEvent) and got[1].id == job


def test_a_subscriber_that_never_reads_lags_and_nobody_else_waits(tmp_path: Path) -> None:
    broker = start_broker(tmp_path / "broker.log", "--in-memory", "--event-buffer", "1000")
    try:
        with broker.raw() as stuck, broker.client() as client:
            subscribed = stuck.request("subscribe", {"patterns": ["queue.>"]})
            assert subscribed[1] is True
            start = _rss_bytes(broker)
            queue = "ev.stuck." + "q" * 180  # long names: bigger events
            for _ in range(100):  # 100 x 200 jobs, 3 events each
                client.put_many(queue, [b"y" * 100] * 200)
                messages = client.reserve(queue, max_messages=200, wait=TIMEOUT)
                assert client.ack(messages) == 200
            grown = _rss_bytes(broker) - start
            assert grown < 24 * 2**20, f"the broker grew by {grown} bytes for a stuck reader"
            pushed = _pushes_until_lagged(stuck)
            assert pushed[-1][1] == "lagged"
            stopped_at = pushed[-1][2]["seq"]
            assert [seq for _, kind, seq in pushed[:-1]] == list(
                range(stopped_at - len(pushed) + 1, stopped_at)
            ), "every event up to the one it stopped at, then lagged"
            assert stuck.call("ping", {})  # its connection carries on
    finally:
        stop_broker(broker)


def _pushes_until_lagged(connection: RawConnection) -> list[Any]:
    pushed = []
    while True:
        got = connection.read_frame()
        if isinstance(got[1], str):  # a push: [subscription, kind, payload]
            if got[1] == "event":
                pushed.append((got[0], "event", got[2]["seq"]))
            else:
                pushed.append(got)
                return pushed


def test_bad_input(broker: BrokerProcess) -> None:
    with broker.client() as client:
        client.put("ev.bad", b"x")
        for bad in (-1, 10**9, "1", 1.5, True):
            with pytest.raises(BadRequest) as caught:
                client.subscribe("queue.>", from_seq=bad)  # type: ignore[arg-type]
            assert "from_seq" in str(caught.value)
        with pytest.raises(BadRequest) as refused:
            client.publish("queue.ev.bad.put", b"forged")
        assert "job events" in str(refused.value)
        assert client.stats("ev.bad")["ready"] == 1  # nothing else changed
        fine = client.subscribe("queue.ev.bad.>")
        client.put("ev.bad", b"y")
        assert isinstance(fine.get(TIMEOUT), JobEvent)


def test_lagged_says_which_seq_to_go_on_from() -> None:
    error = Lagged(None, 42)
    assert error.seq == 42 and "from_seq=42" in str(error)


def test_a_client_too_slow_for_its_own_inbox_is_told_where_it_stopped(
    broker: BrokerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("client._channels.MAX_INBOX", 5)
    with broker.client() as client, Client(broker.host, broker.port) as producer:
        subscription = client.subscribe("queue.ev.inbox.>")
        producer.put_many("ev.inbox", [b"z"] * 10)
        client.ping()  # reads the pushes that came before its reply
        taken = [subscription.get(TIMEOUT) for _ in range(5)]
        with pytest.raises(Lagged) as lagged:
            subscription.get(TIMEOUT)
        assert isinstance(taken[-1], JobEvent)
        assert lagged.value.seq == taken[-1].seq + 1


def test_metrics_count_subscriptions_events_and_lagging(tmp_path: Path) -> None:
    broker = start_broker(
        tmp_path / "broker.log", "--in-memory", "--event-buffer", "1000", http=True
    )
    try:
        base = f"http://{broker.host}:{broker.http_port}"
        with broker.client() as client, broker.raw() as stuck:
            client.subscribe("news")
            assert stuck.request("subscribe", {"patterns": ["queue.>"]})[1] is True
            queue = "ev.metrics." + "m" * 180
            for _ in range(100):  # 60,000 events: far more than the stuck reader's buffers
                client.put_many(queue, [b"z"] * 200)
                client.ack(client.reserve(queue, max_messages=200))
            samples = scrape(base)
            assert value(samples, "sluice_subscriptions") == 2 - value(
                samples, "sluice_subscriptions_lagged_total"
            )
            assert value(samples, "sluice_subscriptions_lagged_total") == 1
            assert value(samples, "sluice_event_subscriptions") == 0
            assert value(samples, "sluice_event_seq") == 60_000
            assert value(samples, "sluice_event_buffer_events") == 1000
    finally:
        stop_broker(broker)


@contextlib.contextmanager
def broker_client(tmp_path: Path, *args: str) -> Iterator[Client]:
    """A client of a broker started with ``args``, stopped when the block ends."""
    broker = start_broker(tmp_path / "broker.log", *args)
    try:
        with broker.client() as client:
            yield client
    finally:
        stop_broker(broker)


def test_with_nobody_subscribed_events_are_numbered_not_kept(tmp_path: Path) -> None:
    with broker_client(tmp_path, "--in-memory", "--event-linger", "0") as client:
        client.put("ev.nobody", b"before anyone")  # seq 1: nobody watches, not kept
        watcher = client.subscribe("queue.ev.nobody.*", from_seq=1)
        gap = watcher.get(TIMEOUT)
        assert gap == Gap(1, 2), "numbered, and the subscriber is told it is gone"
        client.put("ev.nobody", b"watched")  # seq 2: kept
        (watched,) = events_of(watcher, 1)
        assert watched.seq == 2
        watcher.unsubscribe()
        client.put("ev.nobody", b"in the linger")  # seq 3: 0 s of linger start now
        client.put("ev.nobody", b"after it")  # seq 4: the ring stopped, and forgot
        again = client.subscribe("queue.ev.nobody.*", from_seq=2)
        assert again.get(TIMEOUT) == Gap(2, 5)
        client.put("ev.nobody", b"watched again")
        (live,) = events_of(again, 1)
        assert live.seq == 5, "numbering went on while nothing was kept"


def test_event_linger_always_keeps_them_with_nobody_subscribed(tmp_path: Path) -> None:
    with broker_client(tmp_path, "--in-memory", "--event-linger", "always") as client:
        job = client.put("ev.always", b"x")
        watcher = client.subscribe("queue.ev.always.*", from_seq=0)
        (put,) = events_of(watcher, 1)
        assert (put.seq, put.event, put.id) == (1, "put", job)


@pytest.mark.parametrize("bad", ["-1", "soon", "nan", "86401"])
def test_bad_event_linger_is_refused_at_start(bad: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "broker", "--in-memory", "--event-linger", bad],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and "argument --event-linger" in done.stderr, done.stderr
