"""Micro-benchmark of the blocking client's call path: call in, frame out, reply in,
result out (no sockets, no broker).

    python -m bench.micro_sync_client [--jobs N] [--repeat R]

A real ``Client`` whose socket answers each request frame at once with the reply a broker
would send (the replies of ``bench.micro_client``). Each job is three calls, put, reserve
and ack, one after another. Prints jobs and calls per second and microseconds per call
(median of R runs): the client library's own Python cost per call, without the system
calls of a real connection.
"""

from __future__ import annotations

import time
from typing import Any

from bench._report import job_rates, jobs_main
from bench.micro_client import RESULTS
from client import Client
from protocol import NEED_DATA, FrameDecoder, encode_frame


class AnsweringSocket:
    """Just enough of a socket: ``sendall`` answers each request frame in it, and the
    next ``recv`` returns the answers."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self.replies = b""

    def sendall(self, data: bytes) -> None:
        self.decoder.feed(data)
        while (request := self.decoder.next_frame()) is not NEED_DATA:
            request_id, op, _ = request
            self.replies += encode_frame([request_id, True, RESULTS[op]])

    def recv(self, size: int) -> bytes:
        replies, self.replies = self.replies[:size], self.replies[size:]
        return replies

    def settimeout(self, timeout: Any) -> None:
        pass

    def close(self) -> None:
        pass


def one_run(jobs: int) -> dict[str, float]:
    client = Client()
    client._sock = AnsweringSocket()  # type: ignore[assignment]
    client._kernel_timeouts = True  # as on a real connection: no settimeout per call
    body = b"x" * 100
    started = time.perf_counter()
    for _ in range(jobs):
        client.put("bench", body)
        (message,) = client.reserve("bench", wait=1)
        client.ack(message)
    elapsed = time.perf_counter() - started
    return job_rates(jobs, elapsed, "call")


def main() -> None:
    jobs_main(
        __doc__ or "",
        "blocking client call path (put, reserve, ack: 3 calls per job)",
        one_run,
    )


if __name__ == "__main__":
    main()
