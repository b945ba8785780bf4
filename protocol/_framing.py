"""Length-prefixed msgpack frames: bytes in, decoded objects out. No I/O.

A frame is a 4-byte big-endian unsigned length N followed by N bytes holding exactly one
msgpack object. ``FrameDecoder`` is fed whatever bytes arrive, in any split, and hands back
whole decoded objects; ``encode_frame`` does the reverse.
"""

from __future__ import annotations

import struct
from typing import Any, Final

import msgpack

from ._errors import BadFrame, TooLarge

HEADER: Final = struct.Struct(">I")
HEADER_SIZE: Final = HEADER.size
DEFAULT_MAX_FRAME: Final = 16 * 1024 * 1024
_COPY_UP_TO: Final = 16 * 1024  # payload bytes a decoder copies rather than views


class _NeedData:
    """Sentinel: the decoder holds no complete frame yet; feed it more bytes."""

    _instance: _NeedData | None = None

    def __new__(cls) -> _NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()

# One Packer for every pack (msgpack.packb makes one per call). A Packer keeps its buffer
# as large as the largest object it packed, so it is replaced after one over this size.
_RENEW_AFTER: Final = 1 << 20


def _new_packer() -> msgpack.Packer:
    return msgpack.Packer(use_bin_type=True, autoreset=True)


_packer = _new_packer()


def pack(obj: Any) -> bytes:
    """msgpack-encode one object (str as str, bytes as bin)."""
    global _packer
    packed: bytes = _packer.pack(obj)
    if len(packed) > _RENEW_AFTER:
        _packer = _new_packer()  # drop the buffer that grew for it
    return packed


def encode_frame(obj: Any) -> bytes:
    """Return the frame (header + payload) that carries ``obj``."""
    payload = pack(obj)
    return HEADER.pack(len(payload)) + payload


def decode_payload(payload: bytes | bytearray | memoryview) -> Any:
    """Decode exactly one msgpack object; anything else is ``BadFrame``."""
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        # ExtraData, FormatError and StackError all derive from ValueError.
        raise BadFrame(f"frame payload is not one valid msgpack object: {exc}") from None


class FrameDecoder:
    """Incremental frame reader.

    Contract: after ``feed(data)``, call ``next_frame()`` until it returns ``NEED_DATA``.
    A frame whose header announces more than ``max_frame`` bytes raises ``TooLarge``
    before any of its payload is buffered; a payload that is not one msgpack object raises
    ``BadFrame``. After either error the stream is out of sync: the decoder refuses further
    use and the caller must drop the connection.
    """

    __slots__ = ("_broken", "_buffer", "_offset", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        # What arrived and is not yet decoded starts at `_offset`. The bytes one `feed`
        # brought are kept as they came while nothing else is buffered (a frame that
        # arrives whole, the usual case, is decoded without a copy); a second feed
        # before they are used up copies what is left into a bytearray and appends.
        self._buffer: bytes | bytearray = b""
        self._offset = 0
        self._broken = False
        self.max_frame = max_frame

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buffer) - self._offset

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._broken:
            raise BadFrame("decoder is broken by an earlier framing error")
        buffer, offset = self._buffer, self._offset
        if offset == len(buffer):  # everything before was used: start afresh
            self._buffer = data if type(data) is bytes else bytes(data)
            self._offset = 0
        elif type(buffer) is bytearray:
            if offset:
                del buffer[:offset]
                self._offset = 0
            buffer += data
        else:
            self._buffer = bytearray(memoryview(buffer)[offset:])
            self._buffer += data
            self._offset = 0

    def feed_and_next(self, data: bytes | bytearray | memoryview) -> Any:
        """``feed(data)``, then ``next_frame()``: the same result, errors and state after,
        on a shorter path when nothing is buffered and ``data`` is exactly one small whole
        frame (a reply to a lone request, the usual case)."""
        size = len(data) - HEADER_SIZE
        if self._offset == len(self._buffer) and 0 <= size <= _COPY_UP_TO and not self._broken:
            (length,) = HEADER.unpack_from(data)
            if length == size and length <= self.max_frame:
                try:
                    return decode_payload(data[HEADER_SIZE:])
                except BadFrame:
                    self._broken = True
                    raise
        self.feed(data)
        return self.next_frame()

    def next_frame(self) -> Any:
        """Return the next decoded object, or ``NEED_DATA``."""
        if self._broken:
            raise BadFrame("decoder is broken by an earlier framing error")
        buffer, start = self._buffer, self._offset
        if len(buffer) - start < HEADER_SIZE:
            return NEED_DATA
        (length,) = HEADER.unpack_from(buffer, start)
        if length > self.max_frame:
            self._broken = True
            raise TooLarge(f"frame of {length} bytes exceeds the maximum of {self.max_frame}")
        end = start + HEADER_SIZE + length
        if len(buffer) < end:
            return NEED_DATA
        self._offset = end
        start += HEADER_SIZE
        try:
            if length <= _COPY_UP_TO:  # a small copy costs less than a memoryview
                return decode_payload(buffer[start:end])
            with memoryview(buffer) as view:  # released: a bytearray may grow again
                return decode_payload(view[start:end])
        except BadFrame:
            self._broken = True
            raise
