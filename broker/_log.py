"""The write-ahead log: append-only segment files of CRC-framed records, no LMDB.

A segment is a file ``log-<number>.wal`` (numbers increase, 16 hex digits) in the data dir,
made at its full size before it is used (allocated with ``posix_fallocate``, or zero-filled
where the filesystem cannot, or an old checkpointed segment renamed), so an append never
grows the file and a full disk shows when a segment is made, not when a record is
written. Layout::

    header:  MAGIC (8 bytes) | u32 LOG_FORMAT | u32 0 | u64 segment number   (24 bytes)
    record:  u32 length | u32 crc | payload (length bytes)                     (repeated)

All integers big-endian. ``crc`` is CRC-32 over the segment number (u64), the length (u32)
and the payload: a record left over from the file's earlier life as another segment, or a
torn or zeroed one, fails it. A zero length, a length past the end of the file or a bad crc
ends the segment: what came before is the committed prefix (the LevelDB log's rule, without
its 32 KiB blocks: a record is never split across segments).

Contract: ``append`` writes one record where the last one ended; ``sync`` makes everything
appended so far durable. Only the writer thread appends, syncs and rotates.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

MAGIC: Final = b"SLUICEWL"
LOG_FORMAT: Final = 1
_HEADER: Final = struct.Struct(">8sIIQ")
_RECORD: Final = struct.Struct(">II")
_SEGMENT_ID: Final = struct.Struct(">Q")
HEADER_SIZE: Final = _HEADER.size
RECORD_OVERHEAD: Final = _RECORD.size
_ZEROS: Final = bytes(1 << 20)


class LogCorrupt(Exception):
    """A segment that is not a Sluice log, or of a format this version cannot read."""


def segment_name(number: int) -> str:
    return f"log-{number:016x}.wal"


def segment_numbers(directory: str) -> list[int]:
    """The numbers of the segments in ``directory``, in order."""
    numbers = []
    for name in os.listdir(directory):
        if name.startswith("log-") and name.endswith(".wal") and len(name) == 24:
            try:
                numbers.append(int(name[4:20], 16))
            except ValueError:
                continue
    return sorted(numbers)


def record_crc(number: int, payload: bytes | memoryview) -> int:
    seed = zlib.crc32(_SEGMENT_ID.pack(number) + len(payload).to_bytes(4, "big"))
    return zlib.crc32(payload, seed)


def frame_record(number: int, payload: bytes) -> bytes:
    """One record as it is written to segment ``number``."""
    return _RECORD.pack(len(payload), record_crc(number, payload)) + payload


def sync_directory(directory: str) -> None:
    """Make a file's creation, rename or removal in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_segment(directory: str, number: int, size: int, recycle: int | None = None) -> None:
    """Make segment ``number`` of ``size`` bytes, durable, ready to append to: rename the
    old segment ``recycle`` (its records then fail their crc) or allocate a new one (it
    reads as zeros). Raises ``OSError`` (ENOSPC on a full disk) and leaves no partial
    file."""
    path = os.path.join(directory, segment_name(number))
    if recycle is not None:
        os.rename(os.path.join(directory, segment_name(recycle)), path)
        fd = os.open(path, os.O_RDWR)
    else:
        fd = os.open(path + ".tmp", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if recycle is None:
            allocate(fd, size)
        os.pwrite(fd, _HEADER.pack(MAGIC, LOG_FORMAT, 0, number), 0)
        os.fdatasync(fd)
    except BaseException:
        os.close(fd)
        if recycle is None:
            os.unlink(path + ".tmp")
        raise
    os.close(fd)
    if recycle is None:
        os.rename(path + ".tmp", path)
    sync_directory(directory)


def allocate(fd: int, size: int) -> None:
    """Make the file of ``fd`` ``size`` bytes long, its blocks allocated (ENOSPC if the
    disk lacks them)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        _zero_fill(fd, size)  # a filesystem without fallocate


def _zero_fill(fd: int, size: int) -> None:
    offset = HEADER_SIZE
    while offset < size:
        chunk = min(len(_ZEROS), size - offset)
        os.pwrite(fd, _ZEROS[:chunk] if chunk < len(_ZEROS) else _ZEROS, offset)
        offset += chunk


@dataclass(slots=True)
class Segment:
    """An open segment being appended to."""

    number: int
    fd: int
    size: int
    end: int  # where the next record goes

    @property
    def room(self) -> int:
        return self.size - self.end


def open_segment(directory: str, number: int) -> Segment:
    """Open a prepared (empty) segment for appending."""
    fd = os.open(os.path.join(directory, segment_name(number)), os.O_RDWR)
    return Segment(number, fd, os.fstat(fd).st_size, HEADER_SIZE)


def append(segment: Segment, payload: bytes) -> None:
    """Write one record at the segment's end. The caller checked there is room. A write
    that fails leaves ``end`` where it was, so a retry overwrites the same bytes."""
    record = frame_record(segment.number, payload)
    written = os.pwrite(segment.fd, record, segment.end)
    if written != len(record):
        raise OSError(f"short write to log segment {segment.number}: {written} bytes")
    segment.end += len(record)


def sync(segment: Segment) -> None:
    os.fdatasync(segment.fd)


def read_segment(path: str, number: int) -> Iterator[bytes]:
    """The payloads of a segment's committed prefix, in order. Raises ``LogCorrupt`` if
    the file is not a segment of a format this version reads."""
    with open(path, "rb") as file:
        data = file.read()
    if len(data) < HEADER_SIZE:
        return  # made but never prepared (a crash mid-creation): holds nothing
    magic, version, _, stored_number = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise LogCorrupt(f"{path} is not a Sluice log segment")
    if version != LOG_FORMAT:
        raise LogCorrupt(
            f"{path} has log format {version}; this broker reads format {LOG_FORMAT}. Use "
            "the broker version that wrote it"
        )
    if stored_number != number:
        return  # renamed for recycling before its header was rewritten: holds nothing
    view = memoryview(data)
    offset = HEADER_SIZE
    while offset + RECORD_OVERHEAD <= len(data):
        length, crc = _RECORD.unpack_from(data, offset)
        start = offset + RECORD_OVERHEAD
        if length == 0 or start + length > len(data):
            return
        payload = view[start : start + length]
        if record_crc(number, payload) != crc:
            return
        yield bytes(payload)
        offset = start + length
