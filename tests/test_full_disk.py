"""A real full disk: the data dir on a small tmpfs that another process fills to ENOSPC.

The broker has no ``--max-storage`` here: it learns the disk is full from the disk. Puts
must end in ``STORAGE_FULL`` after a bounded number (those already admitted go into the
log's preallocated segment, so they are durable when confirmed); hello, ping, reserve,
ack, nack and reads keep answering; ``/healthz`` says why; and after ``kill -9`` nothing
confirmed is lost. Skipped, saying why, where a tmpfs cannot be mounted (not root, or no
mount permission in a container).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from client import Client
from client.errors import StorageFull
from tests.conftest import BrokerProcess, start_broker, stop_broker
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
    broker.process.kill()
    broker.process.wait()
    assert "Traceback" not in broker.log(), broker.log()[-3000:]
    os.unlink(small_disk / "filler")
    brokers.append(start_broker(tmp_path / "restarted.log", *args))
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
