"""What a bench message carries, and the exactly-once check over what the workers acked.

Every body starts with a 16-byte header: the time it became due (CLOCK_MONOTONIC
nanoseconds, which every process on a Linux machine shares) and a token naming it. A token
is the producer connection's slot number (high bits) and the message's sequence number on
that connection (low bits), so producers never coordinate and the parent can tell each
message apart without keeping a list of what was put.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

HEADER = struct.Struct(">QQ")
MIN_BODY = HEADER.size
SEQ_BITS = 40
SEQ_MASK = (1 << SEQ_BITS) - 1


def now_ns() -> int:
    """System-wide monotonic clock: comparable between the bench's processes."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def token(slot: int, seq: int) -> int:
    return (slot << SEQ_BITS) | seq


def make_body(due_ns: int, message_token: int, padding: bytes) -> bytes:
    return HEADER.pack(due_ns, message_token) + padding


def read_body(body: bytes) -> tuple[int, int]:
    """(due_ns, token) of a bench body."""
    due_ns, message_token = HEADER.unpack_from(body)
    return due_ns, message_token


@dataclass(frozen=True, slots=True)
class Accounting:
    """How the acks compare with the puts. ``ok`` means each put was acked exactly once."""

    expected: int  # messages the producers had confirmed
    acks: int  # acks the workers had confirmed, duplicates included
    missing: int  # put but never acked
    duplicated: int  # acked more than once
    unknown: int  # acked, but never put (a corrupt or foreign body)

    @property
    def ok(self) -> bool:
        return self.missing == 0 and self.duplicated == 0 and self.unknown == 0

    def describe(self) -> str:
        if self.ok:
            return f"every message delivered and acked exactly once ({self.expected:,})"
        return (
            f"FAILED: {self.expected:,} put, {self.acks:,} acks: {self.missing:,} never acked, "
            f"{self.duplicated:,} acked more than once, {self.unknown:,} acked but never put"
        )


def account(put_counts: Mapping[int, int], acked_tokens: Iterable[int]) -> Accounting:
    """Check ``acked_tokens`` against ``put_counts`` (slot -> messages put on that slot,
    numbered 0..n-1). Ensures every token is counted once in exactly one of the figures."""
    seen = {slot: bytearray(n) for slot, n in put_counts.items()}
    acks = unknown = 0
    for message_token in acked_tokens:
        acks += 1
        counts = seen.get(message_token >> SEQ_BITS)
        seq = message_token & SEQ_MASK
        if counts is None or seq >= len(counts):
            unknown += 1
        elif counts[seq] < 255:
            counts[seq] += 1
    missing = sum(counts.count(0) for counts in seen.values())
    once = sum(counts.count(1) for counts in seen.values())
    expected = sum(put_counts.values())
    return Accounting(
        expected=expected,
        acks=acks,
        missing=missing,
        duplicated=expected - missing - once,
        unknown=unknown,
    )
