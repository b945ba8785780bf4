"""Micro-benchmark of the asyncio client's call path: call in, frame out, reply in, result
out (no sockets, no broker).

    python -m bench.micro_client [--jobs N] [--repeat R]

A real ``AsyncClient`` whose transport answers each request frame at once with a reply
made beforehand, as a broker would (a put's ids, a reserve's message, an ack's count).
Each job is three calls, put, reserve and ack, awaited one after another. Prints jobs and
calls per second and microseconds per call (median of R runs): the client library's own
Python cost per call, without the system calls of a real connection.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import uvloop

from bench._report import job_rates, jobs_main
from client import AsyncClient
from client._async import _ReplyReader
from protocol import NEED_DATA, FrameDecoder, encode_frame

DELIVERY = {
    "id": 7,
    "queue": "bench",
    "body": b"x" * 100,
    "priority": 0,
    "attempts": 1,
    "max_attempts": 5,
    "enqueued_at": 1.0,
    "lease": 9,
    "lease_deadline": 31.0,
}
RESULTS = {
    "hello": {"server": "sluice", "protocol": 1},
    "put": {"ids": [7]},
    "reserve": {"messages": [DELIVERY]},
    "ack": {"acked": 1},
}


class AnsweringTransport:
    """Just enough of an ``asyncio.Transport``: each frame written is answered, in the
    next loop iteration, with the reply its op gets from a broker that has no news."""

    def __init__(self, reader: _ReplyReader, loop: asyncio.AbstractEventLoop) -> None:
        self.reader, self.loop = reader, loop
        self.decoder = FrameDecoder()

    def write(self, data: bytes) -> None:
        self.decoder.feed(data)
        while (request := self.decoder.next_frame()) is not NEED_DATA:
            request_id, op, _ = request
            reply = encode_frame([request_id, True, RESULTS[op]])
            self.loop.call_soon(self.reader.data_received, reply)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def one_run(jobs: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    client = AsyncClient()
    reader = _ReplyReader(client._pending, loop)
    reader.transport = AnsweringTransport(reader, loop)  # type: ignore[assignment]
    client._reader, client._loop = reader, loop
    body = b"x" * 100
    started = time.perf_counter()
    for _ in range(jobs):
        await client.put("bench", body)
        (message,) = await client.reserve("bench", wait=1)
        await client.ack(message)
    elapsed = time.perf_counter() - started
    return job_rates(jobs, elapsed, "call")


def main() -> None:
    jobs_main(
        __doc__ or "",
        "asyncio client call path (put, reserve, ack: 3 calls per job)",
        lambda jobs: uvloop.run(one_run(jobs)),
    )


if __name__ == "__main__":
    main()
