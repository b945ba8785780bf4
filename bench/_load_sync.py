"""The thread load (``--client sync``): each load process gives each of its connections a
thread of its own and a blocking client, as an application built on a blocking client
would. The threads of one process share its interpreter lock, so only one of them runs
Python code at a time; what that costs is part of what this form measures."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from ._accounting import now_ns
from ._load import (
    IDLE_WAIT,
    RESERVE_WAIT,
    ChildPlan,
    ChildResult,
    LoadProcess,
    Shared,
    connection_for,
)
from ._servers import BlockingConnection, Endpoint


def open_blocking_connection(endpoint: Endpoint) -> BlockingConnection:
    return cast(BlockingConnection, connection_for(endpoint, blocking=True))


def run_threads(plan: ChildPlan, shared: Shared, result: ChildResult) -> None:
    """Run ``plan`` with a thread per connection until it is done or the parent says stop."""
    ThreadLoad(plan, shared, result).main()


class ThreadLoad(LoadProcess):
    def main(self) -> None:
        plan = self.plan
        connections = [open_blocking_connection(plan.endpoint) for _ in plan.connections]
        idle = [open_blocking_connection(plan.endpoint) for _ in range(plan.idle_connections)]
        try:
            for connection in connections + idle:
                connection.open()
        except Exception as error:
            self.cannot_connect(error)
        try:
            if not self.begin():
                return
            threads = self._threads(connections)
            for connection in idle:
                threading.Thread(target=self._idle, args=(connection,), daemon=True).start()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            self.stop_clock()
            # Not the idle connections: their threads may still be in a long poll, and
            # the process's exit closes them.
            for connection in connections:
                with contextlib.suppress(Exception):
                    connection.close()

    def _threads(self, connections: list[BlockingConnection]) -> list[threading.Thread]:
        """A thread per producer or worker connection, not started."""
        producing = self.plan.role == "producer"
        loop = self._produce if producing else self._work
        return [
            threading.Thread(
                target=self._guard,
                args=(f"slot {number}" if producing else f"{number}", loop, connection, number),
            )
            for connection, number in zip(connections, self.plan.connections, strict=True)
        ]

    def _guard(self, name: str, loop: Callable[..., None], *args: Any) -> None:
        """Run one connection's loop; a failure is recorded and flagged, not raised."""
        try:
            loop(*args)
        except Exception as error:
            self.connection_failed(name, error)

    def _produce(self, connection: BlockingConnection, slot: int) -> None:
        """Send each frame when it is due and wait for its confirmation: at once in a
        closed loop, at its scheduled time in an open one. A blocking connection has one
        put in flight, so a put confirmed late delays the next, and the next one's
        latency (counted from its scheduled time) includes that wait."""
        for frame in self.put_frames(slot):
            wait_ns = frame.sent_ns - now_ns()
            if wait_ns > 0:
                time.sleep(wait_ns / 1e9)
            connection.put(frame.queue, frame.bodies, frame.priority, frame.delay)
            self.confirmed(frame)

    def _work(self, connection: BlockingConnection, number: int) -> None:
        """Reserve, record, ack, until the parent says stop."""
        queues, batch = self.worker_queues(number), self.workload.batch
        while self.running():
            deliveries = connection.reserve(queues, batch, RESERVE_WAIT)
            if deliveries:
                tokens = self.received(deliveries)
                connection.ack([handle for _, handle in deliveries])
                self.acked(tokens)

    def _idle(self, connection: BlockingConnection) -> None:
        """Long-poll a queue nobody puts to while the run lasts. A blocking poll cannot be
        cancelled: the process sends its result and exits without waiting for this thread,
        so a failure counts only while the run lasts."""
        try:
            while self.running():
                self.idle_received(connection.reserve([self.idle_queue], 1, IDLE_WAIT))
        except Exception as error:
            if self.running():
                self.connection_failed("idle", error)
