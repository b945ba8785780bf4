"""The write-ahead store: every change is written to LMDB before its reply goes out.

The event loop turns the core's changes into a ``Batch`` of encoded records
(``Store.encode``, on the loop thread, because it reads live ``Message`` objects); the
writer thread writes a batch in one LMDB transaction (``Store.commit``). The server runs one
commit at a time and gathers the next batch while it runs: that is the group commit.

Layout: one LMDB environment in the data dir with six named databases. Message ids are
8-byte big-endian keys, so both message databases are in id order.

- ``bodies``: id -> ``FORMAT`` byte + body. Written once, at put; deleted with the message.
- ``messages``: id -> msgpack ``[FORMAT, queue, state, priority, seq, attempts,
  max_attempts, visibility_timeout, enqueued_at, due_at, lease_token, lease_deadline,
  lease_duration, last_error, dead_reason, dead_at, dead_expires_at, headers, key,
  progress]``: the small record that reserve, nack, touch and expiry rewrite. (Format 1
  records lack the last two fields; they are still read.) ``seq`` orders ready messages of
  equal priority (and ties between equal deadlines), as in the core.
- ``queues``: name (UTF-8) -> msgpack ``[FORMAT, settings map, totals map]``.
- ``results``: id -> msgpack ``[FORMAT, queue, result, done_at, expires_at]``, the result
  an acked message left, until its queue's result TTL runs out.
- ``dedup``: queue + NUL + key -> msgpack ``[FORMAT, message id, expires_at, ended_as]``:
  dedup keys whose message has ended (``ended_as``: done, dead or gone), until the
  queue's dedup window runs out. (Keys of live messages are in their records.)
- ``meta``: ``b"format"`` -> ``FORMAT``; ``b"counters"`` -> msgpack ``[FORMAT, next_id,
  next_token]`` (ids and lease tokens are never reused, even after every message is gone).

Every record starts with its format version. A new format bumps ``FORMAT`` and keeps a
reader for the old one.

Space: puts are admitted only while the estimated size of the data, including what is
being written, stays under the capacity minus a reserve (``StorageFull`` otherwise); acks,
nacks and other changes are always admitted, and the reserve is what they write into.
The capacity is ``--max-storage`` or what the disk has free, whichever is smaller. The LMDB
map starts small and doubles when a commit needs more room, up to the capacity.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Final

import lmdb
import msgpack

from protocol import StorageFull

from ._core import Changes, Core
from ._lifecycle import State
from ._logging import event
from ._message import Message, PutSpec
from ._outcomes import DedupEntry, StoredResult
from ._settings import QueueSettings

log = logging.getLogger("sluice.store")

FORMAT: Final = 2
_READABLE: Final = (1, 2)  # formats this version reads
_BODY_PREFIX: Final = bytes([FORMAT])
_MIN_MAP: Final = 64 * 1024 * 1024
_NO_LIMIT: Final = 1 << 46  # 64 TiB: the map never needs to be bigger than the disk
_MEASURE_EVERY: Final = 0.5  # seconds between space measurements when not near full
_STATES: Final = {state.value: state for state in State}
FSYNC_MODES: Final = ("always", "interval", "never")


class StoreError(Exception):
    """The data dir cannot be used; the message says why and what to do."""


class StoreLocked(StoreError):
    """Another broker holds the data dir."""


class StoreCorrupt(StoreError):
    """A record the store cannot read: written by a newer version, or damaged."""


@dataclass(slots=True)
class Batch:
    """Encoded records for one transaction. ``admitted`` is the space put admission
    counted for the puts in it."""

    bodies: list[tuple[bytes, bytes]] = field(default_factory=list)
    states: list[tuple[bytes, bytes]] = field(default_factory=list)
    deletes: list[bytes] = field(default_factory=list)
    queues: list[tuple[bytes, bytes]] = field(default_factory=list)
    results: list[tuple[bytes, bytes | None]] = field(default_factory=list)  # None: delete
    dedup: list[tuple[bytes, bytes | None]] = field(default_factory=list)  # None: delete
    counters: bytes = b""
    admitted: int = 0
    measured: bool = False  # the store measured its size right after writing this batch

    def __len__(self) -> int:
        return len(self.states) + len(self.deletes) + len(self.queues)


@dataclass(frozen=True, slots=True)
class Recovered:
    messages: int
    by_state: dict[str, int]
    queues: int
    seconds: float


def _key(message_id: int) -> bytes:
    return message_id.to_bytes(8, "big")


class Store:
    """An LMDB environment in ``path`` (created if missing), locked for this process.

    ``fsync``: ``always`` syncs every commit to disk (survives power loss); ``interval``
    and ``never`` only write to the OS (survive the broker being killed, not power loss),
    ``interval`` with a ``sync()`` the server calls every few milliseconds."""

    def __init__(self, path: str, *, fsync: str = "always", max_storage: int | None = None):
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {FSYNC_MODES}, got {fsync!r}")
        self.path = path
        self.fsync = fsync
        self.max_storage = max_storage
        self._cap = min(max_storage or _NO_LIMIT, _NO_LIMIT)  # the map never grows past it
        try:
            os.makedirs(path, exist_ok=True)
            self._lock_file = _lock_dir(path)
        except OSError as error:
            raise StoreError(f"cannot use data dir {path}: {error}") from error
        try:
            self._open(path)
        except BaseException as error:
            self._lock_file.close()
            if isinstance(error, OSError | lmdb.Error):
                raise StoreError(f"cannot open the store in {path}: {error}") from error
            raise

    def _open(self, path: str) -> None:
        data_file = os.path.join(path, "data.mdb")
        existing = os.path.getsize(data_file) if os.path.exists(data_file) else 0
        durable = self.fsync == "always"
        self.env = lmdb.open(
            path,
            map_size=max(min(_MIN_MAP, self._cap), existing),
            max_dbs=6,
            sync=durable,
            metasync=durable,
            readahead=False,
        )
        self._data_file = data_file
        self._bodies = self.env.open_db(b"bodies")
        self._states = self.env.open_db(b"messages")
        self._queues = self.env.open_db(b"queues")
        self._meta = self.env.open_db(b"meta")
        self._results = self.env.open_db(b"results")
        self._dedup = self.env.open_db(b"dedup")
        self._check_format()
        # Space accounting, in bytes. `used` is measured after some commits (writer thread);
        # `unmeasured` was admitted and committed since, `in_flight` admitted and encoded but
        # not yet committed, `pending` admitted but not yet encoded.
        self.used = 0
        self.unmeasured = 0
        self.capacity = 0
        self.pending = 0
        self.in_flight = 0
        self.commits = 0
        self._measure()

    # ----------------------------------------------------------- lifecycle

    def close(self) -> None:
        self.env.close()
        self._lock_file.close()

    def sync(self) -> None:
        """Flush what was committed to disk (``interval`` mode calls this periodically)."""
        self.env.sync(True)

    def _check_format(self) -> None:
        with self.env.begin(write=True, db=self._meta) as txn:
            stored = txn.get(b"format")
            if stored is None or msgpack.unpackb(stored) in _READABLE:
                txn.put(b"format", msgpack.packb(FORMAT))  # what it is once we write
                return
            version = msgpack.unpackb(stored)
            if version not in _READABLE:
                raise StoreCorrupt(
                    f"data dir {self.path} has format {version}; this broker reads format "
                    f"{FORMAT}. Use a broker version that matches the data"
                )

    # ------------------------------------------------------------ recovery

    def recover(self, core: Core, now: float) -> Recovered:
        """Load everything into an empty ``core`` (see ``Core.recover``)."""
        started = time.perf_counter()
        with self.env.begin() as txn:
            queues = [_decode_queue(key, value) for key, value in txn.cursor(self._queues)]
            counters = txn.get(b"counters", db=self._meta)
            next_id, next_token = _decode_counters(counters) if counters else (1, 1)
            results = [_decode_result(k, v) for k, v in txn.cursor(self._results)]
            dedup = [_decode_dedup(k, v) for k, v in txn.cursor(self._dedup)]
        # Nothing writes while recovering, so a second read transaction sees the same
        # data; this one reads through buffers into the map.
        with self.env.begin(buffers=True) as txn:
            # Streamed straight into the core: no list of every message on the side.
            core.recover(
                now,
                queues,
                self._read_messages(txn),
                next_id=next_id,
                next_token=next_token,
                results=results,
                dedup=dedup,
            )
        by_state = {
            state.value: sum(queue.counts[state] for queue in core.queues.values())
            for state in (State.READY, State.DELAYED, State.RESERVED, State.DEAD)
        }
        seconds = time.perf_counter() - started
        return Recovered(len(core.messages), by_state, len(queues), seconds)

    def _read_messages(self, txn: Any) -> Iterator[tuple[str, Message]]:
        """Walk the state and body databases side by side (both are in id order). Reads
        through buffers into the map, so each body is copied once, into its message."""
        bodies = txn.cursor(self._bodies)
        has_body = bodies.first()
        states = txn.cursor(self._states)
        has_state = states.first()
        while has_state:
            message_id = _id(states.key())
            while has_body and _id(bodies.key()) < message_id:
                orphan = _id(bodies.key())
                log.warning(
                    "dropping a body without a message record: id %d",
                    orphan,
                    extra=event("orphan_body_dropped", id=orphan),
                )
                has_body = bodies.next()
            if not has_body or _id(bodies.key()) != message_id:
                raise StoreCorrupt(f"message {message_id} has a record but no body")
            body = bodies.value()
            if body[:1] != _BODY_PREFIX:
                raise StoreCorrupt(f"message {message_id}: body format {bytes(body[:1])!r} unknown")
            yield _decode_message(message_id, bytes(body[1:]), states.value())
            has_body = bodies.next()
            has_state = states.next()

    # ------------------------------------------------------------- writing

    def admit_put(self, specs: list[PutSpec]) -> None:
        """Count the space ``specs`` will take, or raise ``StorageFull`` (nothing counted)."""
        self._admit(sum(_estimate(spec) for spec in specs), "")

    def admit_results(self, size: int, count: int) -> None:
        """The same for ``count`` ack results of ``size`` encoded bytes in all: results are
        new data, so they need room like puts (an ack without one never does)."""
        self._admit(size + 256 * count, "; an ack without a result needs no room")

    def _admit(self, need: int, advice: str) -> None:
        if self._estimate() + need > self.capacity:
            raise StorageFull(
                f"storage is full (about {self._estimate() // 1024} KiB used of "
                f"{self.capacity // 1024} KiB for messages): consume or purge messages, "
                f"or give the broker more space (--max-storage, or free disk){advice}"
            )
        self.pending += need

    def encode(self, changes: Changes) -> Batch:
        """Records for ``changes``. Runs on the loop thread: it reads live messages."""
        batch = Batch(admitted=self.pending)
        self.in_flight += self.pending
        self.pending = 0
        for message in changes.messages:
            key = _key(message.id)
            if message.state is State.GONE:
                if message.stored:
                    batch.deletes.append(key)
                continue
            if not message.stored:
                batch.bodies.append((key, _BODY_PREFIX + message.body))
                message.stored = True
            batch.states.append((key, _encode_message(message)))
        for queue in changes.queues:
            fields: list[Any] = [FORMAT, queue.settings.to_wire(), queue.totals]
            batch.queues.append((queue.name.encode(), msgpack.packb(fields)))
        for message_id, result in changes.results.items():
            stored = None
            if result is not None:
                fields = [FORMAT, result.queue, result.value, result.done_at, result.expires_at]
                stored = msgpack.packb(fields)
            batch.results.append((_key(message_id), stored))
        for (queue_name, dedup_key), entry in changes.dedup.items():
            stored = None
            if entry is not None:
                stored = msgpack.packb([FORMAT, entry.message_id, entry.expires_at, entry.ended_as])
            batch.dedup.append((_dedup_key(queue_name, dedup_key), stored))
        batch.counters = msgpack.packb([FORMAT, changes.next_id, changes.next_token])
        return batch

    def commit(self, batch: Batch) -> None:
        """Write ``batch`` in one transaction (writer thread). Grows the map if it must."""
        while True:
            try:
                self._write(batch)
                break
            except lmdb.MapFullError:
                self._grow()
        self.commits += 1
        # Measuring costs a read transaction and two syscalls: do it twice a second, or
        # after every commit once the store is within a fifth of its capacity.
        if time.monotonic() >= self._measure_due or self._estimate() * 5 >= self.capacity * 4:
            self._measure()
            batch.measured = True

    def _estimate(self) -> int:
        """Bytes the store holds or will, as far as put admission knows."""
        return self.used + self.unmeasured + self.in_flight + self.pending

    def committed(self, batch: Batch) -> None:
        """The loop thread's note that ``batch`` is on disk (batches are noted in order)."""
        self.in_flight -= batch.admitted
        if batch.measured:  # `used` counts this batch and every one before it
            self.unmeasured = 0
        else:
            self.unmeasured += batch.admitted

    def _write(self, batch: Batch) -> None:
        with self.env.begin(write=True) as txn:
            for key in batch.deletes:
                txn.delete(key, db=self._bodies)
                txn.delete(key, db=self._states)
            if batch.bodies:
                txn.cursor(self._bodies).putmulti(batch.bodies)
            if batch.states:
                txn.cursor(self._states).putmulti(batch.states)
            for key, value in batch.queues:
                txn.put(key, value, db=self._queues)
            for db, records in ((self._results, batch.results), (self._dedup, batch.dedup)):
                for key, record in records:
                    if record is None:
                        txn.delete(key, db=db)
                    else:
                        txn.put(key, record, db=db)
            txn.put(b"counters", batch.counters, db=self._meta)

    def _grow(self) -> None:
        size = self.env.info()["map_size"]
        limit = self._cap
        if size >= limit:
            raise StorageFull(
                f"the store reached its --max-storage of {limit} bytes while committing"
            )
        new_size = min(size * 2, limit)
        log.info(
            "growing the store's map from %d to %d MiB",
            size >> 20,
            new_size >> 20,
            extra=event("store_grown", from_mib=size >> 20, to_mib=new_size >> 20),
        )
        self.env.set_mapsize(new_size)

    def _measure(self) -> None:
        """Refresh ``used`` and ``capacity`` (called after each commit)."""
        with self.env.begin() as txn:
            pages = sum(
                stats["branch_pages"] + stats["leaf_pages"] + stats["overflow_pages"]
                for stats in (
                    txn.stat(self._bodies),
                    txn.stat(self._states),
                    txn.stat(self._queues),
                    txn.stat(self._meta),
                    txn.stat(self._results),
                    txn.stat(self._dedup),
                )
            )
        self._measure_due = time.monotonic() + _MEASURE_EVERY
        psize = self.env.stat()["psize"]
        self.used = pages * psize
        file_size = os.path.getsize(self._data_file)
        capacity = file_size + shutil.disk_usage(self.path).free
        if self.max_storage is not None:
            capacity = min(capacity, self.max_storage)
        # Kept back for what must never fail: acks, nacks, expiries (LMDB copies on write).
        self.capacity = capacity - max(1 << 20, min(64 << 20, capacity // 20))


def _estimate(spec: PutSpec) -> int:
    """A generous guess at the bytes a message takes in LMDB: body, record, tree pages."""
    size = len(spec.body) + 256 + (64 * len(spec.headers) if spec.headers else 0)
    if size > 2000:  # stored on overflow pages of its own
        return (size // 4096 + 1) * 4096 + 256
    return size * 2


def _encode_message(message: Message) -> bytes:
    record: bytes = msgpack.packb(
        [
            FORMAT,
            message.queue.name,
            message.state.value,
            message.priority,
            message.seq,
            message.attempts,
            message.max_attempts,
            message.visibility_timeout,
            message.enqueued_at,
            message.due_at,
            message.lease_token,
            message.lease_deadline,
            message.lease_duration,
            message.last_error,
            message.dead_reason,
            message.dead_at,
            message.dead_expires_at,
            message.headers,
            message.key,
            list(message.progress) if message.progress is not None else None,
        ]
    )
    return record


def _decode_message(message_id: int, body: bytes, value: bytes) -> tuple[str, Message]:
    record = msgpack.unpackb(value)
    if record and record[0] == 1 and len(record) == 18:
        record = [*record, None, None]  # format 1: no dedup key, no progress
    elif not record or record[0] != FORMAT or len(record) != 20:
        raise StoreCorrupt(f"message {message_id}: record format {record[:1]} unknown")
    (
        _,
        queue_name,
        state,
        priority,
        seq,
        attempts,
        max_attempts,
        visibility_timeout,
        enqueued_at,
        due_at,
        lease_token,
        lease_deadline,
        lease_duration,
        last_error,
        dead_reason,
        dead_at,
        dead_expires_at,
        headers,
        key,
        progress,
    ) = record
    message = Message.__new__(Message)
    message.id = message_id
    message.body = body
    message.state = _STATES[state]
    message.priority = priority
    message.seq = seq
    message.attempts = attempts
    message.max_attempts = max_attempts
    message.visibility_timeout = visibility_timeout
    message.enqueued_at = enqueued_at
    message.due_at = due_at
    message.lease_token = lease_token
    message.lease_deadline = lease_deadline
    message.lease_duration = lease_duration
    message.last_error = last_error
    message.dead_reason = dead_reason
    message.dead_at = dead_at
    message.dead_expires_at = dead_expires_at
    message.headers = headers
    message.key = key
    message.progress = tuple(progress) if progress is not None else None
    message.stored = True
    return queue_name, message


def _decode_queue(key: bytes, value: bytes) -> tuple[str, QueueSettings, dict[str, int]]:
    record = msgpack.unpackb(value)
    if not record or record[0] not in _READABLE:
        raise StoreCorrupt(f"queue {key!r}: record format {record[:1]} unknown")
    _, settings, totals = record
    return key.decode(), QueueSettings().updated(settings), totals


def _dedup_key(queue_name: str, key: str) -> bytes:
    return queue_name.encode() + b"\x00" + key.encode()


def _decode_result(key: bytes, value: bytes) -> tuple[int, StoredResult]:
    record = msgpack.unpackb(value)
    if not record or record[0] != FORMAT:
        raise StoreCorrupt(f"result {_id(key)}: record format {record[:1]} unknown")
    _, queue_name, result, done_at, expires_at = record
    return _id(key), StoredResult(queue_name, result, done_at, expires_at)


def _decode_dedup(key: bytes, value: bytes) -> tuple[str, str, DedupEntry]:
    record = msgpack.unpackb(value)
    if not record or record[0] != FORMAT:
        raise StoreCorrupt(f"dedup key {key!r}: record format {record[:1]} unknown")
    queue_name, _, dedup_key = key.partition(b"\x00")
    return queue_name.decode(), dedup_key.decode(), DedupEntry(record[1], record[2], record[3])


def _decode_counters(value: bytes) -> tuple[int, int]:
    record = msgpack.unpackb(value)
    if not record or record[0] not in _READABLE:
        raise StoreCorrupt(f"counters: record format {record[:1]} unknown")
    return int(record[1]), int(record[2])


def _id(key: bytes) -> int:
    return int.from_bytes(key, "big")


def _lock_dir(path: str) -> IO[str]:
    """Take the data dir's lock for as long as the returned file stays open."""
    lock_file = open(os.path.join(path, "sluice.lock"), "a+")  # noqa: SIM115 - held open
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "unknown"
        lock_file.close()
        if error.errno in (errno.EAGAIN, errno.EACCES):
            raise StoreLocked(
                f"data dir {path} is in use by another broker (pid {holder}); stop it, or "
                "give this one another --data-dir"
            ) from None
        raise
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(f"{os.getpid()}\n")
    lock_file.flush()
    return lock_file
