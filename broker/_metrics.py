"""Prometheus metrics and the health check, read on the broker's own loop.

Nothing is counted for Prometheus on the hot path. The core already keeps per-queue counts
and totals; the server keeps ``ServerMetrics`` (plain integers and fixed-bucket
``Histogram``s). ``exposition`` turns all of it into the text format when Prometheus
scrapes: it reads live state on the loop thread (so without locks), yielding to the loop
while it walks the queues, and encodes the families on a thread. Per-queue series are
bounded: only the deepest ``top`` queues get them; totals over every queue always come.
The HTTP side (``_http``) serves it.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, generate_latest
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
from ._queue import Queue

if TYPE_CHECKING:
    from ._server import BrokerServer
    from ._store import Recovered, Store

log = logging.getLogger("sluice.metrics")

UNKNOWN_OP: Final = "unknown"  # an op this broker does not have (keeps the label bounded)
INVALID: Final = "invalid"  # the frame was not a request at all
OK: Final = "ok"  # the outcome of a request that succeeded (or is left waiting)
OLDEST_SCAN_LIMIT: Final = 100_000  # above this many ready, the age is the next message's
YIELD_EVERY: Final = 2000  # queues walked between yields to the loop in a scrape
YIELD_EVERY_SHOWN: Final = 50  # queues given series between yields (each may scan its ready)
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
        return None if top is None else top.since
    return min((message.since for message in queue.ready.in_order()), default=None)


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


def limit_families(queues: list[Queue], now: float) -> Iterator[Metric]:
    """Series of those of ``queues`` that have a rate limit or a concurrency cap."""
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
    for queue in queues:
        if queue.limits is None:
            continue
        name = queue.name
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


def schedule_families(core: Core, queues: list[Queue]) -> Iterator[Metric]:
    """Series of the schedules of ``queues``."""
    labels = ["queue", "schedule"]
    names = {queue.name for queue in queues}
    families = {
        key: CounterMetricFamily(name, text, labels=labels)
        for key, (name, text) in _SCHEDULE_COUNTS.items()
    }
    upcoming = GaugeMetricFamily(
        "sluice_schedule_next_fire_timestamp_seconds",
        "When the schedule fires next (absent once it is finished)",
        labels=labels,
    )
    for key in sorted(key for key in core.schedules if key[0] in names):
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


def queue_depth(queue: Queue) -> int:
    counts = queue.counts
    return sum(counts[state] for state in DEPTH_STATES)


class QueueTotals:
    """Sums over every queue: the series that stay when per-queue ones are cut, and the
    dashboard's overview."""

    def __init__(self) -> None:
        self.queues = 0
        self.depth = dict.fromkeys(DEPTH_STATES, 0)
        self.totals = dict.fromkeys(_QUEUE_TOTALS, 0)

    def add(self, queue: Queue) -> None:
        self.queues += 1
        for state in DEPTH_STATES:
            self.depth[state] += queue.counts[state]
        for key in self.totals:
            self.totals[key] += queue.totals[key]

    def families(self, shown: int) -> Iterator[Metric]:
        yield GaugeMetricFamily("sluice_queues", "Queues in the broker", self.queues)
        yield GaugeMetricFamily(
            "sluice_queues_shown",
            "Queues with per-queue series here: the deepest --metrics-top-queues",
            shown,
        )
        depth = GaugeMetricFamily(
            "sluice_messages", "Messages in all queues by state", labels=["state"]
        )
        for state, count in self.depth.items():
            depth.add_metric([state.value], count)
        yield depth
        for key, (name, text) in _QUEUE_TOTALS.items():
            total = name.replace("sluice_queue_", "sluice_all_")
            yield CounterMetricFamily(total, f"{text}, over all queues", self.totals[key])


async def deepest_queues(core: Core, top: int, totals: QueueTotals) -> list[Queue]:
    """The ``top`` deepest queues (ties by name), in name order, adding every queue to
    ``totals``. Yields to the loop every ``YIELD_EVERY`` queues. Queues made or dropped
    while it yields are seen or not; the sums are of the queues it saw, plus the totals of
    the queues forgotten before it started (so that they never go down)."""
    for key, count in core.forgotten_totals.items():
        totals.totals[key] += count
    chosen: list[
        tuple[int, tuple[int, ...], Queue]
    ] = []  # min-heap of (depth, name): the top so far
    for index, queue in enumerate(list(core.queues.values())):
        if index and index % YIELD_EVERY == 0:
            await asyncio.sleep(0)
        totals.add(queue)
        item = (queue_depth(queue), _inverted(queue.name), queue)
        if len(chosen) < top:
            heapq.heappush(chosen, item)
        elif chosen and item[:2] > chosen[0][:2]:
            heapq.heapreplace(chosen, item)
    return sorted((entry[2] for entry in chosen), key=lambda queue: queue.name)


def _inverted(name: str) -> tuple[int, ...]:
    """A key that orders names backwards: among equal depths the min-heap drops the
    name that sorts last, so the names kept are the first in order."""
    return (*(-ord(char) for char in name), 1)


class _Prebuilt:
    """A collector of families built before the scrape is encoded."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def channel_families(server: BrokerServer) -> Iterator[Metric]:
    channels, ring = server.channels, server.core.events
    yield GaugeMetricFamily("sluice_subscriptions", "Live channel subscriptions", channels.count)
    yield GaugeMetricFamily(
        "sluice_event_subscriptions",
        "Live subscriptions with a pattern that may match job events",
        channels.event_subscriptions,
    )
    yield CounterMetricFamily(
        "sluice_subscriptions_lagged",
        "Subscriptions ended because their peer fell behind",
        channels.lagged_total,
    )
    yield GaugeMetricFamily(
        "sluice_event_seq", "The seq of the newest job event", ring.next_seq - 1
    )
    yield GaugeMetricFamily(
        "sluice_event_buffer_events", "Job events held for from_seq replays", len(ring.events)
    )


async def collect_families(server: BrokerServer, top: int) -> list[Metric]:
    """Every family of one scrape, read on the loop thread; yields to the loop while it
    walks the queues. The result is plain data: it may be encoded on another thread."""
    store = server.store
    info = GaugeMetricFamily(
        "sluice_info",
        "Always 1; labels name the version and fsync mode (in-memory: no store)",
        labels=["version", "fsync"],
    )
    info.add_metric([__version__, "in-memory" if store is None else store.fsync], 1)
    totals = QueueTotals()
    queues = _QueueFamilies()
    shown = await deepest_queues(server.core, top, totals)
    for index, queue in enumerate(shown):
        if index and index % YIELD_EVERY_SHOWN == 0:
            await asyncio.sleep(0)
        queues.add(server.core, queue, server.clock())
    families: list[Metric] = [info, *queues.families(), *totals.families(len(shown))]
    families += limit_families(shown, server.clock())
    families += schedule_families(server.core, shown)
    families += request_families(server.metrics)
    families += connection_families(server)
    families += channel_families(server)
    if store is not None:
        families += store_families(store, server.metrics)
    return families


_PROCESS_REGISTRY = CollectorRegistry()
ProcessCollector(registry=_PROCESS_REGISTRY)


async def exposition(server: BrokerServer, top: int) -> bytes:
    """One scrape in the Prometheus text format: families read on the loop (yielding
    while it walks the queues), encoded on a thread so a large page never holds the loop."""
    families = await collect_families(server, top)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Prebuilt(families))
    own, process = await asyncio.to_thread(
        lambda: (generate_latest(registry), generate_latest(_PROCESS_REGISTRY))
    )
    return own + process
