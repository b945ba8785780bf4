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
    assert BATCH_FORMAT == 3
    assert [list(pair) for pair in again.bindings] == [list(pair) for pair in batch.bindings]
    assert decode_binding(again.bindings[0][0], again.bindings[0][1]) == ("orders.*", "audit")


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
    "fields", [[4, [], [], [], [], [], [], None, [], []], [3, [], [], [], [], [], [], None, []]]
)
def test_unknown_formats_are_refused(fields: list[object]) -> None:
    with pytest.raises(StoreCorrupt):
        unpack_batch(msgpack.packb(fields))
