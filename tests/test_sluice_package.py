"""``import sluice``: the public names, where a client finds the broker, and calls with
nothing to send."""

from __future__ import annotations

import asyncio

import pytest

import client
import client.errors
import sluice
import sluice.errors
from sluice import AsyncClient, AsyncWorker, Client, Fail, Job, Message, Retry, Worker

from .conftest import BrokerProcess

UNREACHABLE_PORT = 1  # nothing listens there: a call that tried to connect would fail


def test_the_package_is_the_client_library_under_its_own_name() -> None:
    assert (Client, AsyncClient, Message) == (client.Client, client.AsyncClient, client.Message)
    assert (Worker, AsyncWorker, Retry, Fail) == (
        client.Worker,
        client.AsyncWorker,
        client.Retry,
        client.Fail,
    )
    assert Job.__name__ == "Job" and set(sluice.__all__) >= {"Client", "Job", "errors"}
    assert sluice.errors.NotFound is client.errors.NotFound
    assert set(sluice.errors.__all__) == set(client.errors.__all__)
    for name in sluice.errors.__all__:
        assert getattr(sluice.errors, name) is getattr(client.errors, name)


def test_a_client_finds_the_broker_by_url_host_and_port_or_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SLUICE_URL", raising=False)
    assert (Client().host, Client().port) == ("127.0.0.1", 7700)
    assert (Client(url="sluice://example.org:7800").host, Client(port=7801).port) == (
        "example.org",
        7801,
    )
    assert (Client("10.0.0.5").host, Client("10.0.0.5").port) == ("10.0.0.5", 7700)
    monkeypatch.setenv("SLUICE_URL", "sluice://queue.internal:7900")
    for made in (Client(), AsyncClient()):
        assert (made.host, made.port) == ("queue.internal", 7900)
    assert Client(port=7902).host == "127.0.0.1"  # host/port given: the variable is not used
    with pytest.raises(ValueError, match="not both"):
        Client("127.0.0.1", url="sluice://127.0.0.1:7700")
    with pytest.raises(ValueError, match="sluice://"):
        AsyncClient(url="http://127.0.0.1:7700")
    worker = Worker("jobs", lambda job: None, host="10.1.1.1", port=7000)
    assert worker.settings.url == "sluice://10.1.1.1:7000"
    assert Worker("jobs", lambda job: None).settings.url == "sluice://queue.internal:7900"


def test_sync_calls_with_nothing_to_send_return_without_connecting() -> None:
    idle = Client(port=UNREACHABLE_PORT)
    assert idle.ack([]) == 0
    assert idle.nack([]) == 0
    assert idle.put_many("jobs", []) == []
    with pytest.raises(client.errors.BadRequest):  # the name is still checked
        idle.put_many("not a queue!", [])


def test_async_calls_with_nothing_to_send_return_without_connecting() -> None:
    async def scenario() -> None:
        idle = AsyncClient(port=UNREACHABLE_PORT)
        assert await idle.ack([]) == 0
        assert await idle.nack([], delay=1) == 0
        assert await idle.put_many("jobs", []) == []

    asyncio.run(scenario())


def test_clients_reach_a_real_broker_by_url_and_by_environment(
    broker: BrokerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Client(url=broker.url) as by_url:
        by_url.put("found", b"by url")
    monkeypatch.setenv("SLUICE_URL", broker.url)

    async def scenario() -> int:
        async with AsyncClient() as by_environment:
            stats = await by_environment.stats("found")
            return int(stats["ready"])

    assert asyncio.run(scenario()) == 1
