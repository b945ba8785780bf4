"""The write-ahead log and its checkpoints, cut and corrupted the ways a power cut would.

- ``_log`` alone: a segment cut (truncated, or zeroed as a preallocated file reads) or
  corrupted at every byte offset of its last records yields exactly the records before
  the damaged one.
- The store: the same cuts on a real data dir recover exactly the batches committed
  before the cut; a crash at each step of a checkpoint (before, during and after its
  LMDB transaction, before and after the log is recycled) loses nothing committed.
- An existing data dir of format 2 (LMDB alone, made by the broker before the log), of
  format 3 (message records of format 2, in LMDB and in the log), or of format 4 (log
  records of format 4, messages by LMDB key and value), is upgraded on open, with
  everything in it; a newer format is refused with advice.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import time
from pathlib import Path

import lmdb
import msgpack
import pytest

from broker import Core, _log, _store
from broker._message import PutSpec
from broker._records import Batch
from broker._store import STORE_FORMAT, Coalesced, Store, StoreCorrupt, _Checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
T0 = 1_800_000_000.0


# ------------------------------------------------------------------ segments alone


def write_segment(directory: Path, payloads: list[bytes], size: int = 1 << 16) -> Path:
    _log.prepare_segment(str(directory), 1, size)
    segment = _log.open_segment(str(directory), 1)
    for payload in payloads:
        _log.append(segment, payload)
    os.close(segment.fd)
    return directory / _log.segment_name(1)


def read(path: Path) -> list[bytes]:
    return list(_log.read_segment(str(path), 1))


PAYLOADS = [bytes([n]) * (20 + 7 * n) for n in range(1, 7)]


def record_starts(payloads: list[bytes]) -> list[int]:
    starts, offset = [], _log.HEADER_SIZE
    for payload in payloads:
        starts.append(offset)
        offset += _log.RECORD_OVERHEAD + len(payload)
    return [*starts, offset]


def whole_records_before(offset: int) -> list[bytes]:
    """The payloads whose records end at or before ``offset``."""
    ends = record_starts(PAYLOADS)[1:]
    return [payload for payload, end in zip(PAYLOADS, ends, strict=True) if end <= offset]


def test_a_segment_reads_back_whole(tmp_path: Path) -> None:
    assert read(write_segment(tmp_path, PAYLOADS)) == PAYLOADS
    assert read(write_segment(tmp_path, [])) == []


@pytest.mark.parametrize("cut", ["truncate", "zero"])
def test_a_cut_at_every_offset_of_the_last_records_leaves_the_records_before_it(
    tmp_path: Path, cut: str
) -> None:
    original = write_segment(tmp_path, PAYLOADS).read_bytes()
    starts = record_starts(PAYLOADS)
    path = tmp_path / "cut.wal"
    for offset in range(starts[-3], starts[-1] + 1):  # every byte of the last two records
        damaged = (
            original[:offset]
            if cut == "truncate"
            else original[:offset] + bytes(len(original) - offset)
        )
        path.write_bytes(damaged)
        assert list(_log.read_segment(str(path), 1)) == whole_records_before(offset), offset


def test_a_flipped_byte_anywhere_in_the_last_records_ends_the_log_before_it(
    tmp_path: Path,
) -> None:
    original = bytearray(write_segment(tmp_path, PAYLOADS).read_bytes())
    starts = record_starts(PAYLOADS)
    path = tmp_path / "flipped.wal"
    for offset in range(starts[-3], starts[-1]):
        damaged = bytearray(original)
        damaged[offset] ^= 0x41
        path.write_bytes(damaged)
        damaged_record = max(i for i, start in enumerate(starts) if start <= offset)
        assert read_at(path) == PAYLOADS[:damaged_record], offset


def read_at(path: Path) -> list[bytes]:
    return list(_log.read_segment(str(path), 1))


def test_a_recycled_segment_does_not_replay_its_old_records(tmp_path: Path) -> None:
    write_segment(tmp_path, PAYLOADS)
    _log.prepare_segment(str(tmp_path), 2, 1 << 16, recycle=1)
    segment = _log.open_segment(str(tmp_path), 2)
    _log.append(segment, b"new")
    os.close(segment.fd)
    assert list(_log.read_segment(str(tmp_path / _log.segment_name(2)), 2)) == [b"new"]
    assert not (tmp_path / _log.segment_name(1)).exists()


def test_a_file_that_is_not_a_segment_is_refused(tmp_path: Path) -> None:
    path = tmp_path / _log.segment_name(1)
    path.write_bytes(b"not a log at all, but long enough to have a header")
    with pytest.raises(_log.LogCorrupt, match="not a Sluice log segment"):
        read(path)


# ------------------------------------------------------------------ the store


def open_store(path: Path, **options: float) -> tuple[Store, Core]:
    store = Store(
        str(path),
        fsync="always",
        checkpoint_bytes=int(options.get("checkpoint_bytes", 1 << 30)),
        checkpoint_seconds=options.get("checkpoint_seconds", 3600.0),
        segment_size=64 << 10,
    )
    core = Core(random=lambda: 0.5, track_changes=True)
    store.recover(core, T0)
    return store, core


def commit(store: Store, core: Core) -> int:
    """Commit the core's changes; returns the log's end after it (the current segment)."""
    batch = store.encode(core.take_changes())
    store.commit(batch)
    store.committed(batch)
    assert store._segment is not None
    return store._segment.end


def commit_when_idle(store: Store, core: Core) -> int:
    """``commit`` once the last checkpoint is done and the next segment is made, as on
    an idle disk: how many checkpoints start then does not hang on the checkpoint
    thread's speed (a commit while one runs starts none; the next takes both's changes)."""
    deadline = time.monotonic() + 10
    assert store._wait_for_checkpoint(deadline) and store._wait_for_spare(deadline)
    return commit(store, core)


def bodies_of(core: Core) -> dict[bytes, str]:
    return {message.body: message.state.value for message in core.messages.values()}


def build_history(path: Path) -> tuple[list[int], list[dict[bytes, str]], str]:
    """Commit five batches (puts, a reserve, an ack, a nack); returns the log's end after
    each, what the core held after each, and the segment they are in. Nothing is
    checkpointed."""
    store, core = open_store(path)
    ends, states = [], []
    core.put(T0, "q", [PutSpec(body=b"first"), PutSpec(body=b"second", priority=3)])
    ends.append(commit(store, core))
    states.append(bodies_of(core))
    (leased,) = core.reserve(T0, ["q"], 1, visibility_timeout=1000.0)
    ends.append(commit(store, core))
    states.append(bodies_of(core))
    core.ack(T0, [(leased.id, leased.lease_token)])
    core.put(T0, "q", [PutSpec(body=b"third", delay=500.0)])
    ends.append(commit(store, core))
    states.append(bodies_of(core))
    (again,) = core.reserve(T0, ["q"], 1, visibility_timeout=1000.0)
    core.nack(T0, [(again.id, again.lease_token)], delay=100.0, error="later")
    ends.append(commit(store, core))
    states.append(bodies_of(core))
    core.put(T0, "q", [PutSpec(body=b"fourth", headers={"k": "v"})])
    ends.append(commit(store, core))
    states.append(bodies_of(core))
    assert store._segment is not None
    segment_name = _log.segment_name(store._segment.number)
    store.close()  # no checkpoint: as if killed
    return ends, states, segment_name


def recovered_bodies(path: Path) -> dict[bytes, str]:
    store, core = open_store(path)
    try:
        return bodies_of(core)
    finally:
        store.close()


@pytest.mark.parametrize("cut", ["truncate", "zero", "flip"])
def test_a_power_cut_in_the_last_records_recovers_exactly_a_committed_prefix(
    tmp_path: Path, cut: str
) -> None:
    source = tmp_path / "source"
    ends, states, segment_name = build_history(source)
    original = (source / segment_name).read_bytes()
    for offset in range(ends[-3], ends[-1] + 1):
        copy = tmp_path / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(source, copy)
        damaged = bytearray(original)
        if cut == "truncate":
            damaged = damaged[:offset]
        elif cut == "zero":
            damaged[offset:] = bytes(len(damaged) - offset)
        elif offset < ends[-1]:
            damaged[offset] ^= 0x5A
        (copy / segment_name).write_bytes(bytes(damaged))
        whole = [i for i, end in enumerate(ends) if end <= offset]
        expected = states[whole[-1]] if whole else {}
        assert recovered_bodies(copy) == expected, (cut, offset)


def test_a_batch_whose_sync_failed_is_written_again_where_it_was(tmp_path: Path) -> None:
    """A failed fdatasync may leave the batch's pages nowhere (Linux marks them clean and
    reports the error once). The retry of the same batch overwrites it in place, so the
    records stay one after the other: here the first attempt goes to /dev/null (the write
    is taken, the sync refused with EINVAL, nothing reaches the segment), and everything
    committed, before and after, recovers."""
    store, core = open_store(tmp_path)
    core.put(T0, "q", [PutSpec(body=b"before")])
    end = commit(store, core)
    core.put(T0, "q", [PutSpec(body=b"retried")])
    batch = store.encode(core.take_changes())
    segment = store._segment
    assert segment is not None
    real_fd = segment.fd
    segment.fd = os.open(os.devnull, os.O_RDWR)
    try:
        with pytest.raises(OSError):
            store.commit(batch)
    finally:
        os.close(segment.fd)
        segment.fd = real_fd
    store.commit(batch)  # as the server retries: the same batch, nothing else between
    store.committed(batch)
    assert segment.end == end + len(_log.frame_record(segment.number, batch.pack()))
    core.put(T0, "q", [PutSpec(body=b"after")])
    commit(store, core)
    store.close()  # no checkpoint: as if killed
    assert recovered_bodies(tmp_path) == {
        b"before": "ready",
        b"retried": "ready",
        b"after": "ready",
    }


def test_recovery_applies_the_log_once_and_twice_alike(tmp_path: Path) -> None:
    """A crash right after recovery applied the log (before it was recycled) applies it
    again on the next start: records are blind writes, so the result is the same."""
    _, states, _ = build_history(tmp_path)
    log_files = {
        name: (tmp_path / name).read_bytes()
        for name in os.listdir(tmp_path)
        if name.endswith(".wal")
    }
    assert recovered_bodies(tmp_path) == states[-1]
    for name in os.listdir(tmp_path):
        if name.endswith(".wal"):
            os.unlink(tmp_path / name)
    for name, data in log_files.items():  # the log as it was before the first recovery
        (tmp_path / name).write_bytes(data)
    assert recovered_bodies(tmp_path) == states[-1]


class SimulatedCrash(Exception):
    """The broker dies at this step of a checkpoint."""


CHECKPOINT_STEPS = ["started", "writing", "written", "dropped"]


@pytest.mark.parametrize("step", CHECKPOINT_STEPS)
def test_a_crash_at_any_step_of_a_checkpoint_loses_nothing_committed(
    tmp_path: Path, step: str
) -> None:
    store, core = open_store(tmp_path)
    core.put(T0, "q", [PutSpec(body=b"kept-%d" % n) for n in range(5)])
    commit(store, core)
    store.checkpoint_now()  # these are in LMDB now
    acked = core.reserve(T0, ["q"], 2, visibility_timeout=1000.0)
    core.ack(T0, [(m.id, m.lease_token) for m in acked])  # deletes of checkpointed ones
    core.put(T0, "q", [PutSpec(body=b"new-%d" % n) for n in range(3)])
    commit(store, core)
    expected = bodies_of(core)

    def crash_at(reached: str) -> None:
        if reached == step:
            raise SimulatedCrash(step)

    store.at_checkpoint_step = crash_at
    # Run the checkpoint here rather than on the store's thread, to crash it in place.
    assert store._checkpointer is not None
    assert store._wait_for_spare(time.monotonic() + 10)
    store._jobs.put(None)
    store._checkpointer.join()
    store._start_checkpoint()
    jobs = [store._jobs.get() for _ in range(store._jobs.qsize())]
    (job,) = [job for job in jobs if isinstance(job, _Checkpoint)]
    with pytest.raises(SimulatedCrash):
        store._checkpoint(job)
    core.put(T0, "q", [PutSpec(body=b"after")])  # committed to the new segment meanwhile
    commit(store, core)
    expected = bodies_of(core)
    store.close()
    assert recovered_bodies(tmp_path) == expected
    assert recovered_bodies(tmp_path) == expected  # and again, after that recovery


def test_checkpoints_bound_the_log_and_keep_everything(tmp_path: Path) -> None:
    store, core = open_store(tmp_path, checkpoint_bytes=2048)
    for n in range(200):
        core.put(T0, "q", [PutSpec(body=b"m-%03d" % n + bytes(100))])
        if n % 3 == 0:
            (leased,) = core.reserve(T0, ["q"], 1, visibility_timeout=1000.0)
            core.ack(T0, [(leased.id, leased.lease_token)])
        commit_when_idle(store, core)
    assert store._wait_for_checkpoint(time.monotonic() + 10)
    expected = bodies_of(core)
    assert store.checkpoints >= 10
    segments = _log.segment_numbers(str(tmp_path))
    assert len(segments) <= 5, f"the log was not bounded by its checkpoints: {segments}"
    store.close()
    assert recovered_bodies(tmp_path) == expected


def resident_kib(path: Path) -> int:
    """KiB of ``path``'s mappings resident in this process (Linux smaps)."""
    real, total, inside = os.path.realpath(path), 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if not line[0].isupper():  # a mapping's first line: its address range
                inside = line.rstrip().endswith(real)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def checkpoint_and_drain(tmp_path: Path) -> int:
    """Put 20 MB of bodies and ack all of them (80,000 records, checkpointed as they
    come), then return the KiB of the store's map left resident in this process."""
    store, core = open_store(tmp_path, checkpoint_bytes=1 << 20)
    for _ in range(40):
        core.put(T0, "q", [PutSpec(body=bytes(500)) for _ in range(1000)])
        commit_when_idle(store, core)
    while leased := core.reserve(T0, ["q"], 1000, visibility_timeout=1000.0):
        core.ack(T0, [(message.id, message.lease_token) for message in leased])
        commit_when_idle(store, core)
    assert store.checkpoint_now()
    assert store.checkpoints >= 10
    resident = resident_kib(tmp_path / "data.mdb")
    store.close()
    return resident


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_checkpoints_drop_the_store_pages_they_leave_resident(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint reads LMDB's B-tree through its map (deletes read every leaf they
    touch): left resident, those pages count in the broker's RSS. The store drops them
    every ``_RELEASE_MAP_EVERY`` records written and at the end of every checkpoint: with
    the release made a no-op the pages stay; as it is, they are gone after the last
    checkpoint."""
    with monkeypatch.context() as patched:
        patched.setattr(_store, "_release_memory", lambda data_file: None)
        assert checkpoint_and_drain(tmp_path / "kept") > 4096
    assert checkpoint_and_drain(tmp_path / "dropped") < 1024


# ------------------------------------------------------------------ formats


def recover_fixture(tmp_path: Path, version: int) -> tuple[Store, Core]:
    """The data dir of store format ``version`` in ``fixtures``, opened (and so upgraded)
    and recovered; the store says which format it was upgraded from."""
    with tarfile.open(FIXTURES / f"store-format-{version}.tar.gz") as archive:
        archive.extractall(tmp_path, filter="data")
    store = Store(str(tmp_path))
    assert store.upgraded_from == version
    core = Core(track_changes=True)
    store.recover(core, T0 + 1)
    return store, core


def commit_and_reopen(path: Path, store: Store, core: Core) -> Core:
    """Commit an upgraded store's last changes, close it, and recover it again: it opens
    as the current format (no upgrade) with every message as it was. The recovered core."""
    commit(store, core)
    expected = {m.id: m.status() for m in core.messages.values()}
    store.close()
    reopened = Store(str(path))
    try:
        assert reopened.upgraded_from is None
        again = Core(track_changes=True)
        reopened.recover(again, T0 + 1)
        assert {m.id: m.status() for m in again.messages.values()} == expected
        return again
    finally:
        reopened.close()


def test_a_checkpoint_deletes_in_key_order() -> None:
    """The acks since the last checkpoint are a set; written in its hash order, each run of
    ``_RELEASE_MAP_EVERY`` deletes would read leaves all over the tree (17 MiB of the map
    resident during a 300,000-message drain, against 3.5 MiB in key order)."""
    changes = Coalesced()
    ids = list(range(1, 5000))
    changes.add(Batch(1, deletes=ids[::-1][:2500] + ids[:2499]), 0)
    assert changes.as_batch().deletes == ids


def test_a_format_2_data_dir_is_upgraded_with_everything_in_it(tmp_path: Path) -> None:
    store, core = recover_fixture(tmp_path, 2)
    states = sorted((m.id, m.state.value, m.attempts) for m in core.messages.values())
    assert states == [
        (1, "delayed", 1),
        (2, "reserved", 1),
        (4, "delayed", 1),
        (5, "delayed", 1),
        (6, "dead", 1),
        (7, "delayed", 0),
        (9, "ready", 0),
    ]
    assert core.messages[6].dead_reason == "bad mail"
    assert core.messages[1].last_error == "try later"
    assert core.messages[9].body == b"x" * 5000
    assert core.queues["emails"].settings.max_attempts == 2
    assert core.results.get(3, T0 + 1) is not None  # the acked message's result
    assert core.counters == (10, 8, 1), "ids and tokens go on; events start (none before)"
    store.close()
    reopened = Store(str(tmp_path))
    assert reopened.upgraded_from is None
    reopened.close()


def test_a_format_3_data_dir_is_upgraded_with_everything_in_it(tmp_path: Path) -> None:
    """Made by the broker before message records of format 3, killed with part of its
    changes checkpointed into LMDB and the rest only in its log."""
    store, core = recover_fixture(tmp_path, 3)
    messages = sorted(core.messages.values(), key=lambda message: message.id)
    assert [(m.id, m.queue.name, m.state.value, m.attempts) for m in messages] == [
        (1, "emails", "delayed", 1),
        (2, "emails", "reserved", 1),
        (3, "emails", "dead", 1),
        (4, "emails", "delayed", 0),
        (5, "emails", "ready", 0),
        (7, "other", "ready", 0),
    ]
    plain, urgent, keyed, later, big, last = messages
    assert (plain.last_error, plain.due_at) == ("try later", T0 + 100)
    assert (urgent.priority, urgent.progress, urgent.lease_deadline) == (
        5,
        (40.0, "halfway"),
        T0 + 1000,
    )
    assert (keyed.dead_reason, keyed.key, keyed.headers) == ("bad mail", "k-1", {"trace": "abc"})
    assert (later.due_at, later.rare) == (T0 + 500, None)
    assert (big.body, big.max_attempts, big.visibility_timeout) == (b"x" * 5000, 9, 30.0)
    assert (last.body, last.rare) == (b"last", None)
    assert core.queues["emails"].settings.max_attempts == 2
    assert core.results.get(6, T0 + 1) is not None  # acked in the log, with a result
    (leased,) = core.reserve(T0 + 1, ["emails"], 1)  # big: its record now in format 3
    assert leased is big
    again = commit_and_reopen(tmp_path, store, core)
    assert again.messages[5].state.value == "reserved"


def test_a_format_4_data_dir_is_upgraded_with_everything_in_it(tmp_path: Path) -> None:
    """Made by the broker before log records of format 5, killed with its first batch
    checkpointed into LMDB and the rest only in its log, as records of format 4."""
    store, core = recover_fixture(tmp_path, 4)
    messages = sorted(core.messages.values(), key=lambda message: message.id)
    assert [(m.id, m.queue.name, m.state.value, m.attempts) for m in messages] == [
        (1, "emails", "delayed", 1),
        (2, "emails", "reserved", 1),
        (3, "emails", "ready", 0),
        (4, "emails", "ready", 0),
        (5, "other", "delayed", 0),
    ]
    nacked, urgent, keyed, big, later = messages
    assert (nacked.body, nacked.last_error, nacked.due_at) == (b"plain", "try later", T0 + 100)
    assert (urgent.priority, urgent.progress, urgent.lease_deadline) == (
        5,
        (40.0, "halfway"),
        T0 + 30,
    )
    assert (keyed.key, keyed.headers) == ("k-1", {"trace": "abc"})
    assert (big.body, big.max_attempts, big.visibility_timeout) == (b"x" * 5000, 9, 30.0)
    assert (later.body, later.due_at) == (b"later", T0 + 500)
    assert 6 not in core.messages  # acked in the log
    assert core.queues["emails"].settings.max_attempts == 2
    core.ack(T0 + 1, [(urgent.id, urgent.lease_token)])  # now in a record of format 5
    again = commit_and_reopen(tmp_path, store, core)
    assert sorted(again.messages) == [1, 3, 4, 5]


def test_a_newer_format_is_refused_with_what_to_do(tmp_path: Path) -> None:
    Store(str(tmp_path)).close()
    env = lmdb.open(str(tmp_path), max_dbs=6)
    with env.begin(write=True, db=env.open_db(b"meta")) as txn:
        txn.put(b"format", msgpack.packb(STORE_FORMAT + 1))
    env.close()
    with pytest.raises(StoreCorrupt, match="Use a broker version that matches the data"):
        Store(str(tmp_path))
