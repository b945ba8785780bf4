"""A store with a small ``--max-storage`` refuses puts near its capacity with a typed
``STORAGE_FULL`` that says what to do, keeps everything else working (acks above all, which
write into the space the store holds back for them), admits puts again once acks free space,
and loses nothing it confirmed when it is killed with SIGKILL, full or not.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker import Core
from broker._message import PutSpec
from broker._store import Store, _refusal_margin
from client import Client, Message
from client.errors import ErrorCode, StorageFull
from tests.conftest import KEEP, BrokerProcess, start_broker, stop_broker, wait_for_state

QUEUE = "full.jobs"
MAX_STORAGE = 4 * 1024 * 1024  # --max-storage 4M
BODY_SIZE = 8 * 1024
MAX_PUTS = 2000  # a 4 MiB store must refuse long before this many 8 KiB bodies
FIRE_SIZE = 256 * 1024  # a schedule's body in the full-store test: 32 fillers' worth


def body(number: int) -> bytes:
    return f"{number:06d}".encode().ljust(BODY_SIZE, b".")


def fill(client: Client, first: int) -> tuple[list[bytes], StorageFull]:
    """Put 8 KiB bodies numbered from ``first`` until the broker refuses one; returns the
    bodies it confirmed and the refusal."""
    stored: list[bytes] = []
    for number in range(first, first + MAX_PUTS):
        try:
            client.put(QUEUE, body(number))
        except StorageFull as error:
            return stored, error
        stored.append(body(number))
    pytest.fail(f"{MAX_PUTS} puts of {BODY_SIZE} bytes fit in a {MAX_STORAGE}-byte store")


def assert_refuses_puts(client: Client) -> None:
    with pytest.raises(StorageFull) as refused:
        client.put(QUEUE, body(999_999))
    with pytest.raises(StorageFull):
        client.put_many(QUEUE, [body(999_998), body(999_997)])
    assert refused.value.code is ErrorCode.STORAGE_FULL
    text = refused.value.message
    assert "consume or purge" in text and "--max-storage" in text, text


def reserve_all(client: Client, count: int) -> list[Message]:
    messages: list[Message] = []
    while len(messages) < count:
        batch = client.reserve(QUEUE, max_messages=100, visibility_timeout=60)
        assert batch, f"only {len(messages)} of {count} messages could be reserved"
        messages += batch
    return messages


def ready_bodies(client: Client) -> set[bytes]:
    items = client.peek(QUEUE, "ready", limit=1000)
    assert len(items) < 1000
    return {item["body"] for item in items}


def counts(client: Client) -> tuple[int, int, int, int]:
    stats = client.stats(QUEUE)
    return stats["ready"], stats["delayed"], stats["reserved"], stats["dead"]


def test_full_store_refuses_puts_keeps_acks_and_loses_nothing(
    tmp_path: Path, brokers: list[BrokerProcess]
) -> None:
    def start(name: str) -> BrokerProcess:
        args = ("--data-dir", str(tmp_path / "data"), "--max-storage", "4M")
        brokers.append(start_broker(tmp_path / f"{name}.log", *args))
        return brokers[-1]

    def kill_and_restart(broker: BrokerProcess, name: str) -> BrokerProcess:
        broker.process.kill()
        broker.process.wait()
        log = broker.log()
        assert "Traceback" not in log and "commit failed" not in log, log[-4000:]
        return start(name)

    broker = start("filling")
    with broker.client() as client:
        client.configure(QUEUE, **KEEP)  # looked at once drained
        stored, refusal = fill(client, 0)
        assert refusal.code is ErrorCode.STORAGE_FULL
        assert 0 < len(stored) * BODY_SIZE < MAX_STORAGE, len(stored)
        assert_refuses_puts(client)
        # A refused put stores nothing, and every other op still works.
        assert counts(client) == (len(stored), 0, 0, 0)
        assert client.stats(QUEUE)["totals"]["put"] == len(stored)
        assert [item["body"] for item in client.peek(QUEUE, limit=3)] == stored[:3]
        assert client.configure(QUEUE)["max_body"] == 1024 * 1024

    broker = kill_and_restart(broker, "full")
    with broker.client() as client:
        assert ready_bodies(client) == set(stored), "confirmed puts were lost while full"
        assert_refuses_puts(client)
        messages = reserve_all(client, len(stored))
        half = len(messages) // 2
        for message in messages[:half]:
            assert client.ack(message) == 1  # each ack its own commit, into the reserve
        for message in messages[half : half + 10]:
            client.touch(message)
        kept = messages[half:]
        assert client.nack(kept, delay=0, error="retry after the full disk") == len(kept)
        assert counts(client) == (len(kept), 0, 0, 0)
        refilled, _ = fill(client, len(stored))  # until the store is full again
        assert refilled, "acking half of a full store did not let any put in"

    broker = kill_and_restart(broker, "refilled")
    with broker.client() as client:
        expected = {message.body for message in kept} | set(refilled)
        assert ready_bodies(client) == expected, "confirmed puts were lost"
        remaining = reserve_all(client, len(expected))
        assert client.ack(remaining) == len(expected)
        assert counts(client) == (0, 0, 0, 0)
        assert client.put(QUEUE, body(0)) > 0
    stop_broker(broker)


def test_the_map_grows_past_its_first_size_and_keeps_everything(
    tmp_path: Path, brokers: list[BrokerProcess]
) -> None:
    """The LMDB map starts at 64 MiB; 80 MiB of bodies make it grow (logged as an event),
    and a kill -9 and restart loses none of them."""
    data = str(tmp_path / "data")
    args = ("--data-dir", data, "--log-format", "json")
    big = [bytes([n]) * (1024 * 1024 - 64) for n in range(80)]
    brokers.append(start_broker(tmp_path / "first.log", *args))
    with brokers[-1].client(timeout=30) as client:
        client.configure("big", max_body=1024 * 1024)
        for chunk in range(0, len(big), 4):
            client.put_many("big", big[chunk : chunk + 4])
        # The map grows when a checkpoint writes past it, on the store's own thread.
        wait_for_state(
            lambda: client.ping() > 0 and '"event": "store_grown"' in brokers[-1].log(),
            "the map never grew",
            timeout=30,
        )
    brokers[-1].process.kill()
    brokers[-1].process.wait()
    brokers.append(start_broker(tmp_path / "second.log", *args))
    with brokers[-1].client(timeout=30) as client:
        got = [m.body for m in client.reserve("big", max_messages=80)]
        while len(got) < len(big) and (more := client.reserve("big", max_messages=80)):
            got += [m.body for m in more]
        assert got == big
    stop_broker(brokers[-1])


def test_ack_results_cannot_fill_the_store_but_plain_acks_always_work(
    tmp_path: Path, brokers: list[BrokerProcess]
) -> None:
    """A result is new data: an ack carrying one needs room like a put, and is refused with
    STORAGE_FULL (changing nothing) when there is none, so results cannot fill the space
    kept back for acks. The same ack without a result goes through."""
    args = ("--data-dir", str(tmp_path / "data"), "--max-storage", "4M")
    brokers.append(start_broker(tmp_path / "broker.log", *args))
    with brokers[-1].client() as client:
        client.configure(QUEUE, result_ttl=3600, max_body=1024 * 1024)
        stored, _ = fill(client, 0)
        (message,) = client.reserve(QUEUE)
        with pytest.raises(StorageFull) as refused:
            client.ack(message, result=b"r" * (512 * 1024))
        assert "an ack without a result needs no room" in refused.value.message
        assert client.status(message.id)["state"] == "reserved"  # the ack changed nothing
        assert client.ack(message) == 1
        assert counts(client) == (len(stored) - 1, 0, 0, 0)
    stop_broker(brokers[-1])


def test_a_full_store_refuses_triggers_and_skips_schedule_fires(
    tmp_path: Path, brokers: list[BrokerProcess]
) -> None:
    args = ("--data-dir", str(tmp_path / "data"), "--max-storage", "4M")
    brokers.append(start_broker(tmp_path / "broker.log", *args))
    # Fires far larger than the filler: once an 8 KiB put is refused, the room a later
    # measurement of the store may find (estimates are a little generous) cannot take one.
    big = b"s" * FIRE_SIZE
    with brokers[-1].client() as client:
        client.schedule(QUEUE, "big", big, every=0.2)
        fill(client, 1)
        with pytest.raises(StorageFull):
            client.trigger(QUEUE, "big")
        with pytest.raises(StorageFull):
            client.schedule(QUEUE, "another", big, every=60)
        ready = counts(client)[0]
        [before] = client.schedules(QUEUE)
        wait_for_state(
            lambda: client.schedules(QUEUE)[0]["skipped"] >= before["skipped"] + 3,
            "a full store did not skip the schedule's fires",
        )
        [after] = client.schedules(QUEUE)
        assert counts(client)[0] == ready  # nothing stored by the fires
        assert after["runs"] == before["runs"] and [s["name"] for s in client.schedules()] == [
            "big"
        ]
    stop_broker(brokers[-1])


def log_segments(data: Path) -> int:
    return sum(1 for name in os.listdir(data) if name.endswith(".wal"))


def test_a_store_at_its_cap_keeps_checkpointing_and_restarts(
    tmp_path: Path, brokers: list[BrokerProcess]
) -> None:
    """A full 4 MiB store has its LMDB map at the cap. A checkpoint that rewrites the
    record of every message (a nack of them all) needs about as much room again: it is
    written in pieces, so checkpoints go on, the log stays a few segments long instead of
    growing past --max-storage, and a restart after kill -9 can apply it."""
    data = tmp_path / "data"
    args = ("--data-dir", str(data), "--max-storage", "4M")
    brokers.append(start_broker(tmp_path / "filling.log", *args))
    with brokers[-1].client(timeout=30) as client:
        client.configure(QUEUE, max_attempts=None)
        stored = 0
        with pytest.raises(StorageFull):
            while True:
                client.put_many(QUEUE, [b"s" * 100] * 100)
                stored += 100
        for _ in range(3):
            leased = reserve_all(client, stored)
            assert client.nack(leased, delay=0, error="again") == stored
        wait_for_state(lambda: log_segments(data) <= 4, "checkpoints stopped at the cap")
    log = brokers[-1].log()
    assert "checkpoint failed" not in log, log[-3000:]
    brokers[-1].process.kill()
    brokers[-1].process.wait()
    brokers.append(start_broker(tmp_path / "restarted.log", *args))
    with brokers[-1].client(timeout=30) as client:
        assert counts(client) == (stored, 0, 0, 0)
    stop_broker(brokers[-1])


def test_puts_refused_for_size_stay_refused_until_a_margin_is_free(tmp_path: Path) -> None:
    """A measurement that finds a little of what the estimate held back does not let puts
    in again (they would flap between refused and stored); freeing the margin does."""
    store = Store(str(tmp_path), max_storage=MAX_STORAGE)
    store.recover(Core(), 0.0)
    spec = PutSpec(body=body(0))
    while store.admits(spec):
        pass
    margin = _refusal_margin(store.capacity)
    store.used -= margin // 2  # a checkpoint measured less than was estimated
    assert not store.admits(spec), "a small measurement let puts in again"
    assert store.full() is not None
    store.used -= margin  # consumers acked
    assert store.admits(spec)
    assert store.full() is None
    store.close()


@pytest.mark.parametrize("capacity", [-(1 << 20), 0, 1, 100 << 10, 1 << 20, 10 << 30])
def test_the_refusal_margin_never_holds_back_what_an_empty_small_store_has(
    capacity: int,
) -> None:
    """1% of the capacity, at least 64 KiB, but never more than a quarter of it: a store
    with little room still admits puts into the rest."""
    margin = _refusal_margin(capacity)
    assert 0 <= margin <= max(0, capacity) // 4
    if capacity >= 1 << 20:
        assert margin == max(64 << 10, capacity // 100)
