"""The store's records: how each piece of state is encoded as LMDB keys and values, and
how a batch of them travels in one log record. No I/O.

Message ids are 8-byte big-endian keys, so the message databases are in id order.

- ``bodies``: id -> ``RECORD_FORMAT`` byte + body. Written once, at put; deleted with the
  message.
- ``messages``: id -> msgpack ``[MESSAGE_FORMAT, queue, state code, priority, seq,
  attempts, enqueued_at, due_at, lease_token, lease_deadline, lease_duration,
  max_attempts, visibility_timeout, last_error, dead_reason, dead_at, dead_expires_at,
  headers, key, progress]``: the small record that reserve, nack, touch and expiry
  rewrite. Unset fields at the end are left off (``lease_duration`` 0 is unset), so a
  ready message without options has 7; the state code is the index in
  ``_STATE_CODES``. (Formats 1 and 2 had every field, in another order, with the state
  by name: they are still read.) ``seq`` orders ready messages of equal priority (and
  ties between equal deadlines), as in the core.
- ``queues``: name (UTF-8) -> msgpack ``[RECORD_FORMAT, settings map, totals map]``, while
  the queue is in use; deleted when the core forgets it (in a log record, value nil).
- ``results``: id -> msgpack ``[RECORD_FORMAT, queue, result, done_at, expires_at]``, the
  result an acked message left, until its queue's result TTL runs out.
- ``dedup``: queue + NUL + key -> msgpack ``[RECORD_FORMAT, message id, expires_at,
  ended_as]``: dedup keys whose message has ended (``ended_as``: done, dead or gone), until
  the queue's dedup window runs out. (Keys of live messages are in their records.)
- ``schedules``: queue + NUL + name -> msgpack ``[RECORD_FORMAT, spec map, created_at,
  [next_at, last_slot, last_message_id, runs, triggered, missed, skipped]]``.
- ``bindings``: pattern + NUL + queue -> msgpack ``[RECORD_FORMAT]``: a publish on a channel
  the pattern matches also puts a copy into the queue.
- ``meta``: ``b"format"`` -> the store's layout version; ``b"counters"`` -> msgpack
  ``[RECORD_FORMAT, id_ceiling, token_ceiling, event_ceiling]``: no id, lease token or job
  event seq at or above these has been handed out, so a recovered broker starts from them
  and never reuses one (older records lack the event ceiling: events start from 1).

Every record starts with its format version. A new format bumps ``RECORD_FORMAT`` and keeps
a reader for the old one.

A log record (``Batch.pack``) names messages by id and carries their bodies without the
prefix byte and their records as unpacked fields: the loop thread packs a batch in one
call, and the LMDB keys and values are made at the checkpoint, for the messages still
there (most are put and acked between two checkpoints, and never need them). Log formats
before 5 had them as LMDB keys and values; they are still read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from protocol import pack as _pack  # one shared Packer: a packb builds one per call

from ._lifecycle import DELAYED, READY, RESERVED, State
from ._message import RECOVERED, Headers, Message, Rare
from ._outcomes import DedupEntry, StoredResult
from ._schedules import FIELDS as SCHEDULE_FIELDS
from ._schedules import Schedule, parse_spec
from ._settings import QueueSettings

RECORD_FORMAT: Final = 2
MESSAGE_FORMAT: Final = 3  # of ``messages`` records alone (see the module's docstring)
READABLE: Final = (1, 2, 3)  # message record formats this version reads
BATCH_FORMAT: Final = 5  # the layout of a log record (``Batch.pack``)
# Fields per format: 1 had no schedules, 2 no bindings; 4 is 3 where a queue's value may be
# nil (delete it), so a version that cannot delete one refuses the log instead; 5 is 4
# with messages by id, their records unpacked (see the module's docstring).
_BATCH_FIELDS: Final = {1: 8, 2: 9, 3: 10, 4: 10, 5: 10}
_BY_KEY: Final = 4  # the last log format whose messages are LMDB keys and values
BODY_PREFIX: Final = bytes([RECORD_FORMAT])
_STATES: Final = {state.value: state for state in State}


class StoreError(Exception):
    """The data dir cannot be used; the message says why and what to do."""


class StoreCorrupt(StoreError):
    """A record the store cannot read: written by a newer version, or damaged."""


Pairs = Sequence[tuple[bytes, bytes]]
Optional = Sequence[tuple[bytes, bytes | None]]  # None: delete
Bodies = Sequence[tuple[int, bytes]]  # message id, body
States = Sequence[tuple[int, Any]]  # message id, its record's fields (``message_record``)


@dataclass(slots=True)
class Batch:
    """The records of one group commit: written to the log as one record, and later, with
    the other batches since the last checkpoint, to LMDB. ``number`` counts batches from 1
    in the order they were encoded; ``admitted`` is the space put admission counted for
    the puts in it; ``ceilings`` the id, token and event ceilings it raises (None: unchanged).
    Messages are by id (``deletes`` too); ``lmdb_bodies`` and ``lmdb_states`` give their
    LMDB keys and values. A batch is built whole and not changed after (a commit makes
    one: its fields default to a shared empty tuple, not a new list each)."""

    number: int = 0
    bodies: Bodies = ()
    states: States = ()
    deletes: Sequence[int] = ()
    queues: Optional = ()
    results: Optional = ()
    dedup: Optional = ()
    counters: bytes | None = None
    admitted: int = 0
    freed: int = 0  # the estimated size of the stored messages it deletes
    ceilings: tuple[int, int, int] | None = None
    schedules: Optional = ()
    bindings: Optional = ()

    def __len__(self) -> int:
        return (
            len(self.states)
            + len(self.deletes)
            + len(self.queues)
            + len(self.schedules)
            + len(self.bindings)
        )

    def pack(self) -> bytes:
        """The batch as one log record's payload."""
        fields = [
            BATCH_FORMAT,
            self.bodies,
            self.states,
            self.deletes,
            self.queues,
            self.results,
            self.dedup,
            self.counters,
            self.schedules,
            self.bindings,
        ]
        packed: bytes = _pack(fields)
        return packed


def lmdb_bodies(bodies: Bodies) -> Pairs:
    """``bodies`` as LMDB keys and values. Runs on the checkpoint thread (or in recovery)."""
    return [(message_key(message_id), BODY_PREFIX + body) for message_id, body in bodies]


def lmdb_states(states: States) -> Pairs:
    """``states`` as LMDB keys and values, on the checkpoint thread (or in recovery): with
    a packer of its own, not the loop's shared one."""
    pack = _checkpoint_packer.pack
    return [(message_key(message_id), pack(record)) for message_id, record in states]


_checkpoint_packer: Final = msgpack.Packer(use_bin_type=True, autoreset=True)


def unpack_batch(payload: bytes) -> Batch:
    fields = msgpack.unpackb(payload, use_list=False)
    if not fields or _BATCH_FIELDS.get(fields[0]) != len(fields):
        raise StoreCorrupt(f"log record format {fields[:1]} unknown")
    fields = (*fields, (), ())[:10]  # formats 1 and 2: no schedules, no bindings
    _, bodies, states, deletes, queues, results, dedup, counters, schedules, bindings = fields
    if fields[0] <= _BY_KEY:
        bodies, states, deletes = _by_id(bodies, states, deletes)
    return Batch(
        0,
        bodies,
        states,
        deletes,
        queues,
        results,
        dedup,
        counters,
        schedules=schedules,
        bindings=bindings,
    )


def _by_id(bodies: Pairs, states: Pairs, deletes: list[bytes]) -> tuple[Bodies, States, list[int]]:
    """The messages of a log record of format 4 or before (LMDB keys and values) as a
    format 5 record has them."""
    for key, body in bodies:
        if body[:1] != BODY_PREFIX:
            raise StoreCorrupt(f"message {key_id(key)}: body format {body[:1]!r} unknown")
    return (
        [(key_id(key), body[1:]) for key, body in bodies],
        [(key_id(key), msgpack.unpackb(value, use_list=False)) for key, value in states],
        [key_id(key) for key in deletes],
    )


def message_key(message_id: int) -> bytes:
    return message_id.to_bytes(8, "big")


def encode_queue(
    name: str, settings: dict[str, Any], totals: dict[str, int]
) -> tuple[bytes, bytes]:
    """A queue's record from its settings' wire form and its totals."""
    value: bytes = _pack([RECORD_FORMAT, settings, totals])
    return name.encode(), value


def encode_result(result: StoredResult) -> bytes:
    fields = [RECORD_FORMAT, result.queue, result.value, result.done_at, result.expires_at]
    value: bytes = _pack(fields)
    return value


def encode_dedup(entry: DedupEntry) -> bytes:
    fields = [RECORD_FORMAT, entry.message_id, entry.expires_at, entry.ended_as]
    value: bytes = _pack(fields)
    return value


def encode_counters(id_ceiling: int, token_ceiling: int, event_ceiling: int) -> bytes:
    value: bytes = _pack([RECORD_FORMAT, id_ceiling, token_ceiling, event_ceiling])
    return value


def estimate_size(body: bytes, headers: Headers | None) -> int:
    """A generous guess at the bytes a message takes in LMDB: body, record, tree pages."""
    size = len(body) + 256 + (64 * len(headers) if headers else 0)
    if size > 2000:  # stored on overflow pages of its own
        return (size // 4096 + 1) * 4096 + 256
    return size * 2


# Format 3 names a state by its number here: a small int decodes without a new object.
_STATE_CODES: Final = (State.READY, State.DELAYED, State.RESERVED, State.DEAD)
_CODE_OF: Final = {state: code for code, state in enumerate(_STATE_CODES)}
_FULL: Final = 20  # fields of a format 3 record with none left off
_LEAST: Final = 7  # ... with everything after ``enqueued_at`` left off
_NO_LEASE: Final = 11  # ... with nothing from ``due_at`` on: no deadline, lease or rare field
_PADDING: Final = tuple((None,) * (_FULL - length) for length in range(_FULL + 1))


def encode_message(message: Message) -> bytes:
    """The message's record in LMDB (see ``message_record``)."""
    packed: bytes = _pack(message_record(message))
    return packed


def message_record(message: Message) -> list[Any]:
    """Format 3: the fields every message has, then the rest in the order below, with the
    unset ones at the end left off (a ready message with no options: 7 fields). The two
    commonest records, a plain message ready or leased, take a short way."""
    state, deadline, rare = message.state, message.deadline, message.rare
    record = [
        MESSAGE_FORMAT,
        message.queue.name,
        _CODE_OF[state],
        message.priority,
        message.seq,
        message.attempts,
        message.enqueued_at,
    ]
    if rare is None:
        if state is READY and message.lease_token is None and not message.lease_duration:
            return record
        if state is RESERVED and message.lease_duration:
            record += (None, message.lease_token, deadline, message.lease_duration)
            return record
    record += (
        deadline if state is DELAYED else None,  # due_at
        message.lease_token,
        deadline if state is RESERVED else None,  # lease_deadline
        message.lease_duration or None,
    )
    if rare is not None:
        record += (
            rare.max_attempts,
            rare.visibility_timeout,
            rare.last_error,
            rare.dead_reason,
            rare.dead_at,
            rare.dead_expires_at,
            rare.headers,
            rare.key,
            list(rare.progress) if rare.progress is not None else None,
        )
    while record[-1] is None:
        record.pop()
    return record


def decode_message(message_id: int, body: bytes, value: bytes) -> tuple[str, Message]:
    """The message and its queue's name. ``since``, which the store does not keep, is set
    so that a recovered backlog never looks younger than it is: to ``enqueued_at``, or
    for a leased message to when its lease started or was last touched. Recovery calls
    this once per message, so it takes the fewest steps it can (most records are format
    3 with 7 fields)."""
    try:
        record = msgpack.unpackb(value, use_list=False)
        length = len(record)
        if length < _LEAST or record[0] != MESSAGE_FORMAT or length > _FULL:
            record = _older_record(message_id, record)
            length = len(record)
        (
            _,
            queue_name,
            code,
            priority,
            seq,
            attempts,
            enqueued_at,
            due_at,
            lease_token,
            lease_deadline,
            lease_duration,
            max_attempts,
            visibility_timeout,
            last_error,
            dead_reason,
            dead_at,
            dead_expires_at,
            headers,
            key,
            progress,
        ) = record + _PADDING[length]
        message = Message.__new__(Message)
        message.id = message_id
        message.body = body
        message.state = _STATE_CODES[code]
        message.priority = priority
        message.seq = seq
        message.attempts = attempts
        message.enqueued_at = enqueued_at
        message.deadline = due_at if due_at is not None else lease_deadline
        message.lease_token = lease_token
        message.lease_duration = lease_duration = lease_duration or 0.0
        message.since = enqueued_at if lease_deadline is None else lease_deadline - lease_duration
        message.stored = RECOVERED
        if length <= _NO_LEASE:
            message.rare = None
            return queue_name, message
        rare = message.rare = Rare()
        rare.max_attempts, rare.visibility_timeout = max_attempts, visibility_timeout
        rare.last_error, rare.dead_reason = last_error, dead_reason
        rare.dead_at, rare.dead_expires_at = dead_at, dead_expires_at
        rare.headers, rare.key = headers, key
        rare.progress = tuple(progress) if progress is not None else None
        return queue_name, message
    except (TypeError, ValueError, IndexError, KeyError) as error:  # (free until raised)
        raise StoreCorrupt(f"message {message_id}: record unreadable ({error})") from None


def _older_record(message_id: int, record: Any) -> tuple[Any, ...]:
    """A format 1 or 2 record as format 3 would hold it."""
    if not isinstance(record, tuple):
        raise StoreCorrupt(f"message {message_id}: record {record!r} is not a list")
    if record[:1] == (1,) and len(record) == 18:
        record = (*record, None, None)  # format 1: no dedup key, no progress
    elif record[:1] != (2,) or len(record) != _FULL or record[2] not in _STATES:
        raise StoreCorrupt(f"message {message_id}: record format {record[:1]} unknown")
    (_, queue_name, state, priority, seq, attempts, max_attempts, visibility_timeout) = record[:8]
    converted = [
        MESSAGE_FORMAT,
        queue_name,
        _CODE_OF[_STATES[state]],
        priority,
        seq,
        attempts,
        *record[8:12],
        record[12] or None,
        max_attempts,
        visibility_timeout,
        *record[13:],
    ]
    while converted[-1] is None:
        converted.pop()
    return tuple(converted)


def decode_queue(key: bytes, value: bytes) -> tuple[str, QueueSettings, dict[str, int]]:
    record = msgpack.unpackb(value)
    if not record or record[0] not in READABLE:
        raise StoreCorrupt(f"queue {key!r}: record format {record[:1]} unknown")
    _, settings, totals = record
    return key.decode(), QueueSettings().updated(settings), totals


def named_key(queue_name: str, name: str) -> bytes:
    """The LMDB key of something named within a queue: a dedup key, a schedule."""
    return queue_name.encode() + b"\x00" + name.encode()


def encode_schedule(schedule: Schedule) -> bytes:
    fields = [RECORD_FORMAT, schedule.spec.to_wire(), schedule.created_at, schedule.state()]
    value: bytes = _pack(fields)
    return value


def decode_schedule(key: bytes, value: bytes) -> Schedule:
    record = msgpack.unpackb(value)
    if not record or record[0] != RECORD_FORMAT or len(record) != 4:
        raise StoreCorrupt(f"schedule {key!r}: record format {record[:1]} unknown")
    _, wire, created_at, state = record
    queue_name, _, name = key.partition(b"\x00")
    fields = {field: value for field, value in wire.items() if field in SCHEDULE_FIELDS}
    fields = {field: value for field, value in fields.items() if value is not None}
    spec = parse_spec(fields, f"stored schedule {name.decode()!r}")
    return Schedule.restored(queue_name.decode(), name.decode(), spec, created_at, state)


def decode_result(key: bytes, value: bytes) -> tuple[int, StoredResult]:
    record = msgpack.unpackb(value)
    if not record or record[0] != RECORD_FORMAT:
        raise StoreCorrupt(f"result {key_id(key)}: record format {record[:1]} unknown")
    _, queue_name, result, done_at, expires_at = record
    return key_id(key), StoredResult(queue_name, result, done_at, expires_at)


def decode_dedup(key: bytes, value: bytes) -> tuple[str, str, DedupEntry]:
    record = msgpack.unpackb(value)
    if not record or record[0] != RECORD_FORMAT:
        raise StoreCorrupt(f"dedup key {key!r}: record format {record[:1]} unknown")
    queue_name, _, name = key.partition(b"\x00")
    return queue_name.decode(), name.decode(), DedupEntry(record[1], record[2], record[3])


def decode_counters(value: bytes) -> tuple[int, int, int]:
    """The id, token and event-seq ceilings (a record from before job events has no
    event ceiling: events then start from 1)."""
    record = msgpack.unpackb(value)
    if not record or record[0] not in READABLE:
        raise StoreCorrupt(f"counters: record format {record[:1]} unknown")
    events = int(record[3]) if len(record) > 3 else 1
    return int(record[1]), int(record[2]), events


def key_id(key: bytes) -> int:
    return int.from_bytes(key, "big")


def binding_key(pattern: str, queue: str) -> bytes:
    return pattern.encode() + b"\x00" + queue.encode()


BINDING_RECORD: Final = _pack([RECORD_FORMAT])


def decode_binding(key: bytes, value: bytes) -> tuple[str, str]:
    record = msgpack.unpackb(value)
    if not record or record[0] != RECORD_FORMAT:
        raise StoreCorrupt(f"binding {key!r}: record format {record[:1]} unknown")
    pattern, _, queue = key.partition(b"\x00")
    return pattern.decode(), queue.decode()
