"""A real full disk: the data dir on a small tmpfs that another process fills to ENOSPC,
and on a small loop-mounted ext4 that the broker's own puts fill first.

The broker learns the disk is full from the disk: no ``--max-storage`` on the tmpfs, one
larger than the disk on ext4. Puts must end in ``STORAGE_FULL`` after a bounded number
(those already admitted go into the log's preallocated segment, so they are durable when
confirmed); hello, ping, reserve, ack, nack and reads keep answering, every reply within
the client's timeout (a commit held for want of space would stall them); ``/healthz``
says why; and after ``kill -9`` nothing confirmed is lost. Skipped, saying why, where the
disk cannot be made (not root, no mount permission in a container, no loop device, no
``mkfs.ext4``); the ext4 image is unmounted and its loop device detached always.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import Client
from client.errors import StorageFull
from tests.conftest import KEEP, BrokerProcess, start_broker, stop_broker
from tests.test_metrics import free_port, http_get

DISK_MIB = 24
QUEUE = "disk.jobs"
BODY = 4096
MAX_PUTS_ONCE_FULL = 2000  # what may still be admitted into the log once the disk is full


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for the data dir needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MIB}m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


EXT4_MIB = 32


@pytest.fixture
def ext4_disk(tmp_path: Path) -> Iterator[Path]:
    """A ``EXT4_MIB`` MiB ext4 image, loop-mounted (no blocks reserved for root: the
    broker runs as root here, and full must mean full)."""
    if os.geteuid() != 0:
        pytest.skip("loop-mounting an ext4 image for the data dir needs root")
    if shutil.which("mkfs.ext4") is None or shutil.which("losetup") is None:
        pytest.skip("mkfs.ext4 or losetup is missing (Debian: e2fsprogs, mount)")
    image, mount_point = tmp_path / "disk.img", tmp_path / "ext4"
    mount_point.mkdir()
    with image.open("wb") as file:
        file.truncate(EXT4_MIB << 20)
    made = _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
    if made.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {made.stderr.strip()}")
    attached = _run("losetup", "--find", "--show", str(image))
    if attached.returncode != 0:
        pytest.skip(f"no loop device: {attached.stderr.strip()}")
    device = attached.stdout.strip()
    try:
        mounted = _run("mount", "-t", "ext4", device, str(mount_point))
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount an ext4 image here: {mounted.stderr.strip()}")
        try:
            yield mount_point
        finally:
            _run("umount", str(mount_point))
    finally:
        _run("losetup", "--detach", device)


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False)


def fill_disk(path: Path) -> None:
    """Another process writes ``path`` until the disk has no byte left."""
    filler = (
        "import sys\n"
        "f = open(sys.argv[1], 'wb', buffering=0)\n"
        "try:\n"
        "    while True: f.write(b'\\0' * 65536)\n"
        "except OSError:\n"
        "    pass\n"
        "try:\n"
        "    while True: f.write(b'\\0')\n"
        "except OSError:\n"
        "    pass\n"
    )
    subprocess.run([sys.executable, "-c", filler, str(path)], check=True, timeout=60)


def body(number: int) -> bytes:
    return f"{number:06d}".encode().ljust(BODY, b".")


def put_until_refused(client: Client, first: int, limit: int) -> tuple[list[bytes], bool]:
    stored = []
    for number in range(first, first + limit):
        try:
            client.put(QUEUE, body(number))
        except StorageFull as refusal:
            assert "free disk" in refusal.message, refusal.message
            return stored, True
        stored.append(body(number))
    return stored, False


def bodies(client: Client) -> set[bytes]:
    found: set[bytes] = set()
    for state in ("ready", "reserved", "delayed"):
        found |= {item["body"] for item in client.peek(QUEUE, state, limit=1000)}
    return found


def kill_free_and_restart(
    broker: BrokerProcess,
    filler: Path,
    log_path: Path,
    args: tuple[str, ...],
    brokers: list[BrokerProcess],
) -> None:
    """``kill -9`` the broker (its log without a traceback), free the disk by deleting
    ``filler``, and start it again with ``args``: ``brokers[-1]``."""
    broker.process.kill()
    broker.process.wait()
    assert "Traceback" not in broker.log(), broker.log()[-3000:]
    os.unlink(filler)
    brokers.append(start_broker(log_path, *args))


def test_a_disk_filled_by_another_process_refuses_puts_and_keeps_everything_else(
    small_disk: Path, tmp_path: Path, brokers: list[BrokerProcess]
) -> None:
    data = small_disk / "data"
    http = free_port()
    args = ("--data-dir", str(data), "--metrics-port", str(http))
    brokers.append(start_broker(tmp_path / "broker.log", *args))
    broker = brokers[-1]
    with broker.client() as client:
        stored, refused = put_until_refused(client, 0, 200)
        assert not refused and len(stored) == 200
        fill_disk(small_disk / "filler")
        more, refused = put_until_refused(client, 200, MAX_PUTS_ONCE_FULL)
        assert refused, f"{len(more)} puts on a full disk and none refused"
        stored += more
        with pytest.raises(StorageFull):
            client.put(QUEUE, b"still full")
        # Everything but new data still works, on this connection and a fresh one.
        with broker.client() as fresh:
            assert fresh.ping() > 0
            assert fresh.stats(QUEUE)["ready"] == len(stored)
        messages = client.reserve(QUEUE, max_messages=100, visibility_timeout=60)
        assert len(messages) == 100
        assert client.ack(messages[:50]) == 50
        assert client.nack(messages[50:], delay=0, error="disk full") == 50
        status, reason = http_get(f"http://127.0.0.1:{http}/healthz")
        assert status == 503 and "storage is full" in reason, (status, reason)
        assert "puts are refused; acks and reads still work" in reason, reason
        acked = {message.body for message in messages[:50]}
    kill_free_and_restart(broker, small_disk / "filler", tmp_path / "restarted.log", args, brokers)
    with brokers[-1].client() as client:
        assert bodies(client) == set(stored) - acked, "confirmed work was lost on a full disk"
        client.put(QUEUE, b"room again")
        fill_disk(small_disk / "filler")
        refilled, refused = put_until_refused(client, 10_000, MAX_PUTS_ONCE_FULL)
        assert refused
        expected = set(stored) - acked | {b"room again"} | set(refilled)
    # SIGTERM on a full disk: the broker stops (its last checkpoint may not fit; the log
    # keeps everything), exit status 0.
    stop_broker(brokers[-1])
    os.unlink(small_disk / "filler")
    brokers.append(start_broker(tmp_path / "after-sigterm.log", *args))
    with brokers[-1].client() as client:
        assert bodies(client) == expected, "a SIGTERM on a full disk lost confirmed work"
    stop_broker(brokers[-1])


BATCH = 16  # bodies per put_many while the broker fills the ext4 disk itself


def put_batches_until_refused(client: Client, limit: int) -> list[bytes]:
    """put_many batches of ``BATCH`` bodies until one is refused; the bodies confirmed."""
    stored: list[bytes] = []
    for first in range(0, limit, BATCH):
        batch = [body(number) for number in range(first, first + BATCH)]
        try:
            client.put_many(QUEUE, batch)
        except StorageFull as refusal:
            assert "free disk" in refusal.message, refusal.message
            return stored
        stored += batch
    pytest.fail(f"{limit} puts of {BODY} bytes fit on a {EXT4_MIB} MiB disk")


def test_an_ext4_disk_filled_by_the_broker_then_to_enospc_loses_nothing_confirmed(
    ext4_disk: Path, tmp_path: Path, brokers: list[BrokerProcess]
) -> None:
    data = ext4_disk / "data"
    http = free_port()
    # More than the disk holds: the disk is the limit the broker has to find.
    args = ("--data-dir", str(data), "--metrics-port", str(http), "--max-storage", "1G")
    brokers.append(start_broker(tmp_path / "broker.log", *args))
    broker = brokers[-1]
    with broker.client() as client:
        stored = put_batches_until_refused(client, (EXT4_MIB << 20) // BODY)
        assert len(stored) * BODY > (EXT4_MIB << 20) // 8, f"only {len(stored)} puts fit"
        # What the broker left free, another process takes: the disk is at ENOSPC.
        fill_disk(ext4_disk / "filler")
        assert shutil.disk_usage(ext4_disk).free < 64 << 10
        more, refused = put_until_refused(client, len(stored), MAX_PUTS_ONCE_FULL)
        assert refused, f"{len(more)} puts on a full disk and none refused"
        stored += more
        with broker.client() as fresh:
            assert fresh.ping() > 0
            assert fresh.stats(QUEUE)["ready"] == len(stored)
        status, reason = http_get(f"http://127.0.0.1:{http}/healthz")
        assert status == 503 and "storage is full" in reason, (status, reason)
        # Acks one by one (a commit each, a log record each), then a batch, and nacks:
        # every reply comes within the client's timeout, none is held for want of room.
        messages = client.reserve(QUEUE, max_messages=300, visibility_timeout=60)
        assert len(messages) == 300
        for message in messages[:100]:
            assert client.ack(message) == 1
        assert client.ack(messages[100:200]) == 100
        assert client.nack(messages[200:], delay=0, error="disk full") == 100
        assert client.stats(QUEUE)["ready"] == len(stored) - 200
        acked = {message.body for message in messages[:200]}
    kill_free_and_restart(broker, ext4_disk / "filler", tmp_path / "restarted.log", args, brokers)
    with brokers[-1].client() as client:
        assert client.stats(QUEUE)["ready"] == len(stored) - len(acked)
        found: set[bytes] = set()
        while batch := client.reserve(QUEUE, max_messages=500, visibility_timeout=60):
            found |= {message.body for message in batch}
            assert client.ack(batch) == len(batch)
        assert found == set(stored) - acked, "confirmed work was lost on a full ext4 disk"
        assert client.put(QUEUE, b"room again") > 0
    stop_broker(brokers[-1])


RETRIED = "retry.jobs"  # small messages nacked round after round on the full disk
NACK_ROUNDS = 150  # each a log record of 200 nacks: several segments' worth


def test_acks_and_nacks_on_a_full_ext4_disk_are_answered_without_end(
    ext4_disk: Path, tmp_path: Path, brokers: list[BrokerProcess]
) -> None:
    """The checkpoint that deletes a full disk's acked messages needs new LMDB pages
    before it frees any, and the log recycles a segment only once it is checkpointed: on a
    disk with no byte left both would wait for each other, and once the log's segments
    were used up every reply that waits for a commit would be held for ever. The store
    keeps a space reserve for that moment; every nack below must be answered."""
    args = ("--data-dir", str(ext4_disk / "data"), "--max-storage", "1G")
    brokers.append(start_broker(tmp_path / "broker.log", *args))
    broker = brokers[-1]
    with broker.client() as client:
        client.configure(QUEUE, **KEEP)  # kept once drained: its totals are read below
        client.configure(RETRIED, max_attempts=None)
        client.put_many(RETRIED, [b"r" * 100] * 200)
        stored = put_batches_until_refused(client, (EXT4_MIB << 20) // BODY)
        fill_disk(ext4_disk / "filler")
        while batch := client.reserve(QUEUE, max_messages=500):
            assert client.ack(batch) == len(batch)
        for _ in range(NACK_ROUNDS):
            batch = client.reserve(RETRIED, max_messages=200)
            assert len(batch) == 200
            assert client.nack(batch, delay=0, error="full disk") == 200
        assert client.stats(QUEUE)["totals"]["acked"] == len(stored)
    broker.process.kill()
    broker.process.wait()
    log = broker.log()
    assert "Traceback" not in log and "commit failed" not in log, log[-3000:]
    os.unlink(ext4_disk / "filler")
    brokers.append(start_broker(tmp_path / "restarted.log", *args))
    with brokers[-1].client() as client:
        assert client.stats(QUEUE)["ready"] == 0
        assert client.stats(RETRIED)["ready"] == 200
    stop_broker(brokers[-1])


def test_the_sync_benchmark_on_a_disk_without_room_says_so(small_disk: Path) -> None:
    """bench.micro_sync needs five regions of whole MiB (one per way): 5 x 16 MiB does
    not fit the small disk, so it must stop with the reason and the fix, and leave no file."""
    run = ["--dir", str(small_disk), "--syncs", "16384", "--record-size", "1024", "--repeat", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.micro_sync", *run],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "cannot allocate 80 MiB" in done.stderr
    assert "free some space, or pass fewer --syncs" in done.stderr
    assert list(small_disk.iterdir()) == []
