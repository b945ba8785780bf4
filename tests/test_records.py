"""Log records of every batch format this version reads, and message records of every
message format: each round-trips, and an older one reads as the same message."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker._lifecycle import State
from broker._message import RECOVERED, Message, PutSpec, Rare
from broker._queue import Queue
from broker._records import (
    BATCH_FORMAT,
    BINDING_RECORD,
    MESSAGE_FORMAT,
    Batch,
    StoreCorrupt,
    binding_key,
    decode_binding,
    decode_message,
    encode_message,
    unpack_batch,
)

BODIES = [(b"\x00" * 7 + b"\x01", b"\x02body")]  # formats 1 to 4: LMDB keys and values
SCHEDULES = [(b"q\x00nightly", b"record")]


def test_the_current_format_round_trips_bindings() -> None:
    batch = Batch(bodies=[(1, b"body")], schedules=SCHEDULES)
    batch.bindings = [(binding_key("orders.*", "audit"), BINDING_RECORD), (b"x\x00q", None)]
    again = unpack_batch(batch.pack())
    assert BATCH_FORMAT == 5
    assert [list(pair) for pair in again.bodies] == [[1, b"body"]]
    assert [list(pair) for pair in again.bindings] == [list(pair) for pair in batch.bindings]
    assert decode_binding(again.bindings[0][0], again.bindings[0][1]) == ("orders.*", "audit")


def test_a_queue_deleted_in_a_batch_round_trips_and_format_3_is_read() -> None:
    batch = Batch(queues=[(b"gone", None), (b"kept", b"record")])
    again = unpack_batch(batch.pack())
    assert [list(pair) for pair in again.queues] == [[b"gone", None], [b"kept", b"record"]]
    older = unpack_batch(msgpack.packb([3, BODIES, [], [], [(b"q", b"r")], [], [], None, [], []]))
    assert [list(pair) for pair in older.queues] == [[b"q", b"r"]]
    assert [list(pair) for pair in older.bodies] == [[1, b"body"]]


@pytest.mark.parametrize("version", [1, 2])
def test_older_formats_are_read_without_bindings(version: int) -> None:
    fields = [version, BODIES, [], [], [], [], [], None]
    if version == 2:
        fields.append(SCHEDULES)
    batch = unpack_batch(msgpack.packb(fields))
    assert [list(pair) for pair in batch.bodies] == [[1, b"body"]]
    assert len(batch.schedules) == (1 if version == 2 else 0)
    assert list(batch.bindings) == []


@pytest.mark.parametrize(
    "fields", [[6, [], [], [], [], [], [], None, [], []], [5, [], [], [], [], [], [], None, []]]
)
def test_unknown_formats_are_refused(fields: list[object]) -> None:
    with pytest.raises(StoreCorrupt):
        unpack_batch(msgpack.packb(fields))


# ------------------------------------------------------------------ message records

RARE_FIELDS = (
    "max_attempts",
    "visibility_timeout",
    "last_error",
    "dead_reason",
    "dead_at",
    "dead_expires_at",
    "headers",
    "key",
    "progress",
)
times = st.floats(min_value=0, max_value=4e9, allow_nan=False)
maybe_time = st.none() | times


@st.composite
def messages(draw: st.DrawFn) -> Message:
    """A message as the core may hold one in a stored state, any field set or not."""
    message = Message.__new__(Message)
    message.id = draw(st.integers(1, 2**63 - 1))
    message.queue = Queue(draw(st.sampled_from(["q", "emails", "é" * 200])))
    message.body = b"body"
    message.state = draw(st.sampled_from([State.READY, State.DELAYED, State.RESERVED, State.DEAD]))
    message.priority = draw(st.integers(-(2**31), 2**31 - 1))
    message.seq = draw(st.integers(0, 2**62))
    message.attempts = draw(st.integers(0, 1000))
    message.enqueued_at = draw(times)
    delayed, leased = message.state is State.DELAYED, message.state is State.RESERVED
    message.deadline = draw(times) if delayed or leased else None
    message.lease_token = draw(st.integers(1, 2**62)) if leased else None
    # (a message given back keeps its last lease's duration)
    message.lease_duration = (
        draw(st.floats(0.001, 1e6)) if leased else draw(st.sampled_from([0.0, 30.0]))
    )
    message.stored = RECOVERED
    message.rare = None
    if draw(st.booleans()):
        rare = message.rare = Rare()
        rare.max_attempts = draw(st.none() | st.integers(1, 1000))
        rare.visibility_timeout = draw(st.none() | st.floats(0.001, 1e6))
        rare.last_error = draw(st.none() | st.text(max_size=20))
        rare.dead_reason = draw(st.none() | st.text(max_size=20))
        rare.dead_at, rare.dead_expires_at = draw(maybe_time), draw(maybe_time)
        rare.headers = draw(st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5)))
        rare.key = draw(st.none() | st.text(max_size=20))
        rare.progress = draw(st.none() | st.tuples(st.floats(0, 100), st.text(max_size=10)))
    return message


def fields_of(message: Message) -> dict[str, Any]:
    names = [name for name in Message.__slots__ if name not in ("queue", "rare", "since")]
    fields = {name: getattr(message, name) for name in (*names, "due_at", "lease_deadline")}
    fields.update((name, getattr(message, name)) for name in RARE_FIELDS)
    return fields


def format_2(message: Message) -> bytes:
    """The record a broker before format 3 wrote (every field, the state by name)."""
    record = [2, message.queue.name, message.state.value, message.priority, message.seq]
    record += [message.attempts, message.max_attempts, message.visibility_timeout]
    record += [message.enqueued_at, message.due_at, message.lease_token]
    record += [message.lease_deadline, message.lease_duration, message.last_error]
    record += [message.dead_reason, message.dead_at, message.dead_expires_at]
    record += [message.headers, message.key]
    record.append(list(message.progress) if message.progress is not None else None)
    packed: bytes = msgpack.packb(record)
    return packed


@given(messages())
def test_a_message_record_round_trips_and_format_2_reads_the_same(message: Message) -> None:
    assert msgpack.unpackb(encode_message(message))[-1] is not None, "unset fields left off"
    for record in (encode_message(message), format_2(message)):
        queue_name, again = decode_message(message.id, message.body, record)
        assert queue_name == message.queue.name
        assert fields_of(again) == fields_of(message)
        assert (again.rare is None) == all(
            getattr(message, name) is None for name in RARE_FIELDS
        ), "a message with no rare field set gets none back"
        leased = message.lease_deadline is not None
        assert again.since == (
            message.lease_deadline - message.lease_duration if leased else message.enqueued_at
        )


def test_a_plain_ready_message_takes_seven_fields() -> None:
    message = Message(7, Queue("q"), PutSpec(body=b"x"), 1.5)
    message.state = State.READY
    record = msgpack.unpackb(encode_message(message))
    assert record == [MESSAGE_FORMAT, "q", 0, 0, 0, 0, 1.5]


@pytest.mark.parametrize(
    "record",
    [
        [],
        [MESSAGE_FORMAT],
        [MESSAGE_FORMAT, "q", 0, 0, 0, 0],  # one field short
        [MESSAGE_FORMAT, "q", 0, 0, 0, 0, 1.5, *[None] * 14],  # one field too many
        [4, "q", 0, 0, 0, 0, 1.5],
        [2, "q", "ready", 0],
        [2, "q", "nowhere", *[None] * 17],
        [1, "q", "ready", *[None] * 17],
        7,
        "text",
    ],
)
def test_a_message_record_of_no_known_format_is_refused(record: Any) -> None:
    with pytest.raises(StoreCorrupt, match="message 9"):
        decode_message(9, b"body", msgpack.packb(record))
