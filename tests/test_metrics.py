"""The Prometheus endpoint and the health check, against a real broker under load.

A few threads put, reserve, ack and nack while the test scrapes ``/metrics``; then the
load stops and every per-queue number must agree with what ``stats`` says.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker._core import Core
from broker._histogram import Histogram
from broker._server import BrokerServer, ServerLimits
from client import Client
from client.errors import LeaseLost, NotFound
from tests.conftest import (
    KEEP,
    REPO_ROOT,
    BrokerProcess,
    start_broker,
    stop_broker,
    wait_for_state,
)

QUEUES = ("metrics.a", "metrics.b")
IDLE = "metrics.idle"
PRODUCERS = 2
CONSUMERS = 2
PER_PRODUCER = 150  # messages each producer puts, in batches of BATCH
BATCH = 10
TOTALS = ("put", "delivered", "acked", "nacked", "expired", "dead_lettered")
TOTAL_METRIC = {
    "put": "sluice_queue_messages_put_total",
    "delivered": "sluice_queue_messages_delivered_total",
    "acked": "sluice_queue_messages_acked_total",
    "nacked": "sluice_queue_messages_nacked_total",
    "expired": "sluice_queue_leases_expired_total",
    "dead_lettered": "sluice_queue_messages_dead_lettered_total",
}

BROKER = (sys.executable, "-m", "broker")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def metered(tmp_path: Path) -> Iterator[tuple[BrokerProcess, str]]:
    """A broker with its metrics endpoint on a free port, and the endpoint's base URL."""
    port = free_port()
    running = start_broker(tmp_path / "broker.log", "--metrics-port", str(port))
    yield running, f"http://{running.host}:{port}"
    stop_broker(running)


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(base: str) -> Samples:
    """Every sample of one scrape, keyed by name and labels (parsing checks the format)."""
    status, text = http_get(f"{base}/metrics")
    assert status == 200, text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}"
    return samples[key]


# --------------------------------------------------------------------- the load


class Load:
    """Producers put every message in batches; consumers ack them all, nacking some once
    first (delay 0, so they come straight back). Each thread counts its requests by op."""

    def __init__(self, broker: BrokerProcess) -> None:
        self.broker = broker
        self.total = PRODUCERS * PER_PRODUCER
        self.acked = 0
        self.lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.errors: list[BaseException] = []
        self.finished = threading.Event()  # set when the last thread ends
        self.running = PRODUCERS + CONSUMERS
        self.threads = [
            threading.Thread(target=self._guard, args=(self._produce, n)) for n in range(PRODUCERS)
        ]
        self.threads += [
            threading.Thread(target=self._guard, args=(self._consume, n)) for n in range(CONSUMERS)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=30)
        assert self.finished.is_set(), "the load did not finish within 30 s"
        assert not self.errors, self.errors

    def _guard(self, work: Any, number: int) -> None:
        try:
            work(number)
        except BaseException as error:
            self.errors.append(error)
        finally:
            with self.lock:
                self.running -= 1
                if self.running == 0:
                    self.finished.set()

    def _count(self, op: str) -> None:
        with self.lock:
            self.requests[op] += 1

    def _produce(self, number: int) -> None:
        with self.broker.client(client_name=f"producer-{number}") as client:
            for start in range(0, PER_PRODUCER, BATCH):
                bodies = [b"job %d-%d" % (number, i) for i in range(start, start + BATCH)]
                client.put_many(QUEUES[(start // BATCH) % 2], bodies)
                self._count("put")

    def _consume(self, number: int) -> None:
        with self.broker.client(client_name=f"consumer-{number}") as client:
            while True:
                with self.lock:
                    if self.acked == self.total:
                        return
                messages = client.reserve(list(QUEUES), max_messages=BATCH, wait=0.2)
                self._count("reserve")
                retry = [m for m in messages if m.attempts == 1 and m.id % 5 == 0]
                finish = [m for m in messages if m not in retry]
                if retry:
                    client.nack(retry, delay=0)
                    self._count("nack")
                if finish:
                    client.ack(finish)
                    self._count("ack")
                    with self.lock:
                        self.acked += len(finish)


def run_load_while_scraping(broker: BrokerProcess, base: str) -> tuple[Load, int]:
    """Run the load, scraping every 50 ms until it has ended, then once more. No counter
    goes down between scrapes."""
    with broker.client() as client:
        for name in QUEUES:  # kept when drained: a queue forgotten starts its totals anew
            client.configure(name, **KEEP)
    load = Load(broker)
    load.start()
    scrapes = 0
    previous: Samples = {}
    while True:
        ended = load.finished.is_set()
        samples = scrape(base)
        scrapes += 1
        for key, count in samples.items():
            if key[0].endswith(("_total", "_count")) and key in previous:
                assert count >= previous[key], f"{key} went down during the load"
        previous = samples
        if ended:
            break
        load.finished.wait(0.05)
    load.join()
    return load, scrapes


def set_the_scene(client: Client) -> Counter[str]:
    """After the load: one message of each state, and two requests that fail (a stats of
    an unknown queue, an ack with a stale lease). Returns the requests that succeeded."""
    client.put(QUEUES[0], b"later", delay=3600)
    client.put(QUEUES[1], b"held")
    client.put(QUEUES[1], b"doomed", headers={"correlation_id": "order-17"})
    client.put_many(QUEUES[1], [b"left ready 1", b"left ready 2"])
    held, doomed = client.reserve(QUEUES[1], max_messages=2, visibility_timeout=3600)
    client.bury(doomed, reason="bad address")
    with pytest.raises(NotFound):
        client.stats("metrics.never-used")
    with pytest.raises(LeaseLost):
        client.ack((held.id, held.lease + 1000))
    return Counter(put=4, reserve=1, bury=1)


def test_metrics_agree_with_stats_after_a_load(metered: tuple[BrokerProcess, str]) -> None:
    broker, base = metered
    load, scrapes = run_load_while_scraping(broker, base)
    assert scrapes >= 2
    with broker.client(client_name="checker") as client, broker.raw() as waiter:
        made = set_the_scene(client)
        waiter.send_request("reserve", {"queues": [IDLE], "wait": 30})
        wait_for_state(lambda: waiting(client, IDLE) == 1, "the long-poll never waited")
        stats = {queue: client.stats(queue) for queue in (*QUEUES, IDLE)}
        samples = scrape(base)

    for queue, queue_stats in stats.items():
        check_queue(samples, queue, queue_stats)
    check_requests(samples, load.requests + made)
    check_commits(samples)
    assert value(samples, "sluice_queue_consumers_waiting", queue=IDLE) == 1
    assert value(samples, "sluice_connections") >= 2  # the checker and the waiter
    assert value(samples, "sluice_consumer_connections") >= 2  # both have reserved
    assert value(samples, "sluice_connections_opened_total") >= PRODUCERS + CONSUMERS + 2
    age = value(samples, "sluice_queue_oldest_ready_age_seconds", queue=QUEUES[1])
    assert 0 < age < 3600
    assert value(samples, "sluice_queue_oldest_ready_age_seconds", queue=IDLE) == 0
    assert http_get(f"{base}/healthz") == (200, "ok\n")


def waiting(client: Client, queue: str) -> int:
    """Long-polls waiting on ``queue``; 0 before the first (an unused queue is forgotten,
    so until then it is not found)."""
    try:
        count: int = client.stats(queue)["waiting"]
    except NotFound:
        return 0
    return count


def check_queue(samples: Samples, queue: str, stats: dict[str, Any]) -> None:
    for state in ("ready", "delayed", "reserved", "dead"):
        metric = value(samples, "sluice_queue_messages", queue=queue, state=state)
        assert metric == stats[state], f"{queue} {state}: metrics {metric}, stats {stats}"
    for total in TOTALS:
        metric = value(samples, TOTAL_METRIC[total], queue=queue)
        assert metric == stats["totals"][total], f"{queue} {total}: {metric}, stats {stats}"
    assert value(samples, "sluice_queue_leases", queue=queue) == stats["reserved"]
    assert value(samples, "sluice_queue_consumers_waiting", queue=queue) == stats["waiting"]
    processed = value(samples, "sluice_queue_processing_seconds_count", queue=queue)
    assert processed == stats["totals"]["acked"]
    below_inf = value(samples, "sluice_queue_processing_seconds_bucket", queue=queue, le="+Inf")
    assert below_inf == processed


def check_requests(samples: Samples, succeeded: Counter[str]) -> None:
    for op, count in succeeded.items():
        assert value(samples, "sluice_requests_total", op=op, outcome="ok") >= count, op
    assert value(samples, "sluice_requests_total", op="stats", outcome="NOT_FOUND") >= 1
    assert value(samples, "sluice_requests_total", op="ack", outcome="LEASE_LOST") >= 1
    counted: Counter[str] = Counter()
    for (name, labels), count in samples.items():
        if name == "sluice_requests_total":
            counted[dict(labels)["op"]] += int(count)
    for op, count in counted.items():
        timed = value(samples, "sluice_request_handling_seconds_count", op=op)
        assert timed == count, f"{op}: {count} requests counted, {timed} timed"


def check_commits(samples: Samples) -> None:
    commits = value(samples, "sluice_commits_total")
    assert commits > 0
    assert value(samples, "sluice_commit_batch_records_count") == commits
    assert value(samples, "sluice_commit_seconds_count") == commits
    assert value(samples, "sluice_commit_batch_records_sum") >= commits  # a record at least
    assert value(samples, "sluice_store_used_bytes") > 0
    assert value(samples, "sluice_store_file_bytes") > 0
    assert value(samples, "sluice_recovered_messages") == 0


def test_limit_and_schedule_series_agree_with_the_broker(
    metered: tuple[BrokerProcess, str],
) -> None:
    broker, base = metered
    queue = "metrics.limited"
    with broker.client() as client:
        client.put_many(queue, [b"x"] * 5)
        client.configure(queue, rate_limit={"rate": 1, "per": 60, "burst": 2}, max_in_flight=4)
        held = client.reserve(queue, max_messages=5)
        client.schedule(queue, "hourly", b"tick", every=3600)
        client.trigger(queue, "hourly")
        limits = client.stats(queue)["limits"]
        [schedule] = client.schedules(queue)
        samples = scrape(base)
    assert len(held) == 2 and limits["tokens"] == 0
    assert value(samples, "sluice_queue_rate_limit_tokens", queue=queue) == 0
    assert value(samples, "sluice_queue_in_flight", queue=queue) == 2
    assert value(samples, "sluice_queue_max_in_flight", queue=queue) == 4
    assert value(samples, "sluice_queue_throttled_seconds_total", queue=queue) >= 0
    labels = {"queue": queue, "schedule": "hourly"}
    assert value(samples, "sluice_schedule_triggers_total", **labels) == 1
    assert value(samples, "sluice_schedule_fires_total", **labels) == 0
    upcoming = value(samples, "sluice_schedule_next_fire_timestamp_seconds", **labels)
    assert upcoming == schedule["next_at"]
    assert ("sluice_queue_rate_limit_tokens", frozenset({("queue", IDLE)})) not in samples


# ------------------------------------------------------------- the HTTP endpoint


def http_raw(base: str, request: bytes) -> bytes:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    version, status, _ = response.split(b" ", 2)
    assert version in (b"HTTP/1.0", b"HTTP/1.1"), response[:100]
    return int(status)


def test_endpoint_answers_only_its_two_paths(metered: tuple[BrokerProcess, str]) -> None:
    _, base = metered
    assert http_get(f"{base}/nothing")[0] == 404
    assert http_get(f"{base}/healthz?verbose=1") == (200, "ok\n")
    status_line = http_raw(base, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n").split(b"\r\n")[0]
    assert status_line == b"HTTP/1.1 405 Method Not Allowed"
    head = http_raw(base, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    huge = b"GET /metrics HTTP/1.1\r\nX-Filler: " + b"x" * 20_000 + b"\r\n\r\n"
    assert status_of(http_raw(base, huge)) == 400  # a header over 8 KiB
    assert status_of(http_raw(base, b"nonsense\r\n\r\n")) == 400
    assert http_get(f"{base}/metrics")[0] == 200  # still serving


def test_a_taken_metrics_port_stops_the_start_with_advice(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*BROKER, "--port", "0", "--in-memory", "--metrics-port", str(port)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in done.stderr
    assert "--metrics-port" in done.stderr
    assert "sluice listening" not in done.stdout


# --------------------------------------------------------------------- units


def test_health_says_why_the_broker_is_not_healthy() -> None:
    from broker._metrics import health

    server = BrokerServer(Core(), ServerLimits(max_frame=1 << 20))
    assert health(server) is None
    for _ in range(3):
        server.metrics.commit_failed(OSError("No space left on device\nreally"))
    assert health(server) == "store: 3 commits failed in a row: No space left on device really"
    server.metrics.commit_done(records=4, seconds=0.01)
    assert health(server) is None
    server.shutting_down = True
    assert health(server) == "shutting down"


def test_histogram_buckets_are_inclusive_upper_bounds() -> None:
    histogram = Histogram((1, 5))
    for observed in (0.5, 1, 1.5, 5, 7):
        histogram.observe(observed)
    assert histogram.counts == [2, 2, 1]
    assert histogram.cumulative() == [(1.0, 2), (5.0, 4), (float("inf"), 5)]
    assert histogram.count == 5 and histogram.sum == 15
    with pytest.raises(ValueError):
        Histogram((5, 1))
