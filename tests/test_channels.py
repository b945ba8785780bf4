"""Channels on a real daemon: pattern matching, many subscribers, a subscriber that never
reads (it lags; nobody else waits), subscriptions sharing a connection, bad input."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from client import AsyncClient, ChannelMessage
from client.errors import BadRequest, Lagged

from .conftest import BrokerProcess, error_code

TIMEOUT = 5.0


def run(coroutine: Any, timeout: float = 60.0) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


@pytest.mark.parametrize(
    ("pattern", "hits", "misses"),
    [
        ("orders.eu", ["orders.eu"], ["orders.us", "orders.eu.1", "orders"]),
        ("orders.*", ["orders.eu", "orders.us"], ["orders", "orders.eu.1", "stock.eu"]),
        ("orders.>", ["orders.eu", "orders.eu.1.x"], ["orders", "stock.eu"]),
        ("*.eu.*", ["orders.eu.1", "stock.eu.9"], ["orders.eu", "orders.us.1"]),
        (">", ["a", "a.b.c"], []),
    ],
)
def test_patterns_on_the_wire(
    broker: BrokerProcess, pattern: str, hits: list[str], misses: list[str]
) -> None:
    with broker.client() as subscriber, broker.client() as publisher:
        subscription = subscriber.subscribe(pattern)
        for channel in misses:
            assert publisher.publish(channel, b"miss") == 0
        for channel in hits:
            assert publisher.publish(channel, channel.encode()) == 1
        got = [subscription.get(TIMEOUT) for _ in hits]
        assert got == [ChannelMessage(channel, channel.encode()) for channel in hits]
        assert subscription.get(0.2) is None  # no miss arrived after the hits either
        subscription.unsubscribe()
        assert publisher.publish(hits[0], b"after") == 0
        with pytest.raises(StopIteration):
            subscription.get(0)


def test_overlapping_patterns_of_one_subscription_get_a_message_once(
    broker: BrokerProcess,
) -> None:
    with broker.client() as client:
        subscription = client.subscribe("a.*", "a.>", "a.b")
        assert client.publish("a.b", b"once") == 1
        assert subscription.get(TIMEOUT) == ChannelMessage("a.b", b"once")
        assert client.publish("a.c", b"twice?") == 1
        assert subscription.get(TIMEOUT) == ChannelMessage("a.c", b"twice?")
        assert subscription.get(0.2) is None


def test_a_subscription_shares_its_connection_with_other_calls(broker: BrokerProcess) -> None:
    async def scenario() -> None:
        async with broker.async_client() as client, client.subscribe("jobs.*") as events:
            ids = []
            for n in range(20):
                assert await client.publish(f"jobs.{n}", b"%d" % n) == 1
                ids.append(await client.put("work", b"x"))  # replies keep flowing
            (message,) = await client.reserve("work", wait=1)
            assert await client.ack(message) == 1
            got = [await anext(events) for _ in range(20)]
            assert [m.channel for m in got] == [f"jobs.{n}" for n in range(20)]

    run(scenario())


def test_blocking_iteration_with_calls_in_between(broker: BrokerProcess) -> None:
    with broker.client() as client, broker.client() as publisher:
        subscription = client.subscribe("news")
        for n in range(3):
            publisher.publish("news", b"%d" % n)
        seen = []
        for message in subscription:
            seen.append(message.data)
            client.put("q", message.data)  # the same connection, between messages
            if len(seen) == 3:
                subscription.unsubscribe()
        assert seen == [b"0", b"1", b"2"]
        assert client.stats("q")["ready"] == 3


def test_a_thousand_subscribers_each_get_every_message(broker: BrokerProcess) -> None:
    """1,000 subscriptions over 4 connections (250 each: one process's sockets stay few)."""
    messages = 20

    async def scenario() -> None:
        clients = [broker.async_client() for _ in range(4)]
        for client in clients:
            await client.connect()
        subscriptions = [clients[n % 4].subscribe("alerts.fire") for n in range(1000)]
        await asyncio.gather(*(subscription.start() for subscription in subscriptions))
        async with broker.async_client() as publisher:
            for n in range(messages):
                assert await publisher.publish("alerts.fire", b"%d" % n) == 1000

        async def take(subscription: Any) -> list[bytes]:
            return [(await anext(subscription)).data for _ in range(messages)]

        got = await asyncio.gather(*(take(subscription) for subscription in subscriptions))
        expected = [b"%d" % n for n in range(messages)]
        assert all(each == expected for each in got)
        for client in clients:
            await client.close()

    run(scenario())


def _rss_bytes(broker: BrokerProcess) -> int:
    status = Path(f"/proc/{broker.process.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_a_subscriber_that_never_reads_lags_and_nobody_waits(broker: BrokerProcess) -> None:
    data = b"x" * 65536
    with broker.raw() as stuck, broker.client() as other, broker.client() as worker:
        subscribed = stuck.request("subscribe", {"patterns": ["feed"]})
        assert subscribed[1] is True
        rss_before = _rss_bytes(broker)
        published = 0
        while other.publish("feed", data) == 1:  # until the broker gives up on it
            published += 1
            worker.put("jobs", b"job")  # put, reserve, ack: none of them wait on it
            (message,) = worker.reserve("jobs")
            assert worker.ack(message) == 1
            assert published < 10_000, "the stuck subscriber never lagged"
        for _ in range(500):  # 32 MiB more: held nowhere
            assert other.publish("feed", data) == 0
        assert _rss_bytes(broker) - rss_before < 24 * 2**20
        frames = []
        while (pushed := stuck.read_frame())[1] == "message":  # what it had, then lagged
            frames.append(pushed)
        assert pushed == [subscribed[0], "lagged", {"channel": "feed"}]
        assert len(frames) <= published
        assert stuck.call("ping", {})  # its connection carries on


def test_the_client_raises_lagged(broker: BrokerProcess) -> None:
    async def scenario() -> None:
        async with broker.async_client() as client, broker.async_client() as publisher:
            events = await client.subscribe("feed").start()
            # Fill the client's own inbox past its bound: the subscription ends visibly.
            from client._channels import MAX_INBOX

            for _ in range(MAX_INBOX + 1):
                await publisher.publish("feed", b".")
            await client.ping()  # everything pushed before this reply has arrived
            with pytest.raises(Lagged):
                while True:
                    await anext(events)
            assert await publisher.publish("feed", b".") == 0  # the broker was told

    run(scenario())


@pytest.mark.parametrize(
    ("op", "args"),
    [
        ("publish", {"channel": "a.*", "data": b""}),
        ("publish", {"channel": "a..b", "data": b""}),
        ("publish", {"channel": "", "data": b""}),
        ("publish", {"channel": "x" * 257, "data": b""}),  # over MAX_CHANNEL
        ("publish", {"channel": "a", "data": "text"}),
        ("publish", {"channel": "a", "data": 5}),
        ("publish", {"channel": "a"}),
        ("subscribe", {"patterns": []}),
        ("subscribe", {"patterns": "a.*"}),
        ("subscribe", {"patterns": ["a.>.b"]}),
        ("subscribe", {"patterns": ["a*"]}),
        ("subscribe", {"patterns": [7]}),
        ("unsubscribe", {"subscription": "x"}),
    ],
)
def test_bad_input_is_a_typed_error(broker: BrokerProcess, op: str, args: dict[str, Any]) -> None:
    with broker.raw() as raw:
        assert error_code(raw.request(op, args)) == "BAD_REQUEST"
        assert raw.call("ping", {})


def test_bad_input_from_the_client(broker: BrokerProcess) -> None:
    with broker.client() as client:
        with pytest.raises(BadRequest):
            client.publish("a", 5)  # type: ignore[arg-type]
        with pytest.raises(BadRequest):
            client.subscribe("a.>.b")
        assert client.publish("a", b"fine") == 0


def test_a_subscription_request_id_cannot_be_reused(broker: BrokerProcess) -> None:
    with broker.raw() as raw:
        assert raw.request("subscribe", {"patterns": ["a"]}, 9)[1] is True
        assert error_code(raw.request("subscribe", {"patterns": ["b"]}, 9)) == "BAD_REQUEST"
        assert raw.call("unsubscribe", {"subscription": 9}) == {"unsubscribed": True}
        assert raw.call("unsubscribe", {"subscription": 9}) == {"unsubscribed": False}


def test_async_client_lagged_import_is_public() -> None:
    import sluice

    assert sluice.errors.Lagged is Lagged and sluice.AsyncClient is AsyncClient


def test_a_message_larger_than_the_buffer_reaches_a_reader(broker: BrokerProcess) -> None:
    data = b"y" * (3 * 2**20)  # over the 1 MiB a subscriber may be behind
    with broker.client() as client:
        subscription = client.subscribe("big")
        assert client.publish("big", data) == 1
        assert subscription.get(TIMEOUT) == ChannelMessage("big", data)
