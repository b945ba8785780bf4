"""Fairness under a flood: other clients' put latency while one client pipelines without end.

    python -m bench.fairness [--fsync always] [--flood 200000] [--clients 4] [--puts 500]

Starts a broker (durable unless ``--fsync memory``), then measures the put-confirm latency
of ``--clients`` ordinary clients (each a serial loop of single puts, in a process of its
own) twice: alone, and while one more connection pipelines ``--flood`` puts as fast as
the socket takes them (a writer thread sends, a reader thread counts the replies). Reports
p50/p99/max of the ordinary puts in both phases (beside the flood: only those that
finished before its last reply), and the flood's rate.
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import struct
import threading
import time
from typing import Any

import msgpack

from client import Client

from ._sluice import SluiceServer

QUEUE = "bench.fairness"
FLOOD_QUEUE = "bench.flood"


def _frame(request: list[Any]) -> bytes:
    payload: bytes = msgpack.packb(request)
    return struct.pack(">I", len(payload)) + payload


def _ordinary(port: int, puts: int, out: Any) -> None:
    """Serial puts; reports (finished at, seconds) of each (the monotonic clock is the
    machine's, so processes compare)."""
    timings = []
    with Client("127.0.0.1", port, timeout=60) as client:
        for _ in range(puts):
            started = time.perf_counter()
            client.put(QUEUE, b"x" * 100)
            finished = time.perf_counter()
            timings.append((finished, finished - started))
    out.put(timings)


def _measure(port: int, clients: int, puts: int) -> list[tuple[float, float]]:
    results: Any = multiprocessing.Queue()
    processes = [
        multiprocessing.Process(target=_ordinary, args=(port, puts, results))
        for _ in range(clients)
    ]
    for process in processes:
        process.start()
    timings: list[tuple[float, float]] = []
    for _ in processes:
        timings += results.get()
    for process in processes:
        process.join()
    return timings


class Flood:
    """One connection that pipelines ``count`` puts without waiting for replies."""

    def __init__(self, port: int, count: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.count = count
        self.replies = 0
        self.sock.sendall(_frame([0, "hello", {"version": 1, "client": "flood"}]))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._writer = threading.Thread(target=self._write, daemon=True)

    def start(self) -> None:
        self.started = time.perf_counter()
        self._reader.start()
        self._writer.start()

    def _write(self) -> None:
        put = {"queue": FLOOD_QUEUE, "messages": [{"body": b"f" * 100}]}
        chunk = b"".join(_frame([n, "put", put]) for n in range(1, 1001))
        for _ in range(self.count // 1000):
            self.sock.sendall(chunk)

    def _read(self) -> None:
        buffer, offset = b"", 0  # replies are counted, not copied out one by one
        expected = (self.count // 1000) * 1000 + 1  # and the hello
        while self.replies < expected:
            data = self.sock.recv(1 << 16)
            if not data:
                return
            buffer = buffer[offset:] + data
            offset = 0
            while len(buffer) - offset >= 4:
                (length,) = struct.unpack_from(">I", buffer, offset)
                if len(buffer) - offset < 4 + length:
                    break
                offset += 4 + length
                self.replies += 1
        self.finished = time.perf_counter()

    def wait(self) -> float:
        self._reader.join()
        self.sock.close()
        return (self.replies - 1) / (self.finished - self.started)


def _summary(name: str, timings: list[tuple[float, float]], until: float | None = None) -> str:
    """Percentiles of the puts that finished before ``until`` (all if None)."""
    latencies = sorted(s for finished, s in timings if until is None or finished <= until)
    if not latencies:
        return f"{name:<22} no put finished in time"

    def at(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return (
        f"{name:<22} p50 {at(0.5):7.2f} ms   p99 {at(0.99):7.2f} ms   "
        f"max {latencies[-1] * 1000:7.2f} ms   ({len(latencies)} puts)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fsync", default="always", help="always, interval, never or memory")
    parser.add_argument("--flood", type=int, default=200_000, help="puts the flood pipelines")
    parser.add_argument("--clients", type=int, default=4, help="ordinary clients")
    parser.add_argument("--puts", type=int, default=500, help="puts per ordinary client")
    args = parser.parse_args()
    server = SluiceServer(args.fsync)
    server.start()
    try:
        print(f"broker: sluice {server.mode}; {args.clients} clients x {args.puts} serial puts")
        alone = _measure(server.port, args.clients, args.puts)
        print(_summary("alone", alone), flush=True)
        flood = Flood(server.port, args.flood)
        flood.start()
        beside = _measure(server.port, args.clients, args.puts)
        rate = flood.wait()
        # Only the puts that finished while the flood ran count as beside it.
        print(_summary("beside the flood", beside, flood.finished), flush=True)
        print(f"the flood: {args.flood:,} pipelined puts at {rate:,.0f} puts/s")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
