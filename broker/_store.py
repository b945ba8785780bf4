"""The write-ahead store: a log for every change, LMDB as the checkpointed state.

The event loop turns the core's changes into a ``Batch`` of encoded records
(``Store.encode``: it reads live ``Message`` objects) and appends the batch to the log as
one CRC-framed record, synced with ``fsync always`` (``Store.commit``): one ``fdatasync``
per group commit, made by the loop thread (or, split into ``append`` and ``appended``,
by the kernel's background sync between the two: see ``_server``). Batches since the
last checkpoint are coalesced in memory, per segment (a message put and acked between
two checkpoints leaves nothing); every ``checkpoint_seconds`` or ``checkpoint_bytes`` of
log the loop closes the current segment and the checkpoint thread writes the closed
segments' changes to LMDB in one synced transaction, after which those segments are
recycled. The same thread prepares the next segment ahead of need.

Recovery: apply the log's committed prefix (``_log.read_segment``) to LMDB in one synced
transaction (records are blind writes, so applying one twice is harmless), then load LMDB
into the core. Crash points and what they leave: before or during a checkpoint's
transaction, LMDB without it and the log with it; after it, both; the log before it is
only recycled once the transaction is durable.

Layout of the data dir: ``data.mdb`` (LMDB, the databases and records of ``_records``),
``log-*.wal`` (``_log``), ``sluice.lock``. ``meta/format`` holds ``STORE_FORMAT``; a data
dir of format 1 or 2 (LMDB alone, no log), 3 (the same, but message records of
format 2 alone) or 4 (log records of format 4) is upgraded in place on open: only the
format is written, as the older records are still read and each is rewritten in the new
format when it next changes (a log's older records are read as they are, and new ones
follow them in the new format).

Ids, lease tokens and job event seqs: the counters record holds ceilings, raised
``COUNTER_BLOCK`` ahead of what the core has handed out, so a lease token may go out
before the commit that holds its lease, and a recovered broker starts at the ceilings:
nothing is ever reused.

Space: puts are admitted only while the estimated size of the data, including what is
being written, stays under the capacity minus a reserve (``StorageFull`` otherwise), and
while the log could prepare its next segment; acks, nacks and other changes are always
admitted, and the reserve and the prepared segment are what they write into. The capacity
is ``--max-storage`` or what the disk has free, whichever is smaller. The LMDB map starts
small and doubles when a checkpoint needs more room, up to the capacity.

A full disk (another process took what admission counted on): a checkpoint needs LMDB
pages before the acks it writes free any, and the log recycles a segment only once it is
checkpointed, so the two would wait on each other until the log ran out of segments and
every commit failed, its replies held for ever. ``space.reserve`` holds the room the
capacity keeps for the log's next two segments as a real, allocated file; a commit that
finds no room for its next segment, or a checkpoint (or recovery) that finds none for its
pages, gives it up. It is made again once the disk has room.

A checkpoint (or recovery's application of the log) that does not fit in one transaction,
on a full disk or with the map at its cap, is written in pieces, each a transaction that
frees pages for the next (``_write_in_pieces``): the map at its cap must not stop
checkpoints, or the log would grow past ``--max-storage`` without end and a restart
could not apply it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import functools
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Final, TypeVar

import lmdb
import msgpack

from protocol import StorageFull

from . import _log
from ._core import Changes, Core
from ._lifecycle import GONE, State
from ._logging import event
from ._message import NOT_STORED, Message, PutSpec
from ._records import (
    BINDING_RECORD,
    READABLE,
    RECORD_FORMAT,
    Batch,
    StoreCorrupt,
    StoreError,
    binding_key,
    decode_binding,
    decode_counters,
    decode_dedup,
    decode_message,
    decode_queue,
    decode_result,
    decode_schedule,
    encode_counters,
    encode_dedup,
    encode_queue,
    encode_result,
    encode_schedule,
    estimate_size,
    key_id,
    lmdb_bodies,
    lmdb_states,
    message_key,
    message_record,
    named_key,
    unpack_batch,
)
from ._settings import QueueSettings

__all__ = ["Batch", "Recovered", "Store", "StoreCorrupt", "StoreError", "StoreLocked"]

log = logging.getLogger("sluice.store")

# LMDB + log; 1 and 2 were LMDB alone, 3 had message records of format 2, 4 log records of
# format 4 (messages by LMDB key and value)
STORE_FORMAT: Final = 5
_UPGRADABLE: Final = (1, 2, 3, 4)
COUNTER_BLOCK: Final = 1 << 16  # ids and tokens reserved ahead of use
_MIN_MAP: Final = 64 * 1024 * 1024
_NO_LIMIT: Final = 1 << 46  # 64 TiB: the map never needs to be bigger than the disk
_MEASURE_EVERY: Final = 0.5  # seconds between free-space measurements
_MEASURE_ON_ADMIT: Final = 0.05  # ... when puts are coming in
_RETRY_CHECKPOINT_AFTER: Final = 1.0
_SPARE_SEGMENTS: Final = 2  # checkpointed segments kept to be recycled
_MIN_SEGMENT: Final = 64 << 10
T = TypeVar("T")
_END: Final = (None, b"")
# Records a checkpoint writes between releases of memory (``_count_written``).
_RELEASE_MAP_EVERY: Final = 1 << 14
# Records recovery reads between drops of LMDB's pages, without a heap trim (one costs
# ~4 ms there: 0.3 s of a 1M recovery at 16,384 records).
_RELEASE_READ_EVERY: Final = 1 << 16
_MADV_DONTNEED: Final = 4
_PUT_CHUNK: Final = 128  # records per putmulti in a checkpoint
_PIECE: Final = 256  # records per transaction when one for the whole batch has no room
_CHECKPOINT_WAIT: Final = 5.0  # seconds a clean shutdown waits for its checkpoint
RESERVE_NAME: Final = "space.reserve"  # disk space held for the log, given up when full
FSYNC_MODES: Final = ("always", "interval", "never")


class StoreLocked(StoreError):
    """Another broker holds the data dir."""


@dataclass(frozen=True, slots=True)
class Recovered:
    messages: int
    by_state: dict[str, int]
    queues: int
    seconds: float
    log_records: int = 0  # log records applied to LMDB before loading


@dataclass(slots=True)
class Coalesced:
    """The batches since the last checkpoint, folded into the net change per key, messages
    by id (the last write wins; a body written and deleted since leaves nothing)."""

    bodies: dict[int, bytes] = field(default_factory=dict)  # by message id, as in a Batch
    states: dict[int, Any] = field(default_factory=dict)
    deletes: set[int] = field(default_factory=set)
    queues: dict[bytes, bytes | None] = field(default_factory=dict)  # None: delete
    results: dict[bytes, bytes | None] = field(default_factory=dict)
    dedup: dict[bytes, bytes | None] = field(default_factory=dict)
    schedules: dict[bytes, bytes | None] = field(default_factory=dict)
    bindings: dict[bytes, bytes | None] = field(default_factory=dict)
    counters: bytes | None = None
    log_bytes: int = 0
    admitted: int = 0  # admitted less freed: what `Store.unmeasured` counts for these
    batches: int = 0

    def add(self, batch: Batch, log_bytes: int) -> None:
        """Fold in the next batch (once per commit: the rarely changed kinds are tested
        first)."""
        self._fold(batch.deletes, batch.bodies, batch.states, batch.queues, batch)
        if batch.results:
            self.results.update(batch.results)
        if batch.dedup:
            self.dedup.update(batch.dedup)
        if batch.schedules:
            self.schedules.update(batch.schedules)
        if batch.bindings:
            self.bindings.update(batch.bindings)
        self.log_bytes += log_bytes
        self.admitted += batch.admitted - batch.freed
        self.batches += 1

    def merge(self, later: Coalesced) -> None:
        """Fold in what came after these batches."""
        self._fold(later.deletes, later.bodies.items(), later.states.items(), (), later)
        self.queues.update(later.queues)
        self.results.update(later.results)
        self.dedup.update(later.dedup)
        self.schedules.update(later.schedules)
        self.bindings.update(later.bindings)
        self.log_bytes += later.log_bytes
        self.admitted += later.admitted
        self.batches += later.batches

    def _fold(
        self,
        deletes: Iterable[int],
        bodies: Iterable[tuple[int, bytes]],
        states: Iterable[tuple[int, Any]],
        queues: Iterable[tuple[bytes, bytes | None]],
        later: Batch | Coalesced,
    ) -> None:
        for key in deletes:
            if self.bodies.pop(key, None) is None:
                self.deletes.add(key)  # in LMDB already: delete it there
            self.states.pop(key, None)
        self.bodies.update(bodies)
        self.states.update(states)
        self.queues.update(queues)
        if later.counters is not None:
            self.counters = later.counters

    def as_batch(self) -> Batch:
        return Batch(
            0,
            list(self.bodies.items()),
            list(self.states.items()),
            sorted(self.deletes),  # in id (key) order: each leaf read once, in one stretch
            list(self.queues.items()),
            list(self.results.items()),
            list(self.dedup.items()),
            self.counters,
            schedules=list(self.schedules.items()),
            bindings=list(self.bindings.items()),
        )


@dataclass(slots=True)
class _Checkpoint:
    changes: Coalesced
    segments: list[int]  # the log segments it makes redundant


@dataclass(frozen=True, slots=True)
class _Spare:
    number: int  # the segment to prepare ahead of need


class Store:
    """A data dir (created if missing), locked for this process, recovered with
    ``recover`` before anything else.

    ``fsync``: ``always`` syncs the log at every commit (survives power loss);
    ``interval`` and ``never`` only write to the OS (survive the broker being killed, not
    power loss), ``interval`` with a ``sync()`` the server calls every few milliseconds.
    Checkpoints are synced in every mode, so LMDB is never left corrupt.

    Threads: everything public on one thread (the loop's); checkpoints, and preparing
    the log's next segment, on a thread of the store's own."""

    def __init__(
        self,
        path: str,
        *,
        fsync: str = "always",
        max_storage: int | None = None,
        segment_size: int = 8 << 20,
        checkpoint_bytes: int = 4 << 20,
        checkpoint_seconds: float = 1.0,
        initial_map: int = _MIN_MAP,
    ):
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {FSYNC_MODES}, got {fsync!r}")
        self.path = path
        self.fsync = fsync
        self.max_storage = max_storage
        self._segment_size_wanted = segment_size
        self.segment_size = segment_size  # made to fit the space in `_open`
        self.checkpoint_bytes = checkpoint_bytes
        self.checkpoint_seconds = checkpoint_seconds
        self._cap = min(max_storage or _NO_LIMIT, _NO_LIMIT)  # the map never grows past it
        self._initial_map = initial_map
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
        # Checkpoints are always synced: LMDB unsynced may be corrupt after a power cut.
        self.env = lmdb.open(
            path,
            map_size=max(min(self._initial_map, self._cap), existing),
            max_dbs=8,
            sync=True,
            metasync=True,
            readahead=False,
        )
        self._data_file = data_file
        # A small disk or --max-storage gets small segments: the log's two take an 8th.
        self._reserve_file = os.path.join(path, RESERVE_NAME)
        room = existing + shutil.disk_usage(path).free + self._reserve_size()
        if self.max_storage is not None:
            room = min(room, self.max_storage)
        self.segment_size = max(_MIN_SEGMENT, min(self._segment_size_wanted, room // 16))
        self.checkpoint_bytes = min(self.checkpoint_bytes, self.segment_size // 2)
        self._bodies = self.env.open_db(b"bodies")
        self._states = self.env.open_db(b"messages")
        self._queues = self.env.open_db(b"queues")
        self._meta = self.env.open_db(b"meta")
        self._results = self.env.open_db(b"results")
        self._dedup = self.env.open_db(b"dedup")
        self._schedules = self.env.open_db(b"schedules")
        self._bindings = self.env.open_db(b"bindings")
        self.upgraded_from = self._check_format()
        # Batches: `encoded` numbered on the loop thread, `durable` the last committed.
        self.encoded = 0
        self.durable = 0
        self._id_ceiling = self._token_ceiling = self._event_ceiling = 0
        # Each queue's settings in wire form, as of the settings object they came from.
        self._settings_wire: dict[str, tuple[QueueSettings, dict[str, Any]]] = {}
        self.durable_token_ceiling = 0
        # Space accounting, in bytes (loop thread). `used` is LMDB as measured after the
        # last checkpoint; `unmeasured` was committed since, `in_flight` encoded but not
        # yet committed, `pending` admitted but not yet encoded.
        self.used = 0
        self.unmeasured = 0
        self.capacity = 0
        self.pending = 0
        self.in_flight = 0
        self.commits = 0
        self._appended_bytes = 0  # the log bytes of the batch `append` wrote last
        # (batch number, segment number, offset) of the record `append` wrote last, until
        # `appended`: a retry of the same batch goes there again.
        self._unsynced: tuple[int, int, int] | None = None
        # Puts were refused for size: they stay refused until the estimate is a margin
        # below the capacity (``_refusal``).
        self._refusing = False
        self.checkpoints = 0
        self._unreleased = 0  # records written since LMDB's pages were last dropped
        self._measurements: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        self._measure_due = 0.0
        self._admit_measure_due = 0.0
        self._disk_free = 1 << 62  # as last measured
        self.disk_full: str | None = None  # why the log could not prepare a segment
        self._reserve_lock = threading.Lock()  # taken to make or give up the reserve
        self.checkpoint_error: str | None = None
        # The log, as the committing thread sees it.
        self._segment: _log.Segment | None = None
        self._spare: int | None = None  # number of a prepared segment, not yet in use
        self._coalesced = Coalesced()  # the current segment's batches
        self._closed = Coalesced()  # those of the closed segments not yet checkpointed
        self._unchecked: list[int] = []  # the numbers of those segments
        self._checkpoint_started = time.monotonic()
        self._checkpoint_running = threading.Event()
        # Checkpoint thread: takes jobs (a checkpoint, or None to stop) in order.
        self._recyclable: list[int] = []  # checkpointed segments; guarded by _recycle_lock
        self._recycle_lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Checkpoint | _Spare | None] = queue.SimpleQueue()
        self._spare_lock = threading.Lock()  # held while the spare is made or taken
        self._spare_requested: int | None = None
        self._checkpointer: threading.Thread | None = None
        # Fault hook for tests: called with the name of each checkpoint step as it is
        # reached ("started", "writing" inside the transaction, "written", "dropped").
        self.at_checkpoint_step: Callable[[str], None] = _no_fault

    # ----------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Stop the checkpoint thread and close."""
        if self._checkpointer is not None:
            self._jobs.put(None)
            self._checkpointer.join()
            self._checkpointer = None
        if self._segment is not None:
            os.close(self._segment.fd)
            self._segment = None
        self.env.close()
        self._lock_file.close()

    def checkpoint_now(
        self, counters: tuple[int, int, int] | None = None, timeout: float = _CHECKPOINT_WAIT
    ) -> bool:
        """Write everything committed so far to LMDB and recycle the log (a clean
        shutdown, tests). On a clean shutdown ``counters`` are the core's next id,
        token and event seq: nothing above them was handed out, so the next start goes on from them
        instead of the ceilings. Returns False, leaving the log to the next start, if
        that took longer than ``timeout`` (checkpoints failing: a full disk)."""
        deadline = time.monotonic() + timeout
        if self._segment is None or not self._wait_for_checkpoint(deadline):
            return False
        if not self._wait_for_spare(deadline):
            return False
        if counters is not None:
            self._coalesced.counters = encode_counters(*counters)
            self._coalesced.batches += 1
        self._start_checkpoint()
        return self._wait_for_checkpoint(deadline)

    def _wait_for_checkpoint(self, deadline: float) -> bool:
        """Until the running checkpoint (if any) is done; False if past ``deadline``."""
        while self._checkpoint_running.is_set():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def _wait_for_spare(self, deadline: float) -> bool:
        """Until the next segment is prepared; False if the disk has no room for it or
        ``deadline`` passed."""
        assert self._segment is not None
        number = self._segment.number + 1
        self._request_spare(number)
        while self._spare != number:
            if self.disk_full is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def sync(self) -> None:
        """Flush what was committed to disk (``interval`` mode calls it periodically)."""
        if self._segment is not None:
            _log.sync(self._segment)

    def _check_format(self) -> int | None:
        """Write ``STORE_FORMAT`` into a new or older data dir; returns the format it was
        upgraded from (None if new or current). Refuses a newer one."""
        with self.env.begin(write=True, db=self._meta) as txn:
            stored = txn.get(b"format")
            version = None if stored is None else msgpack.unpackb(stored)
            if version == STORE_FORMAT:
                return None
            if version is not None and version not in _UPGRADABLE:
                raise StoreCorrupt(
                    f"data dir {self.path} has format {version}; this broker reads formats "
                    f"{', '.join(map(str, (*_UPGRADABLE, STORE_FORMAT)))}. Use a broker "
                    "version that matches the data"
                )
            txn.put(b"format", msgpack.packb(STORE_FORMAT))
        if version is not None:
            log.warning(
                "upgraded data dir %s from format %d to %d; brokers older than this one "
                "can no longer open it",
                self.path,
                version,
                STORE_FORMAT,
                extra=event("store_upgraded", from_format=version, to_format=STORE_FORMAT),
            )
        return version

    # ------------------------------------------------------------ recovery

    def recover(self, core: Core, now: float) -> Recovered:
        """Apply the log to LMDB, load everything into an empty ``core`` (see
        ``Core.recover``), and open a fresh log segment. Raises ``StoreError`` saying
        what to do if the disk cannot take it."""
        try:
            return self._recover(core, now)
        except (OSError, lmdb.Error) as error:
            raise StoreError(
                f"cannot recover the store in {self.path}: {error}. Nothing was lost; if "
                "the disk is full, free some space and start the broker again"
            ) from error

    def _recover(self, core: Core, now: float) -> Recovered:
        started = time.perf_counter()
        numbers = _log.segment_numbers(self.path)
        applied, (next_id, next_token, next_event) = self._apply_log(numbers)
        self.used = self._measure_used()
        self.capacity = self._measure_capacity(self.used)
        # A store left full (within the margin) is still full: as if puts had been refused.
        self._refusing = self._within_refusal_margin(self.used)
        self._recyclable = numbers[-_SPARE_SEGMENTS:]
        for number in numbers[:-_SPARE_SEGMENTS]:
            os.unlink(os.path.join(self.path, _log.segment_name(number)))
        next_number = numbers[-1] + 1 if numbers else 1
        self._prepare(next_number, release_reserve=True)
        self._segment = _log.open_segment(self.path, next_number)
        self._keep_reserve()
        with self.env.begin() as txn:
            queues = [decode_queue(key, value) for key, value in txn.cursor(self._queues)]
            results = [decode_result(k, v) for k, v in txn.cursor(self._results)]
            dedup = [decode_dedup(k, v) for k, v in txn.cursor(self._dedup)]
            schedules = [decode_schedule(k, v) for k, v in txn.cursor(self._schedules)]
            bindings = [decode_binding(k, v) for k, v in txn.cursor(self._bindings)]
        # Nothing writes while recovering, so a second read transaction sees the same data.
        with self.env.begin() as txn:
            # Streamed straight into the core: no list of every message on the side.
            core.recover(
                now,
                queues,
                self._read_messages(txn),
                next_id=next_id,
                next_token=next_token,
                next_event=next_event,
                results=results,
                dedup=dedup,
                schedules=schedules,
                bindings=bindings,
            )
        # The ceilings the core started from were written by `_apply_log`.
        self._id_ceiling = self.durable_id_ceiling = next_id + COUNTER_BLOCK
        self._token_ceiling = self.durable_token_ceiling = next_token + COUNTER_BLOCK
        self._event_ceiling = next_event + COUNTER_BLOCK
        self._start_checkpointer()
        self._request_spare(next_number + 1)
        by_state = {
            state.value: sum(queue.counts[state] for queue in core.queues.values())
            for state in (State.READY, State.DELAYED, State.RESERVED, State.DEAD)
        }
        seconds = time.perf_counter() - started
        return Recovered(len(core.messages), by_state, len(queues), seconds, applied)

    def _apply_log(self, numbers: list[int]) -> tuple[int, tuple[int, int, int]]:
        """Write the committed prefix of the log into LMDB, and raise the counters' ceilings
        by a block, in one synced transaction (in many if that one does not fit: the map
        at its cap, or a full disk). Returns how many records it applied, and the ceilings
        before the raise: the first id, token and event seq this run may hand out."""
        try:
            return self._apply_log_at_once(numbers)
        except (lmdb.Error, StorageFull) as error:
            if not isinstance(error, StorageFull) and not self._disk_is_short():
                raise
            self._release_reserve()
        applied = 0
        for batch in self._read_log(numbers):
            self._write_in_pieces(batch)
            applied += 1
        return applied, self._raise_counters()

    def _apply_log_at_once(self, numbers: list[int]) -> tuple[int, tuple[int, int, int]]:
        def apply(txn: Any) -> tuple[int, tuple[int, int, int]]:
            applied = 0
            for batch in self._read_log(numbers):
                self._write(txn, batch)
                applied += 1
            return applied, self._raise_counters(txn)

        return self._growing(apply)

    def _raise_counters(self, txn: Any = None) -> tuple[int, int, int]:
        """Raise the stored ceilings by a block (in ``txn``, or a transaction of its own);
        returns them as they were: the first id, token and event seq this run may hand
        out."""
        if txn is None:
            with self.env.begin(write=True) as own:
                return self._raise_counters(own)
        counters = txn.get(b"counters", db=self._meta)
        ceilings = decode_counters(counters) if counters else (1, 1, 1)
        block = [ceiling + COUNTER_BLOCK for ceiling in ceilings]
        txn.put(b"counters", encode_counters(*block), db=self._meta)
        return ceilings

    def _read_log(self, numbers: list[int]) -> Iterator[Batch]:
        """The log's batches in order: each segment's committed prefix. A segment is
        synced before the next one takes a record, so only the last one written can end
        in a torn record, and nothing after a torn record was committed."""
        for number in numbers:
            path = os.path.join(self.path, _log.segment_name(number))
            try:
                for payload in _log.read_segment(path, number):
                    yield unpack_batch(payload)
            except _log.LogCorrupt as error:
                raise StoreCorrupt(str(error)) from None

    def _read_messages(self, txn: Any) -> Iterator[tuple[str, Message]]:
        """Walk the state and body databases side by side (both are in id order, and
        8-byte big-endian keys compare as the ids do). Once per message: kept short."""
        bodies = txn.cursor(self._bodies).iternext()
        body_key, body = next(bodies, _END)
        unreleased = 0
        for key, state in txn.cursor(self._states).iternext():
            if body_key != key:
                body_key, body = _skip_orphan_bodies(bodies, body_key, body, key)
            if body[0] != RECORD_FORMAT:
                raise StoreCorrupt(f"message {key_id(key)}: body format {body[:1]!r} unknown")
            yield decode_message(int.from_bytes(key, "big"), body[1:], state)
            body_key, body = next(bodies, _END)
            unreleased += 1
            if unreleased == _RELEASE_READ_EVERY:
                _release_mapped_pages(self._data_file)
                unreleased = 0
        _release_memory(self._data_file)

    # ------------------------------------------------- admission (loop thread)

    def admit_put(self, specs: list[PutSpec]) -> None:
        """Count the space ``specs`` will take, or raise ``StorageFull`` (nothing counted)."""
        self._admit(sum(estimate_size(spec.body, spec.headers) for spec in specs), "")

    def admits(self, spec: PutSpec) -> bool:
        """``admit_put`` for one message, as a yes or no (a schedule's fire asks)."""
        try:
            self.admit_put([spec])
        except StorageFull:
            return False
        return True

    def admit_results(self, size: int, count: int) -> None:
        """The same for ``count`` ack results of ``size`` encoded bytes in all: results are
        new data, so they need room like puts (an ack without one never does)."""
        self._admit(size + 256 * count, "; an ack without a result needs no room")

    def _admit(self, need: int, advice: str) -> None:
        self._take_measurements()
        now = time.monotonic()
        if now >= self._admit_measure_due:  # another process may be filling the disk
            self._admit_measure_due = now + _MEASURE_ON_ADMIT
            self.capacity = self._measure_capacity(self.used)
        reason = self._refusal(need)
        if reason is not None:
            raise StorageFull(
                f"storage is full ({reason}): consume or purge messages, or give the broker "
                f"more space (--max-storage, or free disk){advice}"
            )
        self.pending += need

    def full(self) -> str | None:
        """Why puts are refused now (None: they are not), for ``/healthz``."""
        self._take_measurements()
        return self._refusal(0)

    def _refusal(self, need: int) -> str | None:
        """Why new data of ``need`` bytes cannot be admitted now, or None. The one rule
        behind put admission and ``/healthz``."""
        if self.disk_full is not None:
            return self.disk_full
        if not self._log_has_room(need):
            return "the disk has no room for the log's next segment"
        estimate = self._estimate()
        if estimate + need > self.capacity or (
            self._refusing and self._within_refusal_margin(estimate)
        ):
            self._refusing = True
            return f"about {estimate // 1024} KiB used of {self.capacity // 1024} KiB"
        self._refusing = False
        return None

    def _within_refusal_margin(self, used: int) -> bool:
        """True if ``used`` bytes leave less than the refusal margin free: puts once
        refused for size stay refused (see ``_refusal_margin``)."""
        return used > self.capacity - _refusal_margin(self.capacity)

    def _log_has_room(self, need: int) -> bool:
        """True unless the disk is too full for the log's next segment and the current
        one lacks room for ``need`` and what is pending, plus a quarter kept for acks."""
        segment = self._segment
        if segment is None or self._disk_free >= 2 * self.segment_size:
            return True
        room = segment.room + (self.segment_size if self._spare == segment.number + 1 else 0)
        return self.pending + need + self.segment_size // 4 <= room

    def _estimate(self) -> int:
        """Bytes the store holds or will, as far as put admission knows."""
        return self.used + self.unmeasured + self.in_flight + self.pending

    def _take_measurements(self) -> None:
        while not self._measurements.empty():
            used, checkpointed = self._measurements.get()
            self.used = used
            self.unmeasured -= checkpointed

    # ------------------------------------------------------ encoding (loop thread)

    def encode(self, changes: Changes) -> Batch:
        """Records for ``changes``. Runs on the loop thread: it reads live messages. Once
        per commit, so the rarely changed kinds cost one test each when unchanged."""
        self.encoded += 1
        number = self.encoded
        bodies: list[tuple[int, bytes]] = []
        states: list[tuple[int, Any]] = []
        deletes: list[int] = []
        freed = 0
        for message in changes.messages:
            message_id = message.id
            if message.state is GONE:
                if message.stored != NOT_STORED:
                    deletes.append(message_id)
                    rare = message.rare  # (read directly: message.headers is a descriptor)
                    freed += estimate_size(message.body, rare.headers if rare is not None else None)
                continue
            if message.stored == NOT_STORED:
                bodies.append((message_id, message.body))
                message.stored = number
            states.append((message_id, message_record(message)))
        batch = Batch(
            number,
            bodies,
            states,
            deletes,
            self._encode_queues(changes),
            admitted=self.pending,
            freed=freed,
        )
        self.in_flight += self.pending
        self.pending = 0
        if changes.results:
            batch.results = [
                (message_key(message_id), None if result is None else encode_result(result))
                for message_id, result in changes.results.items()
            ]
        if changes.dedup:
            batch.dedup = [
                (named_key(queue_name, name), None if entry is None else encode_dedup(entry))
                for (queue_name, name), entry in changes.dedup.items()
            ]
        if changes.schedules:
            batch.schedules = [
                (named_key(queue_name, name), None if plan is None else encode_schedule(plan))
                for (queue_name, name), plan in changes.schedules.items()
            ]
        if changes.bindings:
            batch.bindings = [
                (binding_key(pattern, queue_name), BINDING_RECORD if bound else None)
                for (pattern, queue_name), bound in changes.bindings.items()
            ]
        self._raise_ceilings(changes, batch)
        return batch

    def _encode_queues(self, changes: Changes) -> list[tuple[bytes, bytes | None]]:
        """The records of the queues in ``changes`` (every batch has one: the totals change
        with each op), and the deletes of those forgotten."""
        records: list[tuple[bytes, bytes | None]] = []
        for queue_ in changes.queues:
            cached = self._settings_wire.get(queue_.name)
            if cached is None or cached[0] is not queue_.settings:
                cached = self._settings_wire[queue_.name] = (
                    queue_.settings,
                    queue_.settings.to_wire(),
                )
            records.append(encode_queue(queue_.name, cached[1], queue_.totals))
        for name in changes.forgotten:
            self._settings_wire.pop(name, None)
            records.append((name.encode(), None))
        return records

    def _raise_ceilings(self, changes: Changes, batch: Batch) -> None:
        """Raise the id, token and event ceilings by a block in ``batch`` when the counters
        come within half a block of them."""
        half = COUNTER_BLOCK // 2
        if (
            changes.next_id + half > self._id_ceiling
            or changes.next_token + half > self._token_ceiling
            or changes.next_event + half > self._event_ceiling
        ):
            self._id_ceiling = changes.next_id + COUNTER_BLOCK
            self._token_ceiling = changes.next_token + COUNTER_BLOCK
            self._event_ceiling = changes.next_event + COUNTER_BLOCK
            batch.ceilings = (self._id_ceiling, self._token_ceiling, self._event_ceiling)
            batch.counters = encode_counters(*batch.ceilings)

    def committed(self, batch: Batch) -> None:
        """The loop thread's note that ``batch`` is durable (batches are noted in order)."""
        self.in_flight -= batch.admitted
        self.unmeasured += batch.admitted - batch.freed
        self.durable = batch.number
        if batch.ceilings is not None:
            self.durable_id_ceiling, self.durable_token_ceiling, _ = batch.ceilings

    # ---------------------------------------------------------------------- the log

    def commit(self, batch: Batch) -> None:
        """Append ``batch`` to the log (synced with ``fsync always``); start a checkpoint
        when one is due. Raises ``OSError`` if the log cannot be written: nothing of the
        batch then counts as committed, and the same batch may be committed again."""
        to_sync = self.append(batch)
        if to_sync is not None:
            os.fdatasync(to_sync)
        self.appended(batch)

    def append(self, batch: Batch) -> int | None:
        """The first half of ``commit``: write ``batch`` to the log and return the file
        descriptor to fdatasync before the batch counts (None: nothing to sync, as with
        ``fsync interval`` or ``never``). Then ``appended(batch)``, once that sync is done,
        before the next ``append``. Raises ``OSError`` as ``commit`` does."""
        segment = self._segment
        assert segment is not None, "recover() first"
        unsynced = self._unsynced
        if unsynced is not None and unsynced[:2] == (batch.number, segment.number):
            # Its sync failed: the kernel may have dropped those pages and will not say so
            # again. Overwrite them, so no gap lies between the records before and after.
            segment.end = unsynced[2]
        payload = batch.pack()
        size = len(payload) + _log.RECORD_OVERHEAD
        if size > segment.room:
            segment = self._next_segment(size)
        self._unsynced = (batch.number, segment.number, segment.end)
        _log.append(segment, payload)
        self._appended_bytes = size
        return segment.fd if self.fsync == "always" else None

    def appended(self, batch: Batch) -> None:
        """The second half of ``commit``: ``batch``, the last one appended, is in the log
        to stay; its changes wait for the next checkpoint."""
        self.commits += 1
        self._unsynced = None
        self._coalesced.add(batch, self._appended_bytes)
        self.checkpoint_if_due()
        if time.monotonic() >= self._measure_due:
            self.capacity = self._measure_capacity(self.used)

    def checkpoint_if_due(self) -> None:
        """Start a checkpoint if one is due (a second since the last, or enough log) and
        none runs. Loop thread, between commits (not while a batch's sync is in flight)."""
        if not self._checkpoint_running.is_set() and self._checkpoint_due():
            self._start_checkpoint()

    def _checkpoint_due(self) -> bool:
        batches = self._coalesced.batches + self._closed.batches
        log_bytes = self._coalesced.log_bytes + self._closed.log_bytes
        return log_bytes >= self.checkpoint_bytes or (
            batches > 0 and time.monotonic() - self._checkpoint_started >= self.checkpoint_seconds
        )

    def _start_checkpoint(self) -> None:
        """Hand the closed segments' changes to the checkpoint thread, closing the current
        segment first if its successor is prepared (the loop never waits for one to be
        made here: it takes the closed segments alone, or waits for the next commit)."""
        segment = self._segment
        assert segment is not None
        if self._coalesced.batches:
            if self._spare == segment.number + 1:
                self._next_segment(0)
            else:
                self._request_spare(segment.number + 1)
        if not self._closed.batches:
            return
        changes, self._closed = self._closed, Coalesced()
        segments, self._unchecked = self._unchecked, []
        self._checkpoint_started = time.monotonic()
        self._checkpoint_running.set()
        self._jobs.put(_Checkpoint(changes, segments))

    def _next_segment(self, need: int) -> _log.Segment:
        """Close the current segment, synced (so only the last segment can end torn), and
        open the next, at least ``need`` bytes of records long: the spare, or one made
        now. Raises ``OSError`` if none can be made."""
        old = self._segment
        assert old is not None
        _log.sync(old)
        number = old.number + 1
        size = max(self.segment_size, need + _log.HEADER_SIZE)
        with self._spare_lock:  # the checkpoint thread may be preparing the spare
            if self._spare != number or size > self.segment_size:
                self._prepare(number, size, release_reserve=True)
            self._spare = None
            segment = _log.open_segment(self.path, number)
            self._segment = segment
        os.close(old.fd)
        self._closed.merge(self._coalesced)
        self._coalesced = Coalesced()
        self._unchecked.append(old.number)
        self._request_spare(number + 1)
        return segment

    def _request_spare(self, number: int) -> None:
        if self._spare_requested != number:
            self._spare_requested = number
            self._jobs.put(_Spare(number))

    def _prepare(
        self, number: int, size: int | None = None, *, release_reserve: bool = False
    ) -> None:
        """Make segment ``number`` from a recycled one if there is one, else anew. Records
        why in ``disk_full`` if the disk has no room, and raises. ``release_reserve``: a
        commit (or recovery) needs it now, so on a full disk give up the space reserve and
        try once more (a spare made ahead of need never takes it: puts are refused then)."""
        size = self.segment_size if size is None else size
        with self._recycle_lock:
            fits = self._recyclable and size <= self.segment_size
            recycle = self._recyclable.pop(0) if fits else None
        try:
            try:
                _log.prepare_segment(self.path, number, size, recycle)
            except OSError as error:
                if not (_no_room(error) and release_reserve and self._release_reserve()):
                    raise
                _log.prepare_segment(self.path, number, size, recycle)
        except OSError as error:
            if _no_room(error):
                self.disk_full = f"no room for the next log segment ({error.strerror})"
            raise
        self.disk_full = None

    def _prepare_spare(self, job: _Spare) -> None:
        """(Checkpoint thread.) Prepare the segment after the current one ahead of need,
        so a full disk shows as ``disk_full`` (refusing puts) while the current segment
        still has room for acks."""
        with self._spare_lock:
            current = self._segment
            if current is None or job.number != current.number + 1 or self._spare == job.number:
                return  # the log moved on, or it is ready
            try:
                self._prepare(job.number)
                self._spare = job.number
            except OSError as error:
                log.error(
                    "cannot prepare log segment %d: %s",
                    job.number,
                    error,
                    extra=event("log_segment_failed", segment=job.number, error=str(error)),
                )
            finally:
                self._spare_requested = None

    # ---------------------------------------------------- checkpoints (own thread)

    def _start_checkpointer(self) -> None:
        self._checkpointer = threading.Thread(
            target=self._run_checkpoints, name="sluice-checkpoint", daemon=True
        )
        self._checkpointer.start()

    def _run_checkpoints(self) -> None:
        """Run jobs in order. A checkpoint that fails is tried again every second, while
        the segment requests that come meanwhile are still served."""
        failed: _Checkpoint | None = None
        while True:
            try:
                job = self._jobs.get(timeout=_RETRY_CHECKPOINT_AFTER if failed else None)
            except queue.Empty:
                job, failed = failed, None
            if job is None:
                return
            if isinstance(job, _Spare):
                self._prepare_spare(job)
                continue
            try:
                self._checkpoint(job)
            except (OSError, lmdb.Error, StorageFull) as error:
                if self.checkpoint_error is None:
                    log.error(
                        "checkpoint failed, retrying each second: %s",
                        error,
                        extra=event("checkpoint_failed", error=str(error)),
                    )
                self.checkpoint_error = str(error)
                failed = job
                continue
            if self.checkpoint_error is not None:
                log.warning("checkpoints work again", extra=event("checkpoint_recovered"))
            self.checkpoint_error = None
            self._checkpoint_running.clear()

    def _checkpoint(self, job: _Checkpoint) -> None:
        self.at_checkpoint_step("started")
        batch = job.changes.as_batch()
        try:
            self._transact(batch)
        except (lmdb.Error, StorageFull) as error:
            if not isinstance(error, StorageFull) and self._disk_is_short():
                self._release_reserve()  # acks must be checkpointed: the log needs recycling
            self._write_in_pieces(batch)
        self.at_checkpoint_step("written")
        self._release_now()  # what the transaction's last records and commit left
        self.checkpoints += 1
        self._measurements.put((self._measure_used(), job.changes.admitted))
        with self._recycle_lock:
            for number in job.segments:
                if len(self._recyclable) < _SPARE_SEGMENTS:
                    self._recyclable.append(number)
                else:
                    os.unlink(os.path.join(self.path, _log.segment_name(number)))
        _log.sync_directory(self.path)
        self.at_checkpoint_step("dropped")
        self._keep_reserve()

    def _transact(self, batch: Batch) -> None:
        """Write ``batch`` in one synced transaction, growing the map when it is full.
        Raises ``StorageFull`` if the map is at its cap, ``lmdb.DiskError`` if the disk
        has no room for the pages the transaction needs."""

        def write(txn: Any) -> None:
            self._write(txn, batch)
            self.at_checkpoint_step("writing")

        self._growing(write)

    def _growing(self, work: Callable[[Any], T]) -> T:
        """``work(txn)`` in one synced write transaction, run again from the start on a
        grown map each time the map is full (``_grow`` raises at the cap)."""
        grown = False
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    result = work(txn)
                break
            except lmdb.MapFullError:
                self._grow()
                grown = True
        if grown:
            self._grown_and_written()
        return result

    def _write_in_pieces(self, batch: Batch) -> None:
        """``batch`` when there is no room to write it in one transaction (a full disk, or
        the map at its cap): its deletes, then its bodies, then its message records,
        ``_PIECE`` at a time, each piece a transaction, then the rest. A transaction
        copies every page it changes and LMDB reuses a page only after the transaction
        that freed it, so one that deletes a thousand acked messages, or rewrites the
        record of every message (a nack of them all), needs about as much room again as
        what it changes; a piece needs little, and frees what it copied for the next.
        A crash part way leaves a partial checkpoint in LMDB and the whole log beside
        it: recovery applies the log again (blind writes)."""
        for name in ("deletes", "bodies", "states"):
            records = getattr(batch, name)
            for start in range(0, len(records), _PIECE):
                self._transact(Batch(**{name: records[start : start + _PIECE]}))
        self._transact(dataclasses.replace(batch, deletes=[], bodies=[], states=[]))

    def _write(self, txn: Any, batch: Batch) -> None:
        """Apply ``batch`` in ``txn``. Bulk puts go in chunks: the checkpoint thread holds
        the GIL for a whole ``putmulti``, and the event loop must get it back soon."""
        deletes = batch.deletes
        for start in range(0, len(deletes), _PUT_CHUNK):
            chunk = deletes[start : start + _PUT_CHUNK]
            for message_id in chunk:
                key = message_key(message_id)
                txn.delete(key, db=self._bodies)
                txn.delete(key, db=self._states)
            self._count_written(len(chunk))
        writes: tuple[tuple[Any, Sequence[Any], Callable[[Any], Any]], ...] = (
            (self._bodies, batch.bodies, lmdb_bodies),
            (self._states, batch.states, lmdb_states),
        )
        for db, records, as_pairs in writes:
            cursor = txn.cursor(db)
            for start in range(0, len(records), _PUT_CHUNK):
                cursor.putmulti(as_pairs(records[start : start + _PUT_CHUNK]))
                self._count_written(min(_PUT_CHUNK, len(records) - start))
        for db, records in (
            (self._queues, batch.queues),
            (self._results, batch.results),
            (self._dedup, batch.dedup),
            (self._schedules, batch.schedules),
            (self._bindings, batch.bindings),
        ):
            for key, record in records:
                if record is None:
                    txn.delete(key, db=db)
                else:
                    txn.put(key, record, db=db)
        if batch.counters is not None:
            txn.put(b"counters", batch.counters, db=self._meta)

    def _count_written(self, records: int) -> None:
        """A transaction reads the B-tree's pages through the map (a delete reads every
        leaf it touches): left resident, they would count in the broker's RSS as the
        store grows (173 MiB after a 1M drain), so they are dropped every
        ``_RELEASE_MAP_EVERY`` records written, within a transaction too (dropping a
        page of a read-only map is safe at any time: it is read again from the page
        cache). One checkpoint of a drain holds about a second's acks. A checkpoint also
        drops them once its transaction is done (about 1.5 ms, at most once a second or
        per few MiB of log)."""
        self._unreleased += records
        if self._unreleased >= _RELEASE_MAP_EVERY:
            self._release_now()

    def _release_now(self) -> None:
        _release_memory(self._data_file)
        self._unreleased = 0

    def _grow(self) -> None:
        size = self.env.info()["map_size"]
        limit = self._cap
        if size >= limit:
            raise StorageFull(
                f"the store reached its --max-storage of {limit} bytes while checkpointing"
            )
        new_size = min(size * 2, limit)
        log.info(
            "growing the store's map from %d to %d MiB",
            size >> 20,
            new_size >> 20,
            extra=event("store_grown", from_mib=size >> 20, to_mib=new_size >> 20),
        )
        self.env.set_mapsize(new_size)

    def _grown_and_written(self) -> None:
        """The end of a growth: the transaction that needed the room is committed."""
        size = self.env.info()["map_size"]
        log.info(
            "the store's map is %d MiB; what needed the room is written",
            size >> 20,
            extra=event("store_grown_written", mib=size >> 20),
        )

    # ---------------------------------------------------------- the space reserve

    def _reserve_size(self) -> int:
        """Bytes the reserve file holds now (0: none)."""
        try:
            return os.path.getsize(self._reserve_file)
        except OSError:
            return 0

    def _keep_reserve(self) -> None:
        """Make the reserve file (two segments, the room capacity keeps for the log) if
        it is missing and the disk has room to spare for it. Best effort, and not synced:
        its blocks are taken when it is allocated, and a crash that loses it (or leaves
        it short) just has it made again."""
        size = 2 * self.segment_size
        with self._reserve_lock:
            if self._reserve_size() >= size:
                return
            if shutil.disk_usage(self.path).free < 2 * size:
                return  # it would take the last of the disk; it comes back with room
            try:
                fd = os.open(self._reserve_file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    _log.allocate(fd, size)
                finally:
                    os.close(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(self._reserve_file)

    def _disk_is_short(self) -> bool:
        """True if the disk has less room than the log's next two segments: a write to
        LMDB that failed then failed for want of space (LMDB reports a write cut short by
        a full disk as an I/O error, not always as ENOSPC)."""
        return shutil.disk_usage(self.path).free < 2 * self.segment_size

    def _release_reserve(self) -> bool:
        """Give the reserve's space back to the disk (it is full, and a commit or a
        checkpoint needs room); True if there was one."""
        with self._reserve_lock:
            size = self._reserve_size()
            try:
                os.unlink(self._reserve_file)
            except FileNotFoundError:
                return False
        log.warning(
            "the disk is full: released the %d KiB space reserve so that acks can still be "
            "logged and checkpointed",
            size >> 10,
            extra=event("space_reserve_released", kib=size >> 10),
        )
        return True

    # ------------------------------------------------------------- measuring

    def _measure_used(self) -> int:
        """LMDB's pages in use, in bytes."""
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
                    txn.stat(self._schedules),
                    txn.stat(self._bindings),
                )
            )
        psize: int = self.env.stat()["psize"]
        return pages * psize

    def _measure_capacity(self, used: int) -> int:
        """Room for messages: LMDB's file and the disk's free space (or --max-storage),
        less a reserve kept for what must never fail (acks, nacks, expiries) and the
        log's next segments."""
        self._measure_due = time.monotonic() + _MEASURE_EVERY
        file_size = os.path.getsize(self._data_file)
        self._disk_free = shutil.disk_usage(self.path).free
        capacity = file_size + self._disk_free + self._reserve_size()  # it is for the log
        if self.max_storage is not None:
            capacity = min(capacity, self.max_storage)
        capacity -= 2 * self.segment_size
        return capacity - max(1 << 20, min(64 << 20, capacity // 20))


def _refusal_margin(capacity: int) -> int:
    """How far under the capacity the estimate must fall before puts refused for size are
    admitted again: 1% of it, at least 64 KiB. The estimate counts what the last
    checkpoint has not measured generously, so the next measurement alone may find a
    little room; without the margin, puts would flap between refused and stored until
    consumers free space. Acks and purges do that; a measurement does not. Never more
    than a quarter of a small capacity, so an empty store always admits puts."""
    return min(max(64 << 10, capacity // 100), max(0, capacity) // 4)


def _release_memory(data_file: str) -> None:
    """``_release_mapped_pages``, then hand the C heap's free memory back to the system
    (glibc's malloc_trim: LMDB's page buffers and a checkpoint's large lists are freed
    there but stay resident until trimmed; 7 MiB after a 1M-message fill). Best effort."""
    _release_mapped_pages(data_file)
    try:
        trim = getattr(_libc(), "malloc_trim", None)  # (glibc only)
    except OSError:
        return
    if trim is not None:
        trim(0)


def _release_mapped_pages(data_file: str) -> None:
    """Drop this process's resident pages of LMDB's read-only map of ``data_file`` (Linux:
    madvise DONTNEED; a later read faults them back in from the page cache), so reading a
    large store once, or checkpointing into it, does not leave its whole file in the
    broker's RSS. Best effort."""
    try:
        with open("/proc/self/maps") as maps:
            path = os.path.realpath(data_file)
            regions = [line.split() for line in maps if line.rstrip().endswith(path)]
        libc = _libc()
        for region in regions:
            start, end = (int(part, 16) for part in region[0].split("-"))
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)
    except (OSError, ValueError, AttributeError):
        return


@functools.cache
def _libc() -> ctypes.CDLL:
    """This process's C library, loaded once (raises ``OSError`` where there is none)."""
    return ctypes.CDLL(None, use_errno=True)


def _skip_orphan_bodies(
    bodies: Iterator[tuple[bytes, bytes]], body_key: bytes | None, body: bytes, key: bytes
) -> tuple[bytes, bytes]:
    """Drop the bodies before ``key`` (a message whose record is gone: logged), and return
    ``key``'s; raises ``StoreCorrupt`` if it has none."""
    while body_key is not None and body_key < key:
        orphan = key_id(body_key)
        log.warning(
            "dropping a body without a message record: id %d",
            orphan,
            extra=event("orphan_body_dropped", id=orphan),
        )
        body_key, body = next(bodies, _END)
    if body_key != key:
        raise StoreCorrupt(f"message {key_id(key)} has a record but no body")
    return body_key, body


def _no_fault(step: str) -> None:
    pass


def _no_room(error: OSError) -> bool:
    return error.errno in (errno.ENOSPC, errno.EDQUOT)


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


__all__ += ["READABLE", "FSYNC_MODES"]
