"""Micro-benchmark of the wire codec: encoding and decoding request frames.

    python -m bench.micro_codec [--frames N] [--repeat R]

Prints frames per second (median of R runs) for encode, decode fed whole, and decode fed
in 1,500-byte chunks (a typical TCP segment).
"""

from __future__ import annotations

import argparse
import time

from bench._report import report_medians
from protocol import NEED_DATA, FrameDecoder, encode_frame, parse_request


def one_run(frames: int) -> dict[str, float]:
    request = [1, "put", {"queue": "bench", "messages": [{"body": b"x" * 100, "priority": 3}]}]
    started = time.perf_counter()
    chunks = [encode_frame(request) for _ in range(frames)]
    encoded = time.perf_counter()
    stream = b"".join(chunks)
    decoder = FrameDecoder()
    decoder.feed(stream)
    count = 0
    while (frame := decoder.next_frame()) is not NEED_DATA:
        parse_request(frame)
        count += 1
    whole = time.perf_counter()
    decoder = FrameDecoder()
    for offset in range(0, len(stream), 1500):
        decoder.feed(stream[offset : offset + 1500])
        while (frame := decoder.next_frame()) is not NEED_DATA:
            parse_request(frame)
            count += 1
    chunked = time.perf_counter()
    if count != 2 * frames:
        raise SystemExit(f"bench bug: decoded {count} frames, expected {2 * frames}")
    return {
        "encode/s": frames / (encoded - started),
        "decode whole/s": frames / (whole - encoded),
        "decode 1500B chunks/s": frames / (chunked - whole),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    report_medians(
        f"codec, {args.frames} put frames of 100-byte bodies",
        lambda: one_run(args.frames),
        args.repeat,
    )


if __name__ == "__main__":
    main()
