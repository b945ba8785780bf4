"""The load processes: producers that put and workers that reserve and ack.

Each process runs one uvloop event loop with many connections, one asyncio task each. It
opens its connections, meets the others at a barrier (so timing starts with every
connection ready), runs, and sends one ``ChildResult`` back to the parent. Progress goes
through shared counters the parent reads; the parent's stop flag ends the run.
"""

from __future__ import annotations

import array
import asyncio
import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import uvloop

from ._accounting import MIN_BODY, make_body, now_ns, read_body, token
from ._hist import Histogram
from ._servers import Connection, Endpoint

RESERVE_WAIT = 0.25  # seconds a worker long-polls before it looks at the stop flag again
IDLE_WAIT = 20.0  # seconds an idle worker's long poll lasts before it polls again
MAX_IN_FLIGHT = 10_000  # open loop: puts one producer connection may have unconfirmed


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """The shape of one run, the same whichever server it runs against."""

    messages: int | None = None  # total to put; None: put for ``duration`` seconds
    duration: float | None = None
    producers: int = 1  # producer connections
    workers: int = 8  # worker connections that take the load
    idle_workers: int = 0  # extra connections long-polling a queue that stays empty
    body_size: int = 100
    batch: int = 1  # messages per put, per reserve and per ack
    priorities: int = 1  # put frame k has priority k % priorities
    delay_fraction: float = 0.0  # this share of put frames is delayed
    delay_seconds: float = 1.0
    rate: float | None = None  # open loop: messages/s offered in all; None: closed loop
    queues: int = 1
    processes: int = 1  # client processes for each side (producers, workers)
    stall_timeout: float = 30.0  # give up when nothing is put or acked for this long

    def queue_names(self, namespace: str) -> list[str]:
        return [f"{namespace}.{index}" for index in range(self.queues)]

    def worker_queues(self, namespace: str, worker: int) -> list[str]:
        """The queues worker connection ``worker`` reserves from: the queues are dealt out
        round-robin, so every queue has a worker and every worker has a queue."""
        names = self.queue_names(namespace)
        groups = min(max(self.workers, 1), len(names))
        return [name for index, name in enumerate(names) if index % groups == worker % groups]

    def share(self, slot: int) -> int | None:
        """Messages producer connection ``slot`` puts (None in a timed run)."""
        if self.messages is None:
            return None
        return self.messages // self.producers + (slot < self.messages % self.producers)


@dataclass
class ChildResult:
    """What one load process measured."""

    role: str
    index: int
    put_counts: dict[int, int] = field(default_factory=dict)  # slot -> messages put
    acked_tokens: array.array[int] = field(default_factory=lambda: array.array("Q"))
    put_confirm_us: Histogram = field(default_factory=Histogram)
    deliver_us: Histogram = field(default_factory=Histogram)
    first_put_ns: int | None = None
    last_put_ns: int | None = None
    last_ack_ns: int | None = None
    cpu_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


@dataclass
class Shared:
    """Counters and flags shared between the parent and the load processes."""

    barrier: Any  # every process and the parent, before timing starts
    results: Any  # multiprocessing queue of ChildResult
    stop: Any  # RawValue: the parent sets 1 to end the run
    failed: Any  # RawValue: a child sets 1 when one of its connections failed
    puts: Any  # RawArray: messages put, per process
    acks: Any  # RawArray: messages acked, per process
    finished: Any  # RawArray: 1 once the process's own work is done


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildPlan:
    role: str  # "producer" or "worker"
    index: int  # this process's slot in Shared's arrays
    endpoint: Endpoint
    workload: Workload
    connections: list[int]  # producer slots, or worker numbers
    idle_connections: int = 0


def open_connection(endpoint: Endpoint) -> Connection:
    """A connection of the kind the endpoint names (peer clients imported only here)."""
    if endpoint.kind == "sluice":
        from ._sluice import SluiceConnection

        return SluiceConnection(endpoint)
    from ._peers import BeanstalkdConnection, RedisConnection

    if endpoint.kind == "beanstalkd":
        return BeanstalkdConnection(endpoint)
    return RedisConnection(endpoint)


def run_child(plan: ChildPlan, shared: Shared) -> None:
    """Process entry point: run the plan and always send back a result."""
    result = ChildResult(plan.role, plan.index)
    cpu_start = time.process_time()
    try:
        uvloop.run(_Child(plan, shared, result).main())
    except BaseException as error:
        result.errors.append(f"{plan.role} process {plan.index}: {error!r}")
        shared.failed.value = 1
    result.cpu_seconds = time.process_time() - cpu_start
    shared.finished[plan.index] = 1
    shared.results.put(result)


class _Child:
    def __init__(self, plan: ChildPlan, shared: Shared, result: ChildResult) -> None:
        self.plan, self.shared, self.result = plan, shared, result
        self.workload = plan.workload
        self.padding = b"x" * (self.workload.body_size - MIN_BODY)
        self.deadline_ns: int | None = None

    async def main(self) -> None:
        plan = self.plan
        connections = [open_connection(plan.endpoint) for _ in plan.connections]
        idle = [open_connection(plan.endpoint) for _ in range(plan.idle_connections)]
        try:
            await asyncio.gather(*(c.open() for c in connections + idle))
        except Exception as error:
            self._fail(f"cannot connect to {plan.endpoint.kind}: {error!r}")
        try:
            self.shared.barrier.wait()
            if self.result.errors:
                return
            if self.workload.duration is not None:
                self.deadline_ns = now_ns() + int(self.workload.duration * 1e9)
            if plan.role == "producer":
                await self._produce_all(connections)
            else:
                await self._consume_all(connections, idle)
        finally:
            await asyncio.gather(*(c.close() for c in connections + idle), return_exceptions=True)

    def _fail(self, message: str) -> None:
        self.result.errors.append(message)
        self.shared.failed.value = 1

    async def _guard(self, name: str, work: Any) -> None:
        """Run one connection's loop; a failure is recorded and flagged, not raised."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as error:
            detail = traceback.format_exception_only(error)[-1].strip()
            self._fail(f"{self.plan.role} {name}: {detail}")

    # Producers ---------------------------------------------------------------------------

    async def _produce_all(self, connections: list[Connection]) -> None:
        loop = self._produce_closed if self.workload.rate is None else self._produce_open
        await asyncio.gather(
            *(
                self._guard(f"slot {slot}", loop(connection, slot))
                for connection, slot in zip(connections, self.plan.connections, strict=True)
            )
        )

    def _more(self, slot: int, seq: int) -> int:
        """How many messages the next frame of ``slot`` carries (0: the slot is done)."""
        if self.shared.stop.value or self.shared.failed.value:
            return 0
        share = self.workload.share(slot)
        if share is None:
            if self.deadline_ns is not None and now_ns() >= self.deadline_ns:
                return 0
            return self.workload.batch
        return min(self.workload.batch, share - seq)

    def _frame(self, slot: int, frame: int) -> tuple[str, int, float]:
        """(queue, priority, delay) of put frame ``frame`` of ``slot``."""
        workload = self.workload
        queue = f"{self.plan.endpoint.namespace}.{(slot + frame) % workload.queues}"
        fraction = workload.delay_fraction
        delayed = math.floor((frame + 1) * fraction) > math.floor(frame * fraction)
        delay = workload.delay_seconds if delayed else 0.0
        return queue, (slot + frame) % workload.priorities, delay

    def _bodies(self, slot: int, seq: int, count: int, due_ns: int) -> list[bytes]:
        padding = self.padding
        return [make_body(due_ns, token(slot, seq + i), padding) for i in range(count)]

    def _confirmed(self, slot: int, count: int, sent_ns: int) -> None:
        result = self.result
        done_ns = now_ns()
        result.put_confirm_us.record((done_ns - sent_ns) // 1000)
        if result.first_put_ns is None or sent_ns < result.first_put_ns:
            result.first_put_ns = sent_ns
        if result.last_put_ns is None or done_ns > result.last_put_ns:
            result.last_put_ns = done_ns
        self.shared.puts[self.plan.index] += count

    async def _produce_closed(self, connection: Connection, slot: int) -> None:
        """Put, wait for the confirmation, put again: as fast as the server allows."""
        seq = frame = 0
        while count := self._more(slot, seq):
            queue, priority, delay = self._frame(slot, frame)
            sent_ns = now_ns()
            bodies = self._bodies(slot, seq, count, sent_ns + int(delay * 1e9))
            self.result.put_counts[slot] = seq + count
            await connection.put(queue, bodies, priority, delay)
            self._confirmed(slot, count, sent_ns)
            seq += count
            frame += 1

    async def _produce_open(self, connection: Connection, slot: int) -> None:
        """Put on a fixed schedule whether or not earlier puts were confirmed. Latency is
        measured from the scheduled time, so a server that falls behind is charged for
        the wait (no coordinated omission)."""
        assert self.workload.rate is not None
        interval_ns = self.workload.batch * 1e9 * self.workload.producers / self.workload.rate
        in_flight: set[asyncio.Task[None]] = set()
        seq = frame = 0
        scheduled_ns = float(now_ns())
        while count := self._more(slot, seq):
            wait_ns = scheduled_ns - now_ns()
            if wait_ns > 0:
                await asyncio.sleep(wait_ns / 1e9)
            if len(in_flight) >= MAX_IN_FLIGHT:
                await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            queue, priority, delay = self._frame(slot, frame)
            sent_ns = int(scheduled_ns)
            bodies = self._bodies(slot, seq, count, sent_ns + int(delay * 1e9))
            self.result.put_counts[slot] = seq + count
            put = self._put_confirmed(connection, slot, (queue, bodies, priority, delay), sent_ns)
            task = asyncio.create_task(self._guard(f"slot {slot}", put))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            seq += count
            frame += 1
            scheduled_ns += interval_ns
        if in_flight:
            await asyncio.wait(in_flight)

    async def _put_confirmed(
        self, connection: Connection, slot: int, frame: tuple[Any, ...], sent_ns: int
    ) -> None:
        queue, bodies, priority, delay = frame
        await connection.put(queue, bodies, priority, delay)
        self._confirmed(slot, len(bodies), sent_ns)

    # Workers -----------------------------------------------------------------------------

    async def _consume_all(self, connections: list[Connection], idle: list[Connection]) -> None:
        namespace = self.plan.endpoint.namespace
        loops = [
            self._guard(f"{number}", self._work(connection, number))
            for connection, number in zip(connections, self.plan.connections, strict=True)
        ]
        idlers = [
            asyncio.create_task(self._guard("idle", self._idle(c, f"{namespace}.idle")))
            for c in idle
        ]
        await asyncio.gather(*loops)
        for task in idlers:
            task.cancel()
        await asyncio.gather(*idlers, return_exceptions=True)

    async def _work(self, connection: Connection, number: int) -> None:
        """Reserve, record, ack, until the parent says stop."""
        queues = self.workload.worker_queues(self.plan.endpoint.namespace, number)
        batch = self.workload.batch
        result, shared, index = self.result, self.shared, self.plan.index
        while not shared.stop.value and not shared.failed.value:
            deliveries = await connection.reserve(queues, batch, RESERVE_WAIT)
            if not deliveries:
                continue
            received_ns = now_ns()
            tokens = []
            for body, _ in deliveries:
                due_ns, message_token = read_body(body)
                result.deliver_us.record((received_ns - due_ns) // 1000)
                tokens.append(message_token)
            await connection.ack([handle for _, handle in deliveries])
            result.last_ack_ns = now_ns()
            result.acked_tokens.extend(tokens)
            shared.acks[index] += len(tokens)

    async def _idle(self, connection: Connection, queue: str) -> None:
        """Long-poll a queue nobody puts to, until cancelled."""
        while True:
            deliveries = await connection.reserve([queue], 1, IDLE_WAIT)
            if deliveries:
                raise RuntimeError("an idle worker received a message")
