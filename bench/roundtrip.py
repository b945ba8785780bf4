"""End-to-end put -> reserve -> ack throughput against a real broker process.

    python -m bench.roundtrip [--messages N] [--producers P] [--workers W] [--batch B]

Starts a broker on a free port, then one producer process (P connections) and one worker
process (W connections), each an asyncio loop. Reports jobs/s from the first put to the last
ack, and checks that every message was acked exactly once. A first cut of the bench
harness: one run, no latency histograms.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import subprocess
import sys
import time
from typing import Any

import uvloop

from client import AsyncClient

QUEUE = "bench.roundtrip"


async def _produce(port: int, count: int, batch: int, connections: int) -> None:
    async def one(share: int) -> None:
        async with AsyncClient(port=port) as client:
            for start in range(0, share, batch):
                await client.put_many(QUEUE, [b"x" * 100] * min(batch, share - start))

    shares = [count // connections + (i < count % connections) for i in range(connections)]
    await asyncio.gather(*(one(share) for share in shares))


async def _consume(port: int, count: int, batch: int, connections: int) -> list[int]:
    seen: list[int] = []

    async def one() -> None:
        async with AsyncClient(port=port) as client:
            while len(seen) < count:
                messages = await client.reserve(QUEUE, max_messages=batch, wait=0.5)
                if messages:
                    await client.ack(messages)
                    seen.extend(message.id for message in messages)

    await asyncio.gather(*(one() for _ in range(connections)))
    return seen


def _run_producers(port: int, count: int, batch: int, connections: int) -> None:
    uvloop.run(_produce(port, count, batch, connections))


def _run_workers(port: int, count: int, batch: int, connections: int, out: Any) -> None:
    out.put(uvloop.run(_consume(port, count, batch, connections)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--producers", type=int, default=1, help="producer connections")
    parser.add_argument("--workers", type=int, default=8, help="worker connections")
    parser.add_argument("--batch", type=int, default=1, help="messages per put/reserve/ack")
    args = parser.parse_args()
    broker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "broker",
            "--port",
            "0",
            "--log-level",
            "warning",
            "--in-memory",
            "--metrics-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert broker.stdout is not None
        port = int(broker.stdout.readline().strip().rsplit(":", 1)[1])
        results: Any = multiprocessing.Queue()
        workers = multiprocessing.Process(
            target=_run_workers, args=(port, args.messages, args.batch, args.workers, results)
        )
        producers = multiprocessing.Process(
            target=_run_producers, args=(port, args.messages, args.batch, args.producers)
        )
        workers.start()
        started = time.perf_counter()
        producers.start()
        seen = results.get()
        elapsed = time.perf_counter() - started
        producers.join()
        workers.join()
    finally:
        broker.terminate()
        broker.wait()
    if len(seen) != args.messages or len(set(seen)) != args.messages:
        raise SystemExit(
            f"FAILED: {len(seen)} acks, {len(set(seen))} distinct, expected {args.messages}"
        )
    print(
        f"{args.messages} messages, {args.producers} producers, {args.workers} workers, "
        f"batch {args.batch}: {args.messages / elapsed:,.0f} jobs/s end to end "
        f"({elapsed:.2f}s), every message acked exactly once"
    )


if __name__ == "__main__":
    main()
