"""The broker's HTTP server: its port rules, and scrapes that stay bounded and never
stall the wire protocol, against real broker processes."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import BrokerProcess, RawConnection, frame, start_broker, stop_broker


def get(url: str, timeout: float = 30) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read()


def put_in_many_queues(broker: BrokerProcess, depths: dict[str, int]) -> None:
    """One pipelined put per queue (of ``depth`` messages), all sent before any reply."""
    with broker.raw() as raw:
        requests = b"".join(
            frame([index, "put", {"queue": name, "messages": [{"body": b"x"}] * depth}])
            for index, (name, depth) in enumerate(depths.items(), start=100)
        )
        raw.send_bytes(requests)
        for _ in depths:
            assert raw.read_reply(timeout=30)[1] is True


def samples_of(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def test_port_zero_gives_http_a_free_port_too_so_brokers_run_side_by_side(
    tmp_path: Path,
) -> None:
    first = start_broker(tmp_path / "one.log", "--in-memory", http=True)
    second = start_broker(tmp_path / "two.log", "--in-memory", http=True)
    try:
        assert first.http_port and second.http_port and first.http_port != second.http_port
        for running in (first, second):
            assert get(f"{running.http}/healthz") == (200, b"ok\n")
            assert f"http http://127.0.0.1:{running.http_port}/" in running.log()
    finally:
        stop_broker(first)
        stop_broker(second)


def test_http_port_zero_turns_http_off(tmp_path: Path) -> None:
    running = start_broker(tmp_path / "broker.log", "--in-memory", "--http-port", "0")
    try:
        assert running.http_port is None
        assert "listening on 127.0.0.1:" in running.log() and ", http off" in running.log()
    finally:
        stop_broker(running)


def test_per_queue_series_are_the_deepest_queues_and_totals_count_all(tmp_path: Path) -> None:
    running = start_broker(
        tmp_path / "broker.log", "--in-memory", "--metrics-top-queues", "3", http=True
    )
    try:
        depths = {f"bounded.{index:02}": index % 7 + 1 for index in range(40)}
        put_in_many_queues(running, depths)
        status, body = get(f"{running.http}/metrics")
        samples = samples_of(body.decode())
    finally:
        stop_broker(running)
    assert status == 200
    shown = {labels["queue"] for labels, _ in samples["sluice_queue_messages"]}
    deepest = sorted(depths, key=lambda name: (-depths[name], name))[:3]
    assert shown == set(deepest)
    assert samples["sluice_queues"] == [({}, 40.0)]
    assert samples["sluice_queues_shown"] == [({}, 3.0)]
    ready = dict((labels["state"], value) for labels, value in samples["sluice_messages"])
    assert ready["ready"] == sum(depths.values()) and ready["dead"] == 0
    assert samples["sluice_all_messages_put_total"] == [({}, float(sum(depths.values())))]


def test_pings_stay_fast_while_a_scrape_of_many_queues_runs(tmp_path: Path) -> None:
    queues = 4000
    running = start_broker(
        tmp_path / "broker.log", "--in-memory", "--metrics-top-queues", str(queues), http=True
    )
    try:
        put_in_many_queues(running, {f"many.{index}": 1 + index % 3 for index in range(queues)})
        latencies: list[float] = []
        scraping = threading.Event()
        done = threading.Event()

        def ping_while_scraping() -> None:
            with RawConnection(running.host, running.port) as raw:
                raw.hello()
                scraping.wait(10)
                while not done.is_set():
                    started = time.perf_counter()
                    raw.call("ping", {})
                    latencies.append(time.perf_counter() - started)

        pinger = threading.Thread(target=ping_while_scraping)
        pinger.start()
        scraping.set()
        started = time.perf_counter()
        status, body = get(f"{running.http}/metrics")
        scrape_seconds = time.perf_counter() - started
        done.set()
        pinger.join(10)
        status, overview_body = get(f"{running.http}/api/v1/overview")
        overview = json.loads(overview_body)
    finally:
        stop_broker(running)
    assert status == 200 and body.count(b'sluice_queue_paused{queue="many.') == queues
    # A loop held for the whole scrape would answer one ping at its end, as slow as it.
    assert len(latencies) >= 20, (len(latencies), scrape_seconds)
    assert max(latencies) < scrape_seconds / 3, (max(latencies), scrape_seconds)
    # The dashboard's overview is bounded the same way: totals of all, the deepest listed.
    assert overview["queues"] == queues and len(overview["deepest"]) == 100
    assert overview["messages"]["ready"] == sum(1 + index % 3 for index in range(queues))
    assert {queue["ready"] for queue in overview["deepest"]} == {3}
