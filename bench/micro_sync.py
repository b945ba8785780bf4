"""Micro-benchmark of the log's sync: what making one small append durable costs on the
disk under --dir, five ways.

    python -m bench.micro_sync [--dir DIR] [--syncs N] [--record-size BYTES] [--repeat R]

Each sync follows one ``pwrite`` of a record after the last one in a preallocated file,
as the log appends (see broker/_log.py):

  on the thread   ``os.fdatasync`` on the calling thread (the broker's loop, when few
                  replies wait: ``--background-sync auto``)
  RWF_DSYNC       the write and its sync in one system call (``pwritev`` with RWF_DSYNC)
  native AIO      ``io_submit`` of an fdatasync, its end read from an eventfd (the
                  broker's background sync, broker/_aio.py), where the kernel has it
  a thread        a Python thread that waits for work, syncs, and signals an eventfd
  two at once     two appends, each with a sync of its own: the thread above syncs the
                  first, and once it is inside that sync the caller appends the second
                  and syncs it too, as the broker would if a put came during an ack's
                  sync and did not wait for it (the figure is per sync, half of the
                  pair's time): two syncs in flight against one after another

Prints, median of R runs: µs per sync from the start of the sync to the caller knowing it
is done; for the two handed-off ways, how long the hand-off itself keeps the caller (the
time its thread cannot serve anything else); and the process's CPU per append and sync
(user + system, both threads).
"""

from __future__ import annotations

import argparse
import os
import queue
import select
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Protocol

from bench._report import report_medians
from broker._aio import open_aio
from broker._log import allocate

_MAX_REGION = 16 << 20  # each way appends in a fresh region of its own, as to a new segment
_WAYS = 5
_MIB = 1 << 20
_STARTS_WITHIN = 5.0  # seconds the sync thread may take to start a submitted sync


def one_run(directory: str, syncs: int, record_size: int) -> dict[str, float]:
    record = b"r" * record_size
    figures: dict[str, float] = {}
    region = -(-syncs * record_size // _MIB) * _MIB  # whole MiB
    try:
        fd, path = tempfile.mkstemp(prefix="sluice-sync-", dir=directory)
    except OSError as error:
        raise SystemExit(f"cannot make a file under {directory}: {error}") from None
    try:
        try:
            allocate(fd, _WAYS * region)  # as the log allocates a segment
        except OSError as error:
            raise SystemExit(
                f"cannot allocate {_WAYS * region >> 20} MiB under {directory} ({error}): "
                "free some space, or pass fewer --syncs"
            ) from None
        os.fsync(fd)
        regions = iter(range(0, _WAYS * region, region))

        def measure(name: str, way: Way, records: int = 1) -> None:
            figures.update(_measure(name, syncs, len(record), next(regions), way, records))

        measure("on the thread", _on_thread(fd, record))
        measure("RWF_DSYNC", _rwf_dsync(fd, record))
        aio = open_aio()
        if aio is not None:
            try:
                measure("native AIO", _handed_off(fd, record, aio))
            finally:
                aio.close()
        with _SyncThread() as syncer:
            measure("a thread", _handed_off(fd, record, syncer))
        with _SyncThread(announce=True) as syncer:
            measure("two at once", _two_at_once(fd, record, syncer), records=2)
    finally:
        os.close(fd)
        os.unlink(path)
    return figures


# Each way is a function of the record's offset that makes the record durable and returns
# how long the hand-off kept the caller (0.0 when the caller does the sync itself).
Way = Callable[[int], float]


def _on_thread(fd: int, record: bytes) -> Way:
    def sync(offset: int) -> float:
        os.pwrite(fd, record, offset)
        os.fdatasync(fd)
        return 0.0

    return sync


def _rwf_dsync(fd: int, record: bytes) -> Way:
    def sync(offset: int) -> float:
        os.pwritev(fd, [record], offset, os.RWF_DSYNC)
        return 0.0

    return sync


class _Syncer(Protocol):
    """What ``_handed_off`` needs: start a sync, an eventfd readable when it is done."""

    @property
    def eventfd(self) -> int: ...

    def submit(self, fd: int, tag: int) -> None: ...
    def reap(self) -> list[tuple[int, int]]: ...


def _handed_off(fd: int, record: bytes, syncer: _Syncer) -> Way:
    def sync(offset: int) -> float:
        os.pwrite(fd, record, offset)
        started = time.perf_counter()
        syncer.submit(fd, offset)
        handed = time.perf_counter() - started
        _wait_done(syncer)
        return handed

    return sync


def _two_at_once(fd: int, record: bytes, syncer: _SyncThread) -> Way:
    def sync(offset: int) -> float:
        os.pwrite(fd, record, offset)
        started = time.perf_counter()
        syncer.submit(fd, offset)
        handed = time.perf_counter() - started
        syncer.wait_entered()
        os.pwrite(fd, record, offset + len(record))
        os.fdatasync(fd)
        _wait_done(syncer)
        return handed

    return sync


def _wait_done(syncer: _Syncer) -> None:
    """Wait for the sync handed to ``syncer``; raise ``OSError`` if it failed."""
    while not (done := syncer.reap()):
        select.select([syncer.eventfd], [], [], 1.0)
    for _, result in done:
        if result:  # a negative errno, as the sync's system call would have failed
            raise OSError(-result, os.strerror(-result))


class _SyncThread:
    """A Python thread that runs one fdatasync per ``submit`` and then writes the eventfd.
    With ``announce``, it also says when it starts each sync: each ``submit`` is then to
    be followed by one ``wait_entered``."""

    def __init__(self, announce: bool = False) -> None:
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK)
        self._jobs: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._done: list[tuple[int, int]] = []  # (tag, 0 or -errno), read after the eventfd
        self._thread = threading.Thread(target=self._run, daemon=True)
        # Released once per sync as the thread starts it (counted: none is missed).
        self._entered = threading.Semaphore(0) if announce else None

    def __enter__(self) -> _SyncThread:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._jobs.put(None)  # stop
        self._thread.join()
        os.close(self.eventfd)

    def submit(self, fd: int, tag: int) -> None:
        self._jobs.put((fd, tag))

    def wait_entered(self) -> None:
        """Return once the thread starts the sync submitted last (or has done it)."""
        assert self._entered is not None, "made without announce"
        if not self._entered.acquire(timeout=_STARTS_WITHIN):
            raise RuntimeError(f"the sync thread did not start a sync within {_STARTS_WITHIN} s")

    def reap(self) -> list[tuple[int, int]]:
        try:
            os.eventfd_read(self.eventfd)
        except BlockingIOError:
            return []
        done, self._done = self._done, []
        return done

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fd, tag = job
            if self._entered is not None:
                self._entered.release()
            try:
                os.fdatasync(fd)
                result = 0
            except OSError as error:
                result = -(error.errno or 1)
            self._done.append((tag, result))
            os.eventfd_write(self.eventfd, 1)


def _measure(
    name: str, syncs: int, size: int, offset: int, way: Way, records: int = 1
) -> dict[str, float]:
    """Run ``syncs`` appends of ``size`` bytes one after another from ``offset``,
    ``records`` of them (each with its sync) per call of ``way``."""
    took: list[float] = []
    handing: list[float] = []
    calls = max(1, syncs // records)
    cpu_before = sum(os.times()[:2])
    for _ in range(calls):
        started = time.perf_counter()
        handing.append(way(offset))
        took.append((time.perf_counter() - started) / records)
        offset += size * records
    cpu = sum(os.times()[:2]) - cpu_before
    syncs = calls * records
    figures = {f"{name}: µs per sync": statistics.median(took) * 1e6}
    if any(handing):
        figures[f"{name}: µs of hand-off"] = statistics.median(handing) * 1e6
    figures[f"{name}: µs CPU per sync"] = cpu / syncs * 1e6
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", default=".", help="a directory on the disk to measure")
    parser.add_argument("--syncs", type=int, default=2_000, help="syncs per way and run")
    parser.add_argument("--record-size", type=int, default=200, help="bytes per append")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.syncs < 1 or args.record_size < 1 or args.repeat < 1:
        parser.error("--syncs, --record-size and --repeat must be at least 1")
    if args.syncs * args.record_size > _MAX_REGION:
        parser.error(f"--syncs x --record-size must be at most {_MAX_REGION >> 20} MiB")
    if not os.path.isdir(args.dir):
        parser.error(f"--dir {args.dir}: not a directory")
    report_medians(
        f"sync of a {args.record_size}-byte append under {args.dir}, {args.syncs} per way",
        lambda: one_run(args.dir, args.syncs, args.record_size),
        args.repeat,
    )


if __name__ == "__main__":
    main()
