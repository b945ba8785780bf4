"""Frames to throw at a running broker: a seeded generator (no I/O), for ``tests.soak fuzz``.

Each connection gets ``hello`` and then a stream of frames the broker answers one by one:
requests with a known (or unknown) op and arguments drawn from a pool of wrong types and
hostile values, and msgpack of the wrong shape. Last, on some connections, comes a frame
after which the broker closes the connection: a payload that is not msgpack (random bytes,
a request with bits flipped) or framing that lies (a length that promises more than comes,
a huge length, a cut-off header). Integers equal to
the ids to protect (a witness's messages) are never drawn, so the stream cannot cancel them.
"""

from __future__ import annotations

import random
import struct
from typing import Any, Final

import msgpack

from protocol import OPS

HEADER: Final = struct.Struct(">I")
ARGUMENTS: Final = (
    "queue", "queues", "messages", "message", "id", "lease", "items", "max", "wait",
    "visibility_timeout", "delay", "error", "reason", "settings", "state", "limit", "after",
    "ids", "timeout", "percent", "note", "name", "body", "cron", "every", "tz", "priority",
    "headers", "start_at", "end_at", "catchup", "overlap", "version", "client", "nope",
)  # fmt: skip
QUEUES: Final = ("fuzz.a", "fuzz.b", "fuzz:c", "f" * 200, "bad name!", "", "é")
VALUES: Final[tuple[Any, ...]] = (
    None, True, False, 0, 1, -1, 7, 2**31, 2**63 - 1, -(2**63), 1.5, -0.0,
    float("inf"), float("nan"), 1e300, "", "x", "a" * 300, "0 0 * * *", "@daily", "UTC",
    "Nowhere/Zone", "ready", "dead", b"", b"\x00" * 10, b"fuzz", [], [1, 2], [[1, 1]],
    [[1, 1, b"r"]], [{"body": b"fuzz"}], [{"body": b"fuzz", "priority": 2}], {},
    {"a": 1}, {"max_attempts": 0}, {"rate_limit": {"rate": 1}}, {"paused": True},
    {"body": b"fuzz", "delay": 0.01}, [[]] * 3, [None], {"x": [{}]},
)  # fmt: skip
OP_NAMES: Final = (*sorted(OPS - {"hello"}), "hello", "nope", "")


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


class FrameSource:
    """Seeded frames; ``protect`` holds integers never to draw (ids of a witness)."""

    def __init__(self, seed: int, protect: frozenset[int] = frozenset()) -> None:
        self.rng = random.Random(seed)
        self.protect = protect
        self.request_id = 0

    def connection(self, frames: int) -> tuple[bytes, int]:
        """The bytes of one connection: hello, then ``frames`` frames, sometimes a
        framing breaker at the end. Returns them and how many frames they hold."""
        parts = [frame(msgpack.packb([self._next_id(), "hello", {"version": 1}]))]
        for _ in range(frames):
            parts.append(self._frame())
        if self.rng.random() < 0.5:
            parts.append(self._breaker())
        return b"".join(parts), frames + 1

    def _next_id(self) -> int:
        self.request_id += 1
        return self.request_id

    def _frame(self) -> bytes:
        if self.rng.random() < 0.9:
            return frame(self._request())
        return frame(self._packed(self._value(depth=2)))

    def _request(self) -> bytes:
        op = self.rng.choice(OP_NAMES)
        args = {
            name: self._value() if name not in ("queue", "name") else self._queue()
            for name in self.rng.sample(ARGUMENTS, self.rng.randint(0, 5))
        }
        request_id: Any = self._next_id() if self.rng.random() < 0.95 else self._value()
        return self._packed([request_id, op, args])

    def _queue(self) -> Any:
        return self.rng.choice(QUEUES) if self.rng.random() < 0.8 else self._value()

    def _value(self, depth: int = 1) -> Any:
        value = self.rng.choice(VALUES)
        if type(value) is int and value in self.protect:
            return -value
        if depth > 1 and self.rng.random() < 0.3:
            return [self._value(depth - 1) for _ in range(self.rng.randint(0, 3))]
        return value

    @staticmethod
    def _packed(value: Any) -> bytes:
        packed: bytes = msgpack.packb(value, use_bin_type=True)
        return packed

    def _breaker(self) -> bytes:
        choice = self.rng.randrange(5)
        if choice == 3:
            return frame(self.rng.randbytes(self.rng.randint(0, 64)))
        if choice == 4:
            payload = bytearray(self._request())
            for _ in range(self.rng.randint(1, 3)):
                payload[self.rng.randrange(len(payload))] ^= 1 << self.rng.randrange(8)
            return frame(bytes(payload))
        if choice == 0:  # a length that promises more than comes
            return HEADER.pack(1000) + b"\x93\x01"
        if choice == 1:  # far over any max_frame
            return HEADER.pack(2**32 - 1)
        return HEADER.pack(10)[:3]  # a header cut short
