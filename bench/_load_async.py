"""The asyncio load: each load process runs one uvloop event loop with many connections,
one asyncio task each."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, cast

import uvloop

from ._accounting import now_ns
from ._load import (
    IDLE_WAIT,
    RESERVE_WAIT,
    ChildPlan,
    ChildResult,
    LoadProcess,
    PutFrame,
    Shared,
    connection_for,
)
from ._servers import Connection, Endpoint

MAX_IN_FLIGHT = 10_000  # open loop: puts one producer connection may have unconfirmed


def open_connection(endpoint: Endpoint) -> Connection:
    return cast(Connection, connection_for(endpoint, blocking=False))


def run_async(plan: ChildPlan, shared: Shared, result: ChildResult) -> None:
    """Run ``plan`` on a uvloop event loop until it is done or the parent says stop."""
    uvloop.run(AsyncLoad(plan, shared, result).main())


class AsyncLoad(LoadProcess):
    async def main(self) -> None:
        plan = self.plan
        connections = [open_connection(plan.endpoint) for _ in plan.connections]
        idle = [open_connection(plan.endpoint) for _ in range(plan.idle_connections)]
        try:
            await asyncio.gather(*(c.open() for c in connections + idle))
        except Exception as error:
            self.cannot_connect(error)
        try:
            if not self.begin():
                return
            if plan.role == "producer":
                await self._produce_all(connections)
            else:
                await self._consume_all(connections, idle)
        finally:
            self.stop_clock()
            await asyncio.gather(*(c.close() for c in connections + idle), return_exceptions=True)

    async def _guard(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        """Run one connection's loop; a failure is recorded and flagged, not raised."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self.connection_failed(name, error)

    # Producers ---------------------------------------------------------------------------

    async def _produce_all(self, connections: list[Connection]) -> None:
        loop = self._produce_closed if self.workload.rate is None else self._produce_open
        await asyncio.gather(
            *(
                self._guard(f"slot {slot}", loop(connection, slot))
                for connection, slot in zip(connections, self.plan.connections, strict=True)
            )
        )

    async def _produce_closed(self, connection: Connection, slot: int) -> None:
        """Put, wait for the confirmation, put again: as fast as the server allows."""
        for frame in self.put_frames(slot):
            await self._put(connection, frame)

    async def _produce_open(self, connection: Connection, slot: int) -> None:
        """Send each frame at its scheduled time, with up to MAX_IN_FLIGHT unconfirmed."""
        in_flight: set[asyncio.Task[None]] = set()
        for frame in self.put_frames(slot):
            wait_ns = frame.sent_ns - now_ns()
            if wait_ns > 0:
                await asyncio.sleep(wait_ns / 1e9)
            if len(in_flight) >= MAX_IN_FLIGHT:
                await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            task = asyncio.create_task(self._guard(f"slot {slot}", self._put(connection, frame)))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(in_flight)

    async def _put(self, connection: Connection, frame: PutFrame) -> None:
        await connection.put(frame.queue, frame.bodies, frame.priority, frame.delay)
        self.confirmed(frame)

    # Workers -----------------------------------------------------------------------------

    async def _consume_all(self, connections: list[Connection], idle: list[Connection]) -> None:
        loops = [
            self._guard(f"{number}", self._work(connection, number))
            for connection, number in zip(connections, self.plan.connections, strict=True)
        ]
        idlers = [asyncio.create_task(self._guard("idle", self._idle(c))) for c in idle]
        await asyncio.gather(*loops)
        for task in idlers:
            task.cancel()
        await asyncio.gather(*idlers, return_exceptions=True)

    async def _work(self, connection: Connection, number: int) -> None:
        """Reserve, record, ack, until the parent says stop."""
        queues, batch = self.worker_queues(number), self.workload.batch
        while self.running():
            deliveries = await connection.reserve(queues, batch, RESERVE_WAIT)
            if deliveries:
                tokens = self.received(deliveries)
                await connection.ack([handle for _, handle in deliveries])
                self.acked(tokens)

    async def _idle(self, connection: Connection) -> None:
        """Long-poll a queue nobody puts to, until cancelled."""
        while True:
            self.idle_received(await connection.reserve([self.idle_queue], 1, IDLE_WAIT))
