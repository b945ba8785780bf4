"""Micro-benchmark of the broker's request path: frame in, reply bytes out (no sockets).

    python -m bench.micro_server [--jobs N] [--repeat R] [--long-poll] [--log] [--batch B]

A real ``BrokerServer`` in memory and a real ``Connection`` whose transport only collects
what is written. Each job is three requests, each fed to ``data_received`` as its own
frame, as a client unbatched sends them: put one message, reserve it, ack it. Prints jobs
and requests per second and microseconds per request (median of R runs): the broker's own
Python cost per request, without the socket calls or the event loop's polling.

With ``--long-poll`` the put and the reserve come from two connections and the reserve
comes first and waits, as a worker's does when it is faster than its producer: the put
then serves the waiting reserve, whose reply is a long-poll completion.

With ``--log`` the broker has a real store in a temporary directory whose log is never
synced (``fsync never``): the write-ahead path's own Python (encoding each turn's changes,
appending them, holding and releasing the replies that wait for them) without the disk's
wait. Each request is then answered in the loop turn after it arrives, as in the broker.

With ``--batch B`` each request carries B messages, as the bench's ``--batch`` load sends
them: one put of B, one reserve of up to B, one ack of B; a job is still one message, so
µs per job is the path's cost per message, and --jobs is rounded up to whole batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import Any

import uvloop

from bench._report import job_rates, jobs_main
from broker import Core
from broker._args import MAX_BATCH
from broker._server import BrokerServer, Connection, ServerLimits
from broker._store import Store
from protocol import NEED_DATA, FrameDecoder, encode_frame


class CollectingTransport:
    """Just enough of an ``asyncio.Transport`` for a connection: keeps what is written."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def decoded(decoder: FrameDecoder, chunks: Iterable[bytes]) -> list[Any]:
    """Every whole frame in ``chunks``, fed to ``decoder`` in order (the start of a frame
    not yet whole stays in the decoder)."""
    for chunk in chunks:
        decoder.feed(chunk)
    frames = []
    while (frame := decoder.next_frame()) is not NEED_DATA:
        frames.append(frame)
    return frames


def _replies(transport: CollectingTransport, decoder: FrameDecoder) -> list[Any]:
    replies = decoded(decoder, transport.written)
    transport.written.clear()
    return replies


class _Peer:
    """One connection of a run, and a decoder for the replies written to it."""

    def __init__(self, server: BrokerServer, number: int) -> None:
        self.connection = Connection(server, number)
        self.transport = CollectingTransport()
        self.connection.connection_made(self.transport)  # type: ignore[arg-type]
        self.decoder = FrameDecoder()

    async def greet(self) -> _Peer:
        await _send(self, encode_frame([0, "hello", {"version": 1}]))
        self.replies()
        return self

    def replies(self) -> list[Any]:
        return _replies(self.transport, self.decoder)


@contextlib.contextmanager
def _broker(log: bool) -> Iterator[BrokerServer]:
    """A broker in memory, or with a store whose log is never synced (``log``)."""
    limits = ServerLimits(max_frame=16 * 1024 * 1024)
    if not log:
        yield BrokerServer(Core(), limits)
        return
    with tempfile.TemporaryDirectory(prefix="sluice-micro-") as directory:
        store = Store(directory, fsync="never")
        core = Core(track_changes=True)
        store.recover(core, time.time())
        try:
            yield BrokerServer(core, limits, store=store)
            if store.commits == 0:
                raise SystemExit("bench bug: the store committed nothing")
        finally:
            store.close()


async def one_run(
    jobs: int, long_poll: bool = False, log: bool = False, batch: int = 1
) -> dict[str, float]:
    with _broker(log) as server:
        return await _jobs(server, jobs, long_poll, batch)


async def _send(peer: _Peer, frame: bytes) -> float:
    """Feed one request to ``peer``'s connection and end the loop turn it started (a
    broker with a store ends it in a callback of its own): the seconds that took."""
    started = time.perf_counter()
    peer.connection.data_received(frame)
    if peer.connection.server.store is not None:
        await asyncio.sleep(0)  # runs the end_turn it scheduled
    return time.perf_counter() - started


async def _jobs(server: BrokerServer, jobs: int, long_poll: bool, batch: int) -> dict[str, float]:
    producer = await _Peer(server, 1).greet()
    worker = await _Peer(server, 2).greet() if long_poll else producer
    body = b"x" * 100
    put = {"queue": "bench", "messages": [{"body": body}] * batch}
    reserve: dict[str, Any] = {"queues": ["bench"], "max": batch}
    if long_poll:
        reserve["wait"] = 5.0
    elapsed = 0.0
    batches = -(-jobs // batch)
    for job in range(batches):
        request_id = 3 * job + 1
        sends = [
            (producer, encode_frame([request_id, "put", put])),
            (worker, encode_frame([request_id + 1, "reserve", reserve])),
        ]
        if long_poll:
            sends.reverse()  # the reserve waits; the put serves it
        for peer, frame in sends:
            elapsed += await _send(peer, frame)
            if long_poll and peer is worker and worker.transport.written:
                raise SystemExit("bench bug: the reserve was answered before any put")
        replies = producer.replies() + (worker.replies() if long_poll else [])
        (reserved,) = [reply for reply in replies if reply[0] == request_id + 1]
        items = [[message["id"], message["lease"]] for message in reserved[2]["messages"]]
        if len(items) != batch:
            raise SystemExit(f"bench bug: reserved {len(items)} of a batch of {batch}")
        elapsed += await _send(worker, encode_frame([request_id + 2, "ack", {"items": items}]))
        (acked,) = worker.replies()
        if acked[2] != {"acked": batch}:
            raise SystemExit(f"bench bug: ack replied {acked!r}")
    if server.core.messages:
        raise SystemExit(f"bench bug: {len(server.core.messages)} messages left after acking all")
    return job_rates(batches * batch, elapsed, "request", 3 / batch)


def main() -> None:
    jobs_main(
        __doc__ or "",
        "server request path (put, reserve, ack: 3 requests per job)",
        lambda jobs, long_poll, log, batch: uvloop.run(one_run(jobs, long_poll, log, batch)),
        switches={
            "long_poll": "the reserve waits before the put comes (two connections)",
            "log": "a real store whose log is never synced (fsync never)",
        },
        numbers={
            "batch": (1, MAX_BATCH, f"messages per put, reserve and ack, 1-{MAX_BATCH} (default 1)")
        },
    )


if __name__ == "__main__":
    main()
