"""The background sync: Linux native AIO fdatasync on a real file, and the broker's commit
with it (a real store in a temporary dir, the real kernel's completions): replies and job
events wait for the batch's sync, the next batch waits for the one in flight, a failed
submit is a failed commit that is tried again."""

from __future__ import annotations

import asyncio
import os
import select
from pathlib import Path
from typing import cast

import pytest
import uvloop

from bench.micro_server import CollectingTransport, decoded
from broker import Core
from broker._aio import Aio, open_aio
from broker._server import BrokerServer, Connection, ServerLimits
from broker._store import Store
from protocol import FrameDecoder, encode_frame

T0 = 1_000_000.0
WAIT = 5.0


def aio_available() -> bool:
    aio = open_aio()
    if aio is None:
        return False
    aio.close()
    return True


aio_or_skip = pytest.mark.skipif(
    not aio_available(), reason="this system has no native AIO (io_setup refused)"
)


def reaped(aio: Aio) -> list[tuple[int, int]]:
    """The completions, once the eventfd says there are some (bounded)."""
    readable, _, _ = select.select([aio.eventfd], [], [], WAIT)
    assert readable, f"no completion within {WAIT} s"
    return aio.reap()


@aio_or_skip
def test_a_sync_completes_with_its_tag_and_an_empty_eventfd_reaps_nothing(
    tmp_path: Path,
) -> None:
    aio = open_aio()
    assert aio is not None
    fd = os.open(tmp_path / "file", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert aio.reap() == []  # nothing submitted: nothing to read
        os.write(fd, b"x" * 4096)
        aio.submit(fd, 41)
        assert reaped(aio) == [(41, 0)]
        assert aio.reap() == []
        aio.submit(fd, 42)
        assert reaped(aio) == [(42, 0)]
    finally:
        os.close(fd)
        aio.close()
        aio.close()  # a second close does nothing


@aio_or_skip
def test_a_bad_descriptor_is_refused_at_submit(tmp_path: Path) -> None:
    aio = open_aio()
    assert aio is not None
    fd = os.open(tmp_path / "file", os.O_RDWR | os.O_CREAT, 0o644)
    os.close(fd)
    try:
        with pytest.raises(OSError) as refused:
            aio.submit(fd, 1)
        assert refused.value.errno == 9  # EBADF
        assert aio.reap() == []
    finally:
        aio.close()


# ------------------------------------------------------------------ the broker's commit


def durable_server(path: Path, background: str) -> tuple[BrokerServer, Store]:
    store = Store(str(path), fsync="always")
    core = Core(track_changes=True)
    store.recover(core, T0)
    limits = ServerLimits(max_frame=1 << 20, background_sync=background)
    return BrokerServer(core, limits, clock=lambda: T0, store=store), store


async def started(path: Path, background: str) -> tuple[BrokerServer, Store]:
    """A durable server listening, once what its start committed is durable."""
    server, store = durable_server(path, background)
    await server.start("127.0.0.1", 0)
    await until_durable(server, store.encoded)
    return server, store


async def stopped(server: BrokerServer, store: Store) -> None:
    await server.shutdown(grace=0.1)
    store.close()


def put(server: BrokerServer, body: bytes) -> int:
    """A put through the server's one path, ended as a turn ends; its batch number."""
    args = {"queue": "aio", "messages": [{"body": body}]}
    _, need, _ = server.run("put", args, ("local", 0), 0)
    server.end_turn()
    return need


def recovered_bodies(path: Path) -> list[bytes]:
    """The bodies a store opened again on ``path`` recovers, sorted."""
    store = Store(str(path), fsync="always")
    core = Core(track_changes=True)
    store.recover(core, T0)
    store.close()
    return sorted(message.body for message in core.messages.values())


async def until_durable(server: BrokerServer, need: int) -> None:
    async with asyncio.timeout(WAIT):
        while server.durable < need:
            await asyncio.sleep(0.001)


@aio_or_skip
def test_with_background_sync_on_the_put_is_durable_only_after_the_kernel_says_so(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        server, store = await started(tmp_path, "on")
        first = put(server, b"one")
        first_events = server.core.events.next_seq - 1
        # The sync is in flight: the batch is not durable, its event not published, and
        # the next put's changes wait for a batch of their own.
        assert server.durable < first
        assert server.feed.published < server.core.events.next_seq - 1
        second = put(server, b"two")
        assert second == first + 1 and store.encoded == first
        await until_durable(server, first)  # its completion starts the second's commit
        assert server.feed.published >= first_events  # (also while the second syncs)
        await until_durable(server, second)
        assert store.commits >= 2
        assert server.feed.published == server.core.events.next_seq - 1
        await stopped(server, store)

    uvloop.run(scenario())
    assert recovered_bodies(tmp_path) == [b"one", b"two"]


def test_with_background_sync_off_the_put_is_durable_when_the_turn_ends(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        server, store = await started(tmp_path, "off")
        need = put(server, b"one")
        assert server.durable == need  # synced on the loop, inside the turn
        assert server.feed.published == server.core.events.next_seq - 1
        await stopped(server, store)

    uvloop.run(scenario())


@aio_or_skip
def test_a_sync_the_kernel_refuses_is_a_failed_commit_tried_again(tmp_path: Path) -> None:
    """For the first commit the log's descriptor is /dev/null's: the write goes through,
    the kernel refuses to sync it (EINVAL: no fsync there). Nothing is confirmed; the
    retry a second later, on the real descriptor, makes it durable, and it recovers
    (that the retry lands where the first attempt went: tests/test_log.py)."""

    async def scenario() -> None:
        server, store = await started(tmp_path, "on")
        segment = store._segment
        assert segment is not None
        real_fd = segment.fd
        segment.fd = os.open(os.devnull, os.O_RDWR)
        try:
            need = put(server, b"one")
            assert server.durable < need
            assert server.metrics.failing_commits == 1
        finally:
            os.close(segment.fd)
            segment.fd = real_fd
        await until_durable(server, need)
        assert server.metrics.failing_commits == 0
        await stopped(server, store)

    uvloop.run(scenario())
    assert recovered_bodies(tmp_path) == [b"one"]


@aio_or_skip
@pytest.mark.parametrize("reaped_mid_turn", [False, True])
def test_a_connections_waiting_replies_keep_their_order_across_batches(
    tmp_path: Path, reaped_mid_turn: bool
) -> None:
    """With a sync in flight (batch N), connection W's put needs N+1; W's next reserve,
    in a later turn, delivers the message put in batch N and so needs only N. It still
    comes after the put's reply: among replies that wait, request order holds. Also when
    batch N's completion is read after the reserve was handled and before its turn ends
    (``reaped_mid_turn``): its reply then needs a batch already durable."""

    async def scenario() -> list[int]:
        server, store = await started(tmp_path, "on")
        producer, worker = connect(server, 1), connect(server, 2)
        producer.data_received(request(1, "put", {"queue": "aio", "messages": [{"body": b"a"}]}))
        server.end_turn()  # batch N, in flight: nothing below lets the loop reap it
        in_flight = store.encoded
        worker.data_received(request(2, "put", {"queue": "aio", "messages": [{"body": b"b"}]}))
        server.end_turn()
        worker.data_received(request(3, "reserve", {"queues": ["aio"], "max": 1}))
        if reaped_mid_turn:
            assert server._aio is not None
            select.select([server._aio.eventfd], [], [], WAIT)
            server._on_synced()  # as the loop would, were the eventfd's callback first
            assert server.durable == in_flight
        server.end_turn()
        await until_durable(server, in_flight + 1)
        replies = answers(worker)
        await stopped(server, store)
        return replies

    assert uvloop.run(scenario()) == [2, 3]


def connect(server: BrokerServer, number: int) -> Connection:
    connection = Connection(server, number)
    connection.connection_made(CollectingTransport())  # type: ignore[arg-type]
    connection.data_received(request(0, "hello", {"version": 1, "client": "test"}))
    server.end_turn()
    return connection


def request(request_id: int, op: str, args: dict[str, object]) -> bytes:
    return encode_frame([request_id, op, args])


def answers(connection: Connection) -> list[int]:
    """The request ids of the replies written to ``connection`` since hello, in order."""
    transport = cast(CollectingTransport, connection.transport)
    frames = decoded(FrameDecoder(), transport.written)
    return [frame[0] for frame in frames if frame[0] != 0]
