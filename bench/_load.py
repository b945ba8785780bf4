"""The load processes: producers that put and workers that reserve and ack.

Each process opens its connections, meets the others at a barrier (so timing starts with
every connection ready), runs, and sends one ``ChildResult`` back to the parent. Progress
goes through shared counters the parent reads; the parent's stop flag ends the run.

This module holds what a load process does whichever client form drives its connections
(``LoadProcess``): the put frames, their schedule, and what is recorded. The loops that
drive the connections are in ``_load_async`` (``--client async``: asyncio tasks on uvloop)
and ``_load_sync`` (``--client sync``: a thread per connection with a blocking client).
"""

from __future__ import annotations

import array
import importlib
import itertools
import math
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ._accounting import MIN_BODY, make_body, now_ns, read_body, token
from ._hist import Histogram
from ._servers import Delivery, Endpoint

RESERVE_WAIT = 0.25  # seconds a worker long-polls before it looks at the stop flag again
IDLE_WAIT = 20.0  # seconds an idle worker's long poll lasts before it polls again
CLIENT_FORMS = {
    "async": "asyncio clients on uvloop",
    "sync": "blocking clients in a thread per connection",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueLimit:
    """The limits the ``limited`` scenario sets on its queue: a token bucket shared by every
    consumer (``burst`` messages at once, ``rate`` more every ``per`` seconds) and, if set,
    a cap on the messages reserved at once."""

    rate: float
    per: float = 1.0
    burst: int
    max_in_flight: int | None = None

    @property
    def per_second(self) -> float:
        return self.rate / self.per

    def bound(self, seconds: float) -> float:
        """The most the bucket lets through in any window of ``seconds``."""
        return self.burst + self.per_second * seconds

    def allowance(self, seconds: float) -> int:
        """Messages a full bucket lets through in ``seconds`` from the first delivery."""
        return self.burst + math.ceil(self.per_second * seconds)

    def settings(self) -> dict[str, Any]:
        """The queue settings, as ``configure`` takes them."""
        rate_limit = {"rate": self.rate, "per": self.per, "burst": self.burst}
        return {"rate_limit": rate_limit, "max_in_flight": self.max_in_flight}


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
    client: str = "async"  # how a load process drives its connections: see CLIENT_FORMS
    # The limited scenario's queue limits. Set, workers also record when each delivery
    # was made (Sluice only: peers refuse a limited workload).
    limit: QueueLimit | None = None

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
    # With a limit: when the broker leased each delivery (its lease deadline, epoch seconds:
    # the reserve time plus the queue's lease, the same for every delivery of a run), and
    # when a worker received it (CLOCK_MONOTONIC ns).
    lease_deadlines: array.array[float] = field(default_factory=lambda: array.array("d"))
    received_ns: array.array[int] = field(default_factory=lambda: array.array("Q"))
    first_put_ns: int | None = None
    last_put_ns: int | None = None
    last_ack_ns: int | None = None
    cpu_seconds: float = 0.0  # from start_clock to stop_clock, every thread of the process
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


@dataclass(frozen=True, slots=True)
class PutFrame:
    """One put frame of a producer connection."""

    queue: str
    bodies: list[bytes]
    priority: int
    delay: float
    sent_ns: int  # when it is sent (open loop: when it is due); put latency counts from here


class LoadProcess:
    """What a load process does whichever client form drives its connections: the put
    frames each producer connection sends and when, and what is recorded when a put is
    confirmed or a delivery is acked. Safe to call from several threads at once."""

    def __init__(self, plan: ChildPlan, shared: Shared, result: ChildResult) -> None:
        self.plan, self.shared, self.result = plan, shared, result
        self.workload = plan.workload
        self.padding = b"x" * (self.workload.body_size - MIN_BODY)
        self.deadline_ns: int | None = None
        self._cpu_start: float | None = None
        self._recording = threading.Lock()  # guards the result and the shared counters

    @property
    def idle_queue(self) -> str:
        return f"{self.plan.endpoint.namespace}.idle"

    def start_clock(self) -> None:
        """Call once every process is ready. A timed run's time starts now, and so does the
        CPU this process is charged with (not its imports, nor opening its connections)."""
        self._cpu_start = time.process_time()
        if self.workload.duration is not None:
            self.deadline_ns = now_ns() + int(self.workload.duration * 1e9)

    def begin(self) -> bool:
        """Meet every other process at the barrier (connections open), then start the
        clock; False, and no clock, if this process already failed to connect."""
        self.shared.barrier.wait()
        if self.result.errors:
            return False
        self.start_clock()
        return True

    def cannot_connect(self, error: Exception) -> None:
        self.fail(f"cannot connect to {self.plan.endpoint.kind}: {error!r}")

    def stop_clock(self) -> None:
        """Call when the load is over, before closing the connections: the CPU this process
        (every thread of it) used since ``start_clock`` goes in the result."""
        if self._cpu_start is not None:
            self.result.cpu_seconds = time.process_time() - self._cpu_start

    def running(self) -> bool:
        """False once the parent said stop or a connection failed."""
        return not self.shared.stop.value and not self.shared.failed.value

    def fail(self, message: str) -> None:
        self.result.errors.append(message)
        self.shared.failed.value = 1

    def connection_failed(self, name: str, error: Exception) -> None:
        detail = traceback.format_exception_only(error)[-1].strip()
        self.fail(f"{self.plan.role} {name}: {detail}")

    # Producers ---------------------------------------------------------------------------

    def put_frames(self, slot: int) -> Iterator[PutFrame]:
        """The put frames of producer connection ``slot``, in order, until its share is
        put, the run's time is up, the parent says stop or a connection failed.

        Closed loop: a frame is stamped as it is made, and the caller sends it at once.
        Open loop (``rate``): frames are stamped with their schedule, one interval apart,
        and the caller sends each at its time whether or not earlier ones were confirmed.
        Latency counts from that time, so a server (or a client) that falls behind is
        charged for the wait (no coordinated omission)."""
        workload = self.workload
        interval_ns = 0.0
        if workload.rate is not None:
            interval_ns = workload.batch * 1e9 * workload.producers / workload.rate
        scheduled_ns = float(now_ns())
        seq = frame = 0
        while count := self._more(slot, seq):
            queue, priority, delay = self._frame(slot, frame)
            sent_ns = now_ns() if workload.rate is None else int(scheduled_ns)
            bodies = self._bodies(slot, seq, count, sent_ns + int(delay * 1e9))
            self.result.put_counts[slot] = seq + count
            yield PutFrame(queue, bodies, priority, delay, sent_ns)
            seq += count
            frame += 1
            scheduled_ns += interval_ns

    def _more(self, slot: int, seq: int) -> int:
        """How many messages the next frame of ``slot`` carries (0: the slot is done)."""
        if not self.running():
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

    def confirmed(self, frame: PutFrame) -> None:
        """Record that the server confirmed every message of ``frame``."""
        done_ns = now_ns()
        with self._recording:
            result = self.result
            result.put_confirm_us.record((done_ns - frame.sent_ns) // 1000)
            if result.first_put_ns is None or frame.sent_ns < result.first_put_ns:
                result.first_put_ns = frame.sent_ns
            if result.last_put_ns is None or done_ns > result.last_put_ns:
                result.last_put_ns = done_ns
            self.shared.puts[self.plan.index] += len(frame.bodies)

    # Workers -----------------------------------------------------------------------------

    def worker_queues(self, number: int) -> list[str]:
        return self.workload.worker_queues(self.plan.endpoint.namespace, number)

    def received(self, deliveries: list[Delivery]) -> list[int]:
        """Record how long ``deliveries`` took to arrive; their tokens, for ``acked``."""
        received_ns = now_ns()
        tokens = []
        with self._recording:
            for body, _ in deliveries:
                due_ns, message_token = read_body(body)
                self.result.deliver_us.record((received_ns - due_ns) // 1000)
                tokens.append(message_token)
            if self.workload.limit is not None:  # handles are Sluice client Messages
                self.result.lease_deadlines.extend(m.lease_deadline for _, m in deliveries)
                self.result.received_ns.extend(itertools.repeat(received_ns, len(deliveries)))
        return tokens

    def acked(self, tokens: list[int]) -> None:
        """Record that the server finished the deliveries these tokens came in."""
        done_ns = now_ns()
        with self._recording:
            result = self.result
            if result.last_ack_ns is None or done_ns > result.last_ack_ns:
                result.last_ack_ns = done_ns
            result.acked_tokens.extend(tokens)
            self.shared.acks[self.plan.index] += len(tokens)

    @staticmethod
    def idle_received(deliveries: list[Delivery]) -> None:
        """An idle worker's poll returned; raise if it brought a message."""
        if deliveries:
            raise RuntimeError("an idle worker received a message")


# Which client class drives each server, by client form; imported only when used, so a
# run needs only its own peers' client libraries.
CONNECTION_CLASSES: dict[tuple[str, bool], tuple[str, str]] = {
    ("sluice", False): ("._sluice", "SluiceConnection"),
    ("sluice", True): ("._sluice", "SluiceBlockingConnection"),
    ("beanstalkd", False): ("._peers", "BeanstalkdConnection"),
    ("beanstalkd", True): ("._peers", "GreenstalkConnection"),
    ("redis", False): ("._peers", "RedisConnection"),
    ("redis", True): ("._peers", "RedisBlockingConnection"),
}


def connection_for(endpoint: Endpoint, *, blocking: bool) -> Any:
    """A new (unopened) connection to ``endpoint`` in the asked-for client form."""
    module, name = CONNECTION_CLASSES[(endpoint.kind, blocking)]
    return getattr(importlib.import_module(module, __package__), name)(endpoint)
