"""Queues on a real broker: an unused queue is forgotten, in memory and in the store."""

from __future__ import annotations

import time
from pathlib import Path

from tests.conftest import BrokerProcess, error_code, start_broker, stop_broker

RESERVES = 1_000


def listed(broker: BrokerProcess) -> list[str]:
    with broker.client() as client:
        return [queue["name"] for queue in client.queues()]


def recovered_queue_records(broker: BrokerProcess) -> int:
    """How many stored queue records the broker's recovery read (from its log line)."""
    line = next(line for line in broker.log().splitlines() if "recovered " in line)
    return int(line.split(" in ")[1].split(" queues")[0])


def start_on(data: str, log_path: Path, brokers: list[BrokerProcess]) -> BrokerProcess:
    """A broker on the data dir ``data``, killed at the end of the test if still up."""
    broker = start_broker(log_path, "--data-dir", data)
    brokers.append(broker)
    return broker


def test_reserves_on_distinct_names_leave_no_queue_even_after_a_restart(
    tmp_path: Path, brokers: list[BrokerProcess]
) -> None:
    data = str(tmp_path / "data")
    broker = start_on(data, tmp_path / "first.log", brokers)
    with broker.client() as client:
        client.put("kept", b"stays")
        for n in range(RESERVES):
            assert client.reserve(f"gone.{n}", wait=0) == []
        client.put("drained", b"x")
        [message] = client.reserve("drained")
        client.ack(message)
        client.configure("configured", max_attempts=9)
        assert sorted(q["name"] for q in client.queues()) == ["configured", "kept"]
    stop_broker(broker)
    again = start_on(data, tmp_path / "second.log", brokers)
    assert recovered_queue_records(again) == 2  # the store deleted the rest
    assert listed(again) == ["configured", "kept"]
    stop_broker(again)


def test_a_forgotten_queue_stays_forgotten_after_kill_9(
    tmp_path: Path, brokers: list[BrokerProcess]
) -> None:
    data = str(tmp_path / "data")
    broker = start_on(data, tmp_path / "first.log", brokers)
    with broker.client() as client:
        for n in range(20):
            client.put(f"job.{n}", b"x")
            [message] = client.reserve(f"job.{n}")
            client.ack(message)  # confirmed: the queue's deletion is committed with it
        client.put("kept", b"y")
    broker.process.kill()
    broker.process.wait()
    again = start_on(data, tmp_path / "second.log", brokers)
    assert listed(again) == ["kept"]
    assert recovered_queue_records(again) <= 1
    stop_broker(again)


# ------------------------------------------------------------------- delete_queue


def test_delete_queue_over_the_wire_and_its_bad_input(broker: BrokerProcess) -> None:
    with broker.raw() as raw:
        raw.call("put", {"queue": "jobs", "messages": [{"body": b"a"}, {"body": b"b"}]})
        [held] = raw.call("reserve", {"queues": ["jobs"]})["messages"]
        for bad in (
            {"queue": "jobs", "force": "yes"},
            {"queue": "bad name"},
            {"queue": 7},
            {},
            {"queue": "jobs", "extra": 1},
        ):
            assert error_code(raw.request("delete_queue", bad)) == "BAD_REQUEST", bad
        refused = raw.request("delete_queue", {"queue": "jobs"})
        assert error_code(refused) == "BAD_REQUEST" and "force=true" in refused[2]["message"]
        assert refused[2]["details"] == {
            "ready": 1,
            "delayed": 0,
            "reserved": 1,
            "dead": 0,
            "schedules": 0,
        }
        assert raw.call("stats", {"queue": "jobs"})["ready"] == 1  # nothing changed
        assert error_code(raw.request("delete_queue", {"queue": "never"})) == "NOT_FOUND"
        deleted = raw.call("delete_queue", {"queue": "jobs", "force": True})
        assert deleted == {"deleted": True, "messages": 2, "schedules": 0, "bindings": 0}
        lost = raw.request("ack", {"items": [[held["id"], held["lease"]]]})
        assert error_code(lost) == "LEASE_LOST"
        assert raw.call("queues", {}) == {"queues": []}


def test_a_waiting_reserve_on_a_deleted_queue_gets_nothing_and_others_go_on(
    broker: BrokerProcess,
) -> None:
    with broker.raw() as waiting, broker.raw() as admin:
        admin.call("pause", {"queue": "held"})
        waiting.send_request("reserve", {"queues": ["held"], "wait": 30}, 7)
        deadline = time.monotonic() + 5
        while admin.call("stats", {"queue": "held"})["waiting"] == 0:  # the reserve is in
            assert time.monotonic() < deadline
            time.sleep(0.01)
        admin.call("delete_queue", {"queue": "held"})
        assert waiting.read_reply() == [7, True, {"messages": []}]
        admin.call("put", {"queue": "held", "messages": [{"body": b"new"}]})
        assert admin.call("stats", {"queue": "held"})["paused"] is False  # made anew


def test_a_confirmed_delete_survives_kill_9(tmp_path: Path, brokers: list[BrokerProcess]) -> None:
    data = str(tmp_path / "data")
    broker = start_on(data, tmp_path / "first.log", brokers)
    with broker.client() as client:
        client.configure("doomed", max_attempts=2)
        client.put_many("doomed", [b"1", b"2", b"3"])
        client.reserve("doomed")
        client.schedule("doomed", "tick", b"t", every=3600)
        client.bind("doomed.*", "doomed")
        client.put("kept", b"k")
        assert client.delete_queue("doomed", force=True)["messages"] == 3
    broker.process.kill()
    broker.process.wait()
    again = start_on(data, tmp_path / "second.log", brokers)
    with again.client() as client:
        assert [queue["name"] for queue in client.queues()] == ["kept"]
        assert client.schedules() == [] and client.bindings() == []
        client.put("doomed", b"again")
        assert client.stats("doomed")["totals"]["put"] == 1
        assert client.configure("doomed")["max_attempts"] == 5  # its settings went too
    stop_broker(again)
