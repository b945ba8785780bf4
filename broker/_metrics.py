"""Prometheus metrics and the health check, served over HTTP on the broker's own loop.

Nothing is counted for Prometheus on the hot path. The core already keeps per-queue counts
and totals; the server keeps ``ServerMetrics`` (plain integers and fixed-bucket
``Histogram``s). ``BrokerCollector`` turns all of it into metric families when Prometheus
scrapes, on the loop thread, so it reads live state without locks.

``MetricsEndpoint`` is a tiny HTTP/1.1 server: ``GET /metrics`` (the text exposition
format), ``GET /healthz`` (200 ``ok``, or 503 and a one-line reason), 404 for any other
path. One request per connection (``Connection: close``), request head of at most 8 KiB.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

from protocol import OPS, SluiceError

from . import __version__
from ._core import Core
from ._histogram import BATCH_RECORDS, COMMIT_SECONDS, REQUEST_SECONDS, Histogram
from ._lifecycle import State
from ._logging import event
from ._queue import Queue

if TYPE_CHECKING:
    from ._server import BrokerServer
    from ._store import Recovered, Store

log = logging.getLogger("sluice.metrics")

UNKNOWN_OP: Final = "unknown"  # an op this broker does not have (keeps the label bounded)
INVALID: Final = "invalid"  # the frame was not a request at all
OK: Final = "ok"  # the outcome of a request that succeeded (or is left waiting)
OLDEST_SCAN_LIMIT: Final = 100_000  # above this many ready, the age is the next message's
MAX_REQUEST_HEAD: Final = 8192
READ_TIMEOUT: Final = 10.0
_MAX_ERROR_TEXT: Final = 300  # characters of a commit error kept for /healthz
DEPTH_STATES: Final = (State.READY, State.DELAYED, State.RESERVED, State.DEAD)


def outcome_of(error: SluiceError) -> str:
    """The ``outcome`` label of a failed request: its wire error code."""
    return error.code.value if error.code is not None else "INTERNAL"


class ServerMetrics:
    """What the server counts as it works, as plain data. ``request_done`` is the only
    per-request cost: a histogram observation (whose count is also the request count),
    plus a dict increment for a request that failed."""

    __slots__ = (
        "commit_failures",
        "commit_records",
        "commit_seconds",
        "commits",
        "connections_opened",
        "failed",
        "failing_commits",
        "handling",
        "last_commit_error",
        "recovered",
    )

    def __init__(self) -> None:
        self.failed: dict[tuple[str, str], int] = {}  # (op, error code) -> count
        self.handling = {op: Histogram(REQUEST_SECONDS) for op in (*OPS, UNKNOWN_OP, INVALID)}
        self.commit_records = Histogram(BATCH_RECORDS)
        self.commit_seconds = Histogram(COMMIT_SECONDS)
        self.commits = 0
        self.commit_failures = 0
        self.failing_commits = 0  # failures since the last successful commit
        self.last_commit_error = ""
        self.connections_opened = 0
        self.recovered: Recovered | None = None

    def request_done(self, op: str, outcome: str, seconds: float) -> None:
        """One request answered (or left waiting) after ``seconds`` on the loop."""
        histogram = self.handling.get(op)
        if histogram is None:
            op, histogram = UNKNOWN_OP, self.handling[UNKNOWN_OP]
        histogram.observe(seconds)
        if outcome != OK:
            key = (op, outcome)
            self.failed[key] = self.failed.get(key, 0) + 1

    def requests(self) -> dict[tuple[str, str], int]:
        """Requests answered so far by ``(op, outcome)``; outcome "ok" or an error code."""
        counts = dict(self.failed)
        for op, histogram in self.handling.items():
            ok = histogram.count - sum(n for (o, _), n in self.failed.items() if o == op)
            if ok:
                counts[(op, OK)] = ok
        return counts

    def commit_done(self, records: int, seconds: float) -> None:
        self.commits += 1
        self.commit_records.observe(records)
        self.commit_seconds.observe(seconds)
        self.failing_commits = 0

    def commit_failed(self, error: BaseException) -> None:
        self.commit_failures += 1
        self.failing_commits += 1
        text = " ".join(str(error).split())[:_MAX_ERROR_TEXT]
        self.last_commit_error = text or type(error).__name__


def health(server: BrokerServer) -> str | None:
    """None if the broker is serving and its store is writable, else a one-line reason."""
    if server.shutting_down:
        return "shutting down"
    metrics = server.metrics
    failures, error = metrics.failing_commits, metrics.last_commit_error
    if failures:
        return f"store: {failures} commits failed in a row: {error}"
    store = server.store
    full = store.full() if store is not None else None
    if full is not None:
        return f"store: storage is full ({full}): puts are refused; acks and reads still work"
    if store is not None and store.checkpoint_error is not None:
        return f"store: checkpoints are failing (retried each second): {store.checkpoint_error}"
    return None


# ------------------------------------------------------------------ collector


def _buckets(histogram: Histogram) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs, the last one ``+Inf``."""
    return [
        ("+Inf" if bound == math.inf else repr(bound), count)
        for bound, count in histogram.cumulative()
    ]


def oldest_ready_at(core: Core, queue: Queue) -> float | None:
    """When the queue's longest-ready message became ready (None: nothing is ready).
    Scans the ready messages, O(ready); above ``OLDEST_SCAN_LIMIT`` of them it takes the
    next message to be delivered instead (the oldest of the highest priority)."""
    ready = queue.counts[State.READY]
    if ready == 0:
        return None
    if ready > OLDEST_SCAN_LIMIT:
        top = queue.ready.peek()
        return None if top is None else core.messages[top[-1]].ready_at
    messages = core.messages
    return min((messages[entry[-1]].ready_at for entry in queue.ready.live_entries()), default=None)


_QUEUE_TOTALS: Final = {
    "put": ("sluice_queue_messages_put", "Messages put into the queue"),
    "delivered": ("sluice_queue_messages_delivered", "Deliveries (reserves) from the queue"),
    "acked": ("sluice_queue_messages_acked", "Messages acked (done)"),
    "nacked": ("sluice_queue_messages_nacked", "Deliveries given back by nack"),
    "expired": ("sluice_queue_leases_expired", "Leases that ran out without ack or nack"),
    "dead_lettered": ("sluice_queue_messages_dead_lettered", "Messages dead-lettered"),
}


class _QueueFamilies:
    """The per-queue metric families of one scrape."""

    def __init__(self) -> None:
        labels = ["queue"]
        self.depth = GaugeMetricFamily(
            "sluice_queue_messages", "Messages in the queue by state", labels=["queue", "state"]
        )
        self.totals = {
            key: CounterMetricFamily(name, text, labels=labels)
            for key, (name, text) in _QUEUE_TOTALS.items()
        }
        self.oldest = GaugeMetricFamily(
            "sluice_queue_oldest_ready_age_seconds",
            "How long the longest-ready message has been ready (0: none ready)",
            labels=labels,
        )
        self.waiting = GaugeMetricFamily(
            "sluice_queue_consumers_waiting",
            "Long-poll reserves waiting on the queue",
            labels=labels,
        )
        self.leases = GaugeMetricFamily(
            "sluice_queue_leases", "Leases held by consumers (reserved messages)", labels=labels
        )
        self.paused = GaugeMetricFamily("sluice_queue_paused", "1 if paused", labels=labels)
        self.processing = HistogramMetricFamily(
            "sluice_queue_processing_seconds",
            "Reserve to ack, per acked message (since the broker started)",
            labels=labels,
        )

    def add(self, core: Core, queue: Queue, now: float) -> None:
        name = [queue.name]
        for state in DEPTH_STATES:
            self.depth.add_metric([queue.name, state.value], queue.counts[state])
        for key, family in self.totals.items():
            family.add_metric(name, queue.totals[key])
        ready_at = oldest_ready_at(core, queue)
        self.oldest.add_metric(name, 0.0 if ready_at is None else max(0.0, now - ready_at))
        self.waiting.add_metric(name, len(queue.waiters))
        self.leases.add_metric(name, queue.counts[State.RESERVED])
        self.paused.add_metric(name, 1 if queue.settings.paused else 0)
        processing = queue.processing
        self.processing.add_metric(name, _buckets(processing), processing.sum)

    def families(self) -> Iterator[Metric]:
        yield self.depth
        yield from self.totals.values()
        yield from (self.oldest, self.waiting, self.leases, self.paused, self.processing)


def _histogram_family(name: str, text: str, histogram: Histogram) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, text)
    family.add_metric([], _buckets(histogram), histogram.sum)
    return family


def request_families(metrics: ServerMetrics) -> Iterator[Metric]:
    requests = CounterMetricFamily(
        "sluice_requests", "Requests answered, by op and outcome", labels=["op", "outcome"]
    )
    for (op, outcome), count in sorted(metrics.requests().items()):
        requests.add_metric([op, outcome], count)
    yield requests
    handling = HistogramMetricFamily(
        "sluice_request_handling_seconds",
        "Time on the event loop from a request's frame to its queued reply; excludes the "
        "wait for the group commit (sluice_commit_seconds)",
        labels=["op"],
    )
    for op, histogram in sorted(metrics.handling.items()):
        if histogram.count:
            handling.add_metric([op], _buckets(histogram), histogram.sum)
    yield handling


def connection_families(server: BrokerServer) -> Iterator[Metric]:
    connections = server.connections.values()
    yield GaugeMetricFamily("sluice_connections", "Open client connections", len(connections))
    yield CounterMetricFamily(
        "sluice_connections_opened", "Connections accepted", server.metrics.connections_opened
    )
    consumers = sum(1 for connection in connections if connection.consumer)
    yield GaugeMetricFamily(
        "sluice_consumer_connections", "Open connections that have sent a reserve", consumers
    )


def limit_families(core: Core, now: float) -> Iterator[Metric]:
    """Series of the queues that have a rate limit or a concurrency cap (only those)."""
    labels = ["queue"]
    tokens = GaugeMetricFamily(
        "sluice_queue_rate_limit_tokens", "Tokens available in the queue's bucket", labels=labels
    )
    in_flight = GaugeMetricFamily(
        "sluice_queue_in_flight", "Reserved messages of a limited queue", labels=labels
    )
    cap = GaugeMetricFamily("sluice_queue_max_in_flight", "The queue's cap", labels=labels)
    throttled = CounterMetricFamily(
        "sluice_queue_throttled_seconds",
        "Time ready messages were held back from consumers by a limit",
        labels=labels,
    )
    parked = CounterMetricFamily(
        "sluice_queue_reserves_parked_by_limit",
        "Long-poll reserves that had to wait because of a limit",
        labels=labels,
    )
    for name in sorted(core.queues):
        queue = core.queues[name]
        if queue.limits is None:
            continue
        stats = queue.limits.stats(now, queue.counts[State.RESERVED])
        if stats["tokens"] is not None:
            tokens.add_metric([name], stats["tokens"])
        if stats["max_in_flight"] is not None:
            cap.add_metric([name], stats["max_in_flight"])
        in_flight.add_metric([name], stats["in_flight"])
        throttled.add_metric([name], stats["throttled_seconds"])
        parked.add_metric([name], stats["parked_by_limit"])
    yield from (tokens, in_flight, cap, throttled, parked)


_SCHEDULE_COUNTS: Final = {
    "runs": ("sluice_schedule_fires", "Slots a schedule fired"),
    "triggered": ("sluice_schedule_triggers", "Fires asked for by trigger"),
    "missed": ("sluice_schedule_missed_slots", "Slots due while the broker was down or late"),
    "skipped": ("sluice_schedule_skipped_slots", "Slots not fired (catch-up or overlap)"),
}


def schedule_families(core: Core) -> Iterator[Metric]:
    labels = ["queue", "schedule"]
    families = {
        key: CounterMetricFamily(name, text, labels=labels)
        for key, (name, text) in _SCHEDULE_COUNTS.items()
    }
    upcoming = GaugeMetricFamily(
        "sluice_schedule_next_fire_timestamp_seconds",
        "When the schedule fires next (absent once it is finished)",
        labels=labels,
    )
    for key in sorted(core.schedules):
        schedule = core.schedules[key]
        for field, family in families.items():
            family.add_metric(list(key), getattr(schedule, field))
        if schedule.next_at is not None:
            upcoming.add_metric(list(key), schedule.next_at)
    yield from families.values()
    yield upcoming


def store_families(store: Store, metrics: ServerMetrics) -> Iterator[Metric]:
    yield CounterMetricFamily("sluice_commits", "Group commits written", metrics.commits)
    yield CounterMetricFamily(
        "sluice_commit_failures", "Commits that failed (each is retried)", metrics.commit_failures
    )
    yield _histogram_family(
        "sluice_commit_batch_records", "Records per group commit", metrics.commit_records
    )
    yield _histogram_family(
        "sluice_commit_seconds",
        "From handing a batch to the writer thread until the loop hears it committed",
        metrics.commit_seconds,
    )
    yield GaugeMetricFamily("sluice_store_used_bytes", "Bytes of LMDB pages in use", store.used)
    yield GaugeMetricFamily(
        "sluice_store_capacity_bytes", "Bytes puts may fill (less a reserve)", store.capacity
    )
    try:
        file_size = os.path.getsize(os.path.join(store.path, "data.mdb"))
    except OSError:
        pass
    else:
        yield GaugeMetricFamily("sluice_store_file_bytes", "Size of the data file", file_size)
    if metrics.recovered is not None:
        recovered = metrics.recovered
        yield GaugeMetricFamily(
            "sluice_recovery_seconds", "Time the last start took to recover", recovered.seconds
        )
        yield GaugeMetricFamily(
            "sluice_recovered_messages", "Messages recovered at start", recovered.messages
        )


class BrokerCollector:
    """Reads the broker's live state at scrape time. Must run on the loop thread."""

    def __init__(self, server: BrokerServer) -> None:
        self.server = server

    def collect(self) -> Iterable[Metric]:
        server = self.server
        info = GaugeMetricFamily(
            "sluice_info",
            "Always 1; labels name the version and fsync mode (in-memory: no store)",
            labels=["version", "fsync"],
        )
        store = server.store
        info.add_metric([__version__, "in-memory" if store is None else store.fsync], 1)
        yield info
        queues = _QueueFamilies()
        now = server.clock()
        core = server.core
        for name in sorted(core.queues):
            queues.add(core, core.queues[name], now)
        yield from queues.families()
        yield from limit_families(core, now)
        yield from schedule_families(core)
        yield from request_families(server.metrics)
        yield from connection_families(server)
        if store is not None:
            yield from store_families(store, server.metrics)


def build_registry(server: BrokerServer) -> CollectorRegistry:
    """The broker's collector plus the process's (CPU, memory, file descriptors)."""
    registry = CollectorRegistry()
    registry.register(BrokerCollector(server))
    ProcessCollector(registry=registry)
    return registry


# ----------------------------------------------------------------- endpoint


class MetricsUnavailable(Exception):
    """The metrics port cannot be bound; the message says what to do."""


_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_TEXT: Final = "text/plain; charset=utf-8"
Response = tuple[int, str, bytes]


class MetricsEndpoint:
    """``/metrics`` and ``/healthz`` over HTTP/1.1 on the running loop."""

    def __init__(self, server: BrokerServer, registry: CollectorRegistry | None = None) -> None:
        self.server = server
        self.registry = registry or build_registry(server)
        self._listener: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on ``host:port``; returns the address bound. Raises
        ``MetricsUnavailable`` if it cannot."""
        try:
            self._listener = await asyncio.start_server(
                self._serve, host, port, limit=MAX_REQUEST_HEAD, reuse_address=True
            )
        except OSError as error:
            raise MetricsUnavailable(
                f"cannot serve metrics on {host}:{port}: {error}; pick another "
                "--metrics-port, or 0 to turn metrics off"
            ) from None
        bound = self._listener.sockets[0].getsockname()
        return bound[0], bound[1]

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        except (asyncio.LimitOverrunError, ValueError):
            reply: bytes | None = _encode(431, _TEXT, b"request head over 8 KiB\n")
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            reply = None  # the client went away or sent nothing: nobody to answer
        else:
            reply = _encode(*self.respond(head), head_only=head.startswith(b"HEAD "))
        try:
            if reply is not None:
                writer.write(reply)
                await asyncio.wait_for(writer.drain(), READ_TIMEOUT)
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def respond(self, head: bytes) -> Response:
        """The response to a request whose head (request line and headers) is ``head``."""
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return 400, _TEXT, b"not an HTTP request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target not in (b"/metrics", b"/healthz"):
            return 404, _TEXT, b"not found: the broker serves /metrics and /healthz\n"
        if method not in (b"GET", b"HEAD"):
            return 405, _TEXT, b"only GET and HEAD are served\n"
        if target == b"/healthz":
            reason = health(self.server)
            return (200, _TEXT, b"ok\n") if reason is None else (503, _TEXT, f"{reason}\n".encode())
        try:
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        except Exception:
            log.exception("collecting metrics failed", extra=event("metrics_failed"))
            return 500, _TEXT, b"collecting metrics failed; see the broker's log\n"


def _encode(status: int, content_type: str, body: bytes, *, head_only: bool = False) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "",
        "",
    ]
    return "\r\n".join(lines).encode() + (b"" if head_only else body)
