"""Schedules and rate limits on a real daemon: fires drained by several consumers, a
kill -9 in the middle (no slot twice, catch-up as configured), a global rate limit over
greedy consumers, persistence across restarts, and bad input over the wire."""

from __future__ import annotations

import itertools
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from client import Client
from protocol import BadRequest, NotFound

from .conftest import BrokerProcess, start_broker, stop_broker

EVERY = 0.2


class Drain:
    """Consumers that reserve (long-polling), note what they got, and ack it."""

    def __init__(self, broker: BrokerProcess, queue: str, consumers: int) -> None:
        self.broker, self.queue = broker, queue
        self.seen: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(consumers)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                with self.broker.client(timeout=3.0) as client:
                    while not self.stop.is_set():
                        for message in client.reserve(self.queue, max_messages=5, wait=0.2):
                            with self.lock:
                                self.seen.append(dict(message.headers))
                            client.ack(message)
            except Exception:  # the broker is gone (killed, or stopping): try again
                time.sleep(0.05)

    def slots(self) -> list[str]:
        with self.lock:
            return [headers["scheduled_for"] for headers in self.seen]

    def wait_for(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.slots()) < count and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=5)


def parse_slot(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def test_an_every_schedule_fires_on_time_while_four_consumers_drain_it(
    broker: BrokerProcess,
) -> None:
    drain = Drain(broker, "ticks", consumers=4)
    try:
        with broker.client() as client:
            created = client.schedule("ticks", "tick", b"t", every=EVERY)
            started = created["created_at"]
            time.sleep(2.1)
            [listed] = client.schedules("ticks")
        expected = int((listed["last_slot"] - started) / EVERY + 0.5)
        assert 9 <= expected <= 11  # ~2 s of 0.2 s slots, whatever the machine's load
        assert listed["runs"] == expected and listed["missed"] == 0
        drain.wait_for(expected)
        slots = drain.slots()
        assert len(slots) == len(set(slots)) == expected
        assert [round((parse_slot(s) - started) / EVERY) for s in sorted(slots)] == list(
            range(1, expected + 1)
        )
    finally:
        drain.close()


@pytest.mark.parametrize("catchup", ["all", "latest", "skip"])
def test_kill_9_mid_run_fires_no_slot_twice_and_catches_up_as_configured(
    tmp_path: Path, brokers: list[BrokerProcess], catchup: str
) -> None:
    data = tmp_path / "data"
    first = start_broker(tmp_path / "first.log", "--data-dir", str(data), "--fsync", "always")
    brokers.append(first)
    with first.client() as client:
        client.schedule("jobs", "tick", b"t", every=EVERY, catchup=catchup)
        time.sleep(1.0)
    first.process.kill()
    first.process.wait()
    time.sleep(1.0)  # about five slots come due while it is down
    second = start_broker(tmp_path / "second.log", "--data-dir", str(data), "--fsync", "always")
    brokers.append(second)
    drain = Drain(second, "jobs", consumers=4)
    try:
        with second.client() as client:
            time.sleep(0.5)
            [listed] = client.schedules("jobs")
            drain.wait_for(listed["runs"])
        slots = sorted(parse_slot(s) for s in drain.slots())
        assert len(slots) == len(set(slots)) == listed["runs"]  # no slot twice
        steps = [round((b - a) / EVERY) for a, b in itertools.pairwise(slots)]
        gaps = [step for step in steps if step > 1]
        assert listed["missed"] >= 4
        if catchup == "all":
            assert gaps == [] and listed["skipped"] == 0  # every slot, down or not
        elif catchup == "latest":
            assert len(gaps) == 1 and listed["skipped"] == listed["missed"] - 1
        else:
            assert len(gaps) == 1 and listed["skipped"] == listed["missed"]
    finally:
        drain.close()
    stop_broker(second)


def test_a_global_rate_limit_holds_over_eight_greedy_consumers(broker: BrokerProcess) -> None:
    with broker.client() as client:
        client.put_many("limited", [b"x"] * 1000)
        started = time.monotonic()
        client.configure("limited", rate_limit={"rate": 50, "per": 1, "burst": 50})
        drain = Drain(broker, "limited", consumers=8)
        time.sleep(3.0)
        delivered = client.stats("limited")["totals"]["delivered"]
        elapsed = time.monotonic() - started
        drain.close()
        stats = client.stats("limited")
    assert delivered <= 50 + 50 * elapsed
    assert delivered >= 0.8 * (50 + 150)
    assert stats["limits"]["parked_by_limit"] > 0 and stats["limits"]["throttled_seconds"] > 1


def test_a_concurrency_cap_holds_and_limits_persist_across_a_restart(
    tmp_path: Path, brokers: list[BrokerProcess]
) -> None:
    data = tmp_path / "data"
    first = start_broker(tmp_path / "first.log", "--data-dir", str(data))
    brokers.append(first)
    with first.client() as client:
        client.put_many("capped", [b"x"] * 10)
        client.configure("capped", max_in_flight=3, rate_limit={"rate": 100})
        held = client.reserve("capped", max_messages=10)
        assert len(held) == 3
        assert client.reserve("capped", max_messages=10) == []
        client.schedule("capped", "nightly", b"report", cron="0 3 * * *", tz="Europe/Berlin")
    stop_broker(first)
    second = start_broker(tmp_path / "second.log", "--data-dir", str(data))
    brokers.append(second)
    with second.client() as client:
        settings = client.configure("capped")
        assert settings["max_in_flight"] == 3
        assert settings["rate_limit"] == {"rate": 100.0, "per": 1.0, "burst": 100}
        [schedule] = client.schedules()
        assert (schedule["name"], schedule["tz"], schedule["cron"]) == (
            "nightly",
            "Europe/Berlin",
            "0 3 * * *",
        )
        assert client.unschedule("capped", "nightly") is True
    stop_broker(second)


def test_trigger_puts_a_message_now(broker: BrokerProcess) -> None:
    with broker.client() as client:
        client.schedule("reports", "weekly", b"go", cron="@weekly", headers={"team": "ops"})
        message_id = client.trigger("reports", "weekly")
        [message] = client.reserve("reports")
        assert message.id == message_id and message.body == b"go"
        assert message.headers["schedule"] == "weekly" and message.headers["team"] == "ops"
        with pytest.raises(NotFound):
            client.trigger("reports", "monthly")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ({"cron": "* * *"}, "5 fields"),
        ({"cron": "0 0 * * 8"}, "bad day-of-week"),
        ({"cron": "@daily", "tz": "Nowhere/City"}, "unknown time zone"),
        ({"every": 0.01}, "every must be in"),
        ({"every": 1, "cron": "@daily"}, "exactly one of cron or every"),
        ({}, "exactly one of cron or every"),
        ({"every": 1, "start_at": 100.0, "end_at": 50.0}, "is before start_at"),
        ({"every": 1, "catchup": "most"}, "catchup must be one of"),
        ({"every": 1, "headers": {"x": [1]}}, "must be a string or an integer"),
        ({"every": 1, "name": "bad name!"}, "invalid schedule name"),
        ({"every": 1, "body": "not bytes"}, "body"),
        ({"every": 1, "color": "blue"}, "unknown argument"),
    ],
)
def test_bad_schedules_are_refused_over_the_wire(
    shared_broker: BrokerProcess, args: dict[str, Any], says: str
) -> None:
    request = {"queue": "bad-input", "name": "s", "body": b"x", **args}
    with shared_broker.raw() as raw:
        _, ok, error = raw.request("schedule", request)
    assert ok is False and error["code"] == "BAD_REQUEST"
    assert says in error["message"]
    with Client(shared_broker.host, shared_broker.port) as client:
        assert client.schedules("bad-input") == []


def test_bad_limits_are_refused_over_the_wire(shared_broker: BrokerProcess) -> None:
    with Client(shared_broker.host, shared_broker.port) as client:
        for settings, says in [
            ({"rate_limit": {"rate": 0}}, "rate_limit.rate"),
            ({"rate_limit": "fast"}, "rate_limit must be a map"),
            ({"max_in_flight": -1}, "max_in_flight"),
        ]:
            with pytest.raises(BadRequest, match=says):
                client.configure("bad-limits", **settings)
        assert client.configure("bad-limits")["rate_limit"] is None
