"""Micro-benchmark of the pure core's hot path: put, reserve, ack (no sockets).

    python -m bench.micro_core [--messages N] [--batch B] [--repeat R]

Prints operations per second for each phase, the median of R runs.
"""

from __future__ import annotations

import argparse
import time

from bench._report import report_medians
from broker import Core, PutSpec


def one_run(messages: int, batch: int) -> dict[str, float]:
    core = Core(random=lambda: 0.5)
    now = 1_000_000.0
    spec = PutSpec(body=b"x" * 100)
    started = time.perf_counter()
    for _ in range(messages // batch):
        core.put(now, "bench", [spec] * batch)
    put_done = time.perf_counter()
    leased: list[tuple[int, int]] = []
    for _ in range(messages // batch):
        leased.extend((m.id, m.lease_token or 0) for m in core.reserve(now, ["bench"], batch))
    reserve_done = time.perf_counter()
    for start in range(0, len(leased), batch):
        core.ack(now, leased[start : start + batch])
    ack_done = time.perf_counter()
    if core.messages:
        raise SystemExit(f"bench bug: {len(core.messages)} messages left after acking all")
    return {
        "put/s": messages / (put_done - started),
        "reserve/s": messages / (reserve_done - put_done),
        "ack/s": messages / (ack_done - reserve_done),
        "put+reserve+ack/s": messages / (ack_done - started),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1, help="messages per put/reserve/ack call")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    report_medians(
        f"core, {args.messages} messages, batch {args.batch}",
        lambda: one_run(args.messages, args.batch),
        args.repeat,
    )


if __name__ == "__main__":
    main()
