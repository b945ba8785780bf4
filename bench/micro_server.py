"""Micro-benchmark of the broker's request path: frame in, reply bytes out (no sockets).

    python -m bench.micro_server [--jobs N] [--repeat R]

A real ``BrokerServer`` in memory and a real ``Connection`` whose transport only collects
what is written. Each job is three requests, each fed to ``data_received`` as its own
frame, as a client unbatched sends them: put one message, reserve it, ack it. Prints jobs
and requests per second and microseconds per request (median of R runs): the broker's own
Python cost per request, without the socket calls or the event loop's polling.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench._report import job_rates, jobs_main
from broker import Core
from broker._server import BrokerServer, Connection, ServerLimits
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


def _replies(transport: CollectingTransport, decoder: FrameDecoder) -> list[Any]:
    for chunk in transport.written:
        decoder.feed(chunk)
    transport.written.clear()
    replies = []
    while (frame := decoder.next_frame()) is not NEED_DATA:
        replies.append(frame)
    return replies


async def one_run(jobs: int) -> dict[str, float]:
    server = BrokerServer(Core(), ServerLimits(max_frame=16 * 1024 * 1024))
    connection = Connection(server, 1)
    transport = CollectingTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    decoder = FrameDecoder()
    connection.data_received(encode_frame([0, "hello", {"version": 1, "client": "micro"}]))
    _replies(transport, decoder)
    body = b"x" * 100
    put = {"queue": "bench", "messages": [{"body": body}]}
    reserve = {"queues": ["bench"], "max": 1}
    elapsed = 0.0
    for job in range(jobs):
        request_id = 3 * job + 1
        frames = [
            encode_frame([request_id, "put", put]),
            encode_frame([request_id + 1, "reserve", reserve]),
        ]
        started = time.perf_counter()
        for frame in frames:
            connection.data_received(frame)
        elapsed += time.perf_counter() - started
        _, reserved = _replies(transport, decoder)
        (message,) = reserved[2]["messages"]
        ack = encode_frame([request_id + 2, "ack", {"items": [[message["id"], message["lease"]]]}])
        started = time.perf_counter()
        connection.data_received(ack)
        elapsed += time.perf_counter() - started
        (acked,) = _replies(transport, decoder)
        if acked[2] != {"acked": 1}:
            raise SystemExit(f"bench bug: ack replied {acked!r}")
    if server.core.messages:
        raise SystemExit(f"bench bug: {len(server.core.messages)} messages left after acking all")
    return job_rates(jobs, elapsed, "request")


def main() -> None:
    jobs_main(
        __doc__ or "",
        "server request path (put, reserve, ack: 3 requests per job)",
        lambda jobs: asyncio.run(one_run(jobs)),
    )


if __name__ == "__main__":
    main()
