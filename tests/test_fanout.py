"""Durable fan-out on a real daemon: bindings route a publish into queues as ordinary
messages, in one commit, confirmed only once stored, surviving kill -9; bound queues are
independent consumer groups; bindings persist."""

from __future__ import annotations

import re
import threading
import urllib.request
from pathlib import Path

import pytest

from client.errors import BadRequest, TooLarge

from .conftest import BrokerProcess, start_broker, stop_broker


def test_a_publish_puts_one_copy_in_each_bound_queue(broker: BrokerProcess) -> None:
    with broker.client() as client:
        for queue in ("audit", "billing", "mail"):
            assert client.bind("orders.*", queue) is True
        assert client.bind("orders.*", "audit") is False  # already bound
        assert client.bind("orders.>", "audit") is True  # two patterns, one copy
        subscription = client.subscribe("orders.>")
        published = client.publish("orders.42", b"paid", priority=7, key="order-42")
        assert (published, published.queues) == (1, 3)
        assert client.publish("invoices.1", b"elsewhere").queues == 0
        for queue in ("audit", "billing", "mail"):
            (message,) = client.reserve(queue, max_messages=10)
            assert (message.body, message.priority) == (b"paid", 7)
            assert client.stats(queue)["ready"] == 0
        assert subscription.get(5) is not None
        # The dedup key works per queue, as for put.
        assert client.publish("orders.42", b"paid again", key="order-42").queues == 3
        assert all(client.stats(q)["reserved"] == 1 for q in ("audit", "billing", "mail"))
        assert all(client.stats(q)["ready"] == 0 for q in ("audit", "billing", "mail"))


def test_delay_and_headers_given_on_the_publish(broker: BrokerProcess) -> None:
    with broker.client() as client:
        client.bind("later", "q1")
        client.publish("later", b"x", delay=60, headers={"source": "shop"})
        stats = client.stats("q1")
        assert (stats["ready"], stats["delayed"]) == (0, 1)
        (item,) = client.peek("q1", state="delayed")
        assert item["headers"] == {"source": "shop"}


def test_unbind_and_list(broker: BrokerProcess) -> None:
    with broker.client() as client:
        client.bind("a.>", "q1")
        client.bind("*.b", "q2")
        assert client.bindings() == [("*.b", "q2"), ("a.>", "q1")]
        assert client.unbind("a.>", "q1") is True
        assert client.unbind("a.>", "q1") is False
        assert client.bindings() == [("*.b", "q2")]
        assert client.publish("a.b", b"x").queues == 1


def test_bad_input(broker: BrokerProcess) -> None:
    with broker.client() as client:
        with pytest.raises(BadRequest):
            client.bind("a.>.b", "q")
        with pytest.raises(BadRequest):
            client.bind("a.*", "bad queue name")
        client.bind("a", "small")
        client.configure("small", max_body=10)
        client.bind("a", "roomy")
        client.configure("roomy", max_body=1000)
        with pytest.raises(TooLarge):
            client.publish("a", b"x" * 11)  # over one queue's max_body: no copy anywhere
        assert client.stats("roomy")["totals"]["put"] == 0
        with pytest.raises(BadRequest):
            client.publish("a", b"x", priority="high")  # type: ignore[arg-type]
        assert client.stats("roomy")["totals"]["put"] == 0


def _commits(broker: BrokerProcess) -> int:
    with urllib.request.urlopen(f"{broker.http}/metrics", timeout=5) as response:
        text = response.read().decode()
    match = re.search(r"^sluice_commits_total (\S+)$", text, flags=re.MULTILINE)
    assert match is not None
    return int(float(match.group(1)))


def test_a_publish_to_a_hundred_queues_is_one_commit(tmp_path: Path) -> None:
    broker = start_broker(tmp_path / "broker.log", http=True)
    try:
        with broker.client() as client:
            for n in range(100):
                client.bind("news.>", f"reader-{n}")
            client.ping()
            before = _commits(broker)
            assert client.publish("news.today", b"headline").queues == 100
            assert _commits(broker) == before + 1
            assert all(client.stats(f"reader-{n}")["ready"] == 1 for n in range(100))
    finally:
        stop_broker(broker)


def test_confirmed_copies_and_bindings_survive_kill_9(
    tmp_path: Path, brokers: list[BrokerProcess]
) -> None:
    data_dir = tmp_path / "data"
    brokers.append(start_broker(tmp_path / "one.log", "--data-dir", str(data_dir)))
    with brokers[0].client() as client:
        for queue in ("audit", "billing", "mail"):
            client.bind("orders.>", queue)
        for n in range(50):
            assert client.publish(f"orders.{n}", b"%d" % n).queues == 3  # confirmed: stored
    brokers[0].process.kill()
    brokers[0].process.wait()
    brokers.append(start_broker(tmp_path / "two.log", "--data-dir", str(data_dir)))
    with brokers[1].client() as client:
        assert client.bindings() == [("orders.>", q) for q in ("audit", "billing", "mail")]
        for queue in ("audit", "billing", "mail"):
            bodies = sorted(m.body for m in client.reserve(queue, max_messages=100))
            assert bodies == sorted(b"%d" % n for n in range(50))
        assert client.publish("orders.x", b"after").queues == 3  # still routed
    stop_broker(brokers[1])


def test_three_consumer_groups_each_see_every_message_once(broker: BrokerProcess) -> None:
    groups, consumers, messages = ("audit", "billing", "mail"), 3, 300
    with broker.client() as client:
        for group in groups:
            client.bind("events.>", group)
    seen: dict[str, list[bytes]] = {group: [] for group in groups}
    lock = threading.Lock()
    done = threading.Event()

    def consume(group: str) -> None:
        with broker.client() as worker:
            while not done.is_set():
                batch = worker.reserve(group, max_messages=10, wait=0.2)
                with lock:
                    seen[group].extend(message.body for message in batch)
                worker.ack(batch)

    threads = [
        threading.Thread(target=consume, args=(group,), daemon=True)
        for group in groups
        for _ in range(consumers)
    ]
    for thread in threads:
        thread.start()
    with broker.client() as client:
        for n in range(messages):
            assert client.publish(f"events.{n % 7}", b"%d" % n).queues == 3
        for group in groups:  # every copy acked: nothing left to see twice
            deadline_check = 0
            while client.stats(group)["totals"]["acked"] < messages:
                deadline_check += 1
                assert deadline_check < 10_000, f"{group} did not drain"
    done.set()
    for thread in threads:
        thread.join(timeout=5)
    expected = sorted(b"%d" % n for n in range(messages))
    for group in groups:
        assert sorted(seen[group]) == expected  # each message once per group
