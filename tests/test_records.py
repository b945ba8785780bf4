"""Log records of every batch format this version reads."""

from __future__ import annotations

import msgpack
import pytest

from broker._records import (
    BATCH_FORMAT,
    BINDING_RECORD,
    Batch,
    StoreCorrupt,
    binding_key,
    decode_binding,
    unpack_batch,
)

BODIES = [(b"\x00" * 8, b"\x02body")]
SCHEDULES = [(b"q\x00nightly", b"record")]


def test_the_current_format_round_trips_bindings() -> None:
    batch = Batch(bodies=BODIES, schedules=SCHEDULES)
    batch.bindings = [(binding_key("orders.*", "audit"), BINDING_RECORD), (b"x\x00q", None)]
    again = unpack_batch(batch.pack())
    assert BATCH_FORMAT == 4
    assert [list(pair) for pair in again.bindings] == [list(pair) for pair in batch.bindings]
    assert decode_binding(again.bindings[0][0], again.bindings[0][1]) == ("orders.*", "audit")


def test_a_queue_deleted_in_a_batch_round_trips_and_format_3_is_read() -> None:
    batch = Batch(queues=[(b"gone", None), (b"kept", b"record")])
    again = unpack_batch(batch.pack())
    assert [list(pair) for pair in again.queues] == [[b"gone", None], [b"kept", b"record"]]
    older = unpack_batch(msgpack.packb([3, BODIES, [], [], [(b"q", b"r")], [], [], None, [], []]))
    assert [list(pair) for pair in older.queues] == [[b"q", b"r"]]


@pytest.mark.parametrize("version", [1, 2])
def test_older_formats_are_read_without_bindings(version: int) -> None:
    fields = [version, BODIES, [], [], [], [], [], None]
    if version == 2:
        fields.append(SCHEDULES)
    batch = unpack_batch(msgpack.packb(fields))
    assert [list(pair) for pair in batch.bodies] == [list(pair) for pair in BODIES]
    assert len(batch.schedules) == (1 if version == 2 else 0)
    assert list(batch.bindings) == []


@pytest.mark.parametrize(
    "fields", [[5, [], [], [], [], [], [], None, [], []], [4, [], [], [], [], [], [], None, []]]
)
def test_unknown_formats_are_refused(fields: list[object]) -> None:
    with pytest.raises(StoreCorrupt):
        unpack_batch(msgpack.packb(fields))
