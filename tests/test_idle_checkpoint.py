"""A checkpoint that comes due while no commit runs still starts.

A commit starts a checkpoint when one is due, but not while the last one is still
running: what is committed meanwhile waits for the next. On a broker that then goes idle
there is no next commit, so the server starts it on a timer of its own. Here the broker
runs in this process (a real store, a real socket, a real client), with its checkpoint
thread held at the start of the first checkpoint while a second put commits. A start
that fails (an I/O error opening the log's next segment, injected here as no real disk
gives one on demand) is tried again on the next tick and logged once."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from broker import Core
from broker._records import message_key
from broker._server import BrokerServer, ServerLimits
from broker._store import Store
from client import AsyncClient


def _in_lmdb(store: Store, message_id: int) -> bool:
    with store.env.begin() as txn:
        return txn.get(message_key(message_id), db=store._states) is not None


async def _wait_until(check: Callable[[], bool], message: str, timeout: float = 10.0) -> None:
    """Let the in-process broker's loop run until ``check()`` holds: each round yields to
    it for 10 ms (its checkpoint thread and timer run meanwhile), up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, message
        await asyncio.sleep(0.01)


async def _put_while_a_checkpoint_runs(directory: str) -> None:
    store = Store(directory, fsync="always", checkpoint_bytes=1 << 30, checkpoint_seconds=0.0)
    core = Core(track_changes=True)
    store.recover(core, time.time())
    held, release = threading.Event(), threading.Event()

    def hold_the_first(step: str) -> None:
        if step == "started" and not held.is_set():
            held.set()
            assert release.wait(10), "the test never released the checkpoint"

    store.at_checkpoint_step = hold_the_first
    server = BrokerServer(core, ServerLimits(max_frame=1 << 20), store=store)
    host, port = await server.start("127.0.0.1", 0)
    try:
        async with AsyncClient(host, port) as client:
            (first,) = await client.put_many("q", [b"first"])
            await _wait_until(held.is_set, "the first checkpoint never started")
            (second,) = await client.put_many("q", [b"second"])  # committed meanwhile
            release.set()
            await _wait_until(lambda: store.checkpoints >= 1, "the first checkpoint never ended")
            assert _in_lmdb(store, int(first))
            # Nothing more is asked of the broker: its own timer starts the next one.
            await _wait_until(
                lambda: store.checkpoints >= 2 and _in_lmdb(store, int(second)),
                "what was committed during a checkpoint stayed only in the log",
            )
    finally:
        await server.shutdown(grace=1.0)
        store.close()


def test_an_idle_broker_checkpoints_what_came_during_the_last_checkpoint(tmp_path: Path) -> None:
    asyncio.run(_put_while_a_checkpoint_runs(str(tmp_path / "data")))


async def _ticks_that_fail(directory: str) -> list[str]:
    """Two checkpoint ticks whose start fails, then one that works: what each logs."""
    store = Store(directory, fsync="always")
    core = Core(track_changes=True)
    store.recover(core, time.time())
    server = BrokerServer(core, ServerLimits(max_frame=1 << 20), store=store)
    await server.start("127.0.0.1", 0)
    failures = [OSError(5, "Input/output error")] * 2

    def start_or_fail() -> None:
        if failures:
            raise failures.pop()

    store.checkpoint_if_due = start_or_fail  # type: ignore[method-assign]
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("sluice.server").addHandler(handler)
    try:
        for _ in range(3):
            server._checkpoint_tick()  # as its timer would, each re-arming it
        assert server._checkpoint_timer is not None
    finally:
        logging.getLogger("sluice.server").removeHandler(handler)
        await server.shutdown(grace=1.0)
        store.close()
    return records


def test_a_checkpoint_that_cannot_start_is_tried_again_and_logged_once(tmp_path: Path) -> None:
    records = asyncio.run(_ticks_that_fail(str(tmp_path / "data")))
    assert records == ["could not start a checkpoint, retrying: [Errno 5] Input/output error"]
