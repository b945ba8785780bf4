"""The writer thread: runs the store's commits one after another, off the event loop.

The loop hands over work with ``submit`` (a deque append and, if the thread sleeps, one
wake-up) and hears back through ``loop.call_soon_threadsafe``: no future, no executor
per batch. Work runs in the order it was submitted; each item's ``done(error, seconds)``
runs on the loop, in the same order.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from typing import Final

Done = Callable[[BaseException | None, float], None]
_STOP: Final = None


class Committer:
    def __init__(self, loop: asyncio.AbstractEventLoop, name: str = "sluice-store") -> None:
        self._loop = loop
        self._work: collections.deque[tuple[Callable[[], None], Done] | None] = collections.deque()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[], None], done: Done) -> None:
        """Run ``work()`` on the writer thread, then ``done(error, seconds)`` on the loop
        (``error`` is what ``work`` raised, or None)."""
        self._work.append((work, done))
        self._wake.set()

    def stop(self) -> None:
        """Finish what was submitted, then end the thread (waits for it)."""
        self._work.append(_STOP)
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()  # before draining: a submit after this wakes us again
            while self._work:
                item = self._work.popleft()
                if item is _STOP:
                    return
                work, done = item
                started = time.perf_counter()
                error: BaseException | None = None
                try:
                    work()
                except BaseException as failure:  # reported on the loop, never lost here
                    error = failure
                seconds = time.perf_counter() - started
                try:
                    self._loop.call_soon_threadsafe(done, error, seconds)
                except RuntimeError:
                    return  # the loop is closed: nobody is waiting any more
