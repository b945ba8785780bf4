"""Queues on a real broker: an unused queue is forgotten, in memory and in the store."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import BrokerProcess, start_broker, stop_broker

RESERVES = 1_000


def listed(broker: BrokerProcess) -> list[str]:
    with broker.client() as client:
        return [queue["name"] for queue in client.queues()]


def recovered_queue_records(broker: BrokerProcess) -> int:
    """How many stored queue records the broker's recovery read (from its log line)."""
    line = next(line for line in broker.log().splitlines() if "recovered " in line)
    return int(line.split(" in ")[1].split(" queues")[0])


def test_reserves_on_distinct_names_leave_no_queue_even_after_a_restart(
    tmp_path: Path, brokers: list[BrokerProcess]
) -> None:
    data = str(tmp_path / "data")
    broker = start_broker(tmp_path / "first.log", "--data-dir", data)
    brokers.append(broker)
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
    again = start_broker(tmp_path / "second.log", "--data-dir", data)
    brokers.append(again)
    assert recovered_queue_records(again) == 2  # the store deleted the rest
    assert listed(again) == ["configured", "kept"]
    stop_broker(again)


def test_a_forgotten_queue_stays_forgotten_after_kill_9(
    tmp_path: Path, brokers: list[BrokerProcess]
) -> None:
    data = str(tmp_path / "data")
    broker = start_broker(tmp_path / "first.log", "--data-dir", data)
    brokers.append(broker)
    with broker.client() as client:
        for n in range(20):
            client.put(f"job.{n}", b"x")
            [message] = client.reserve(f"job.{n}")
            client.ack(message)  # confirmed: the queue's deletion is committed with it
        client.put("kept", b"y")
    broker.process.kill()
    broker.process.wait()
    again = start_broker(tmp_path / "second.log", "--data-dir", data)
    brokers.append(again)
    assert listed(again) == ["kept"]
    assert recovered_queue_records(again) <= 1
    stop_broker(again)
