"""``import sluice``: the public names, where a client finds the broker, and calls with
nothing to send."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import client
import client.errors
import sluice
import sluice.errors
from sluice import AsyncClient, AsyncWorker, Client, Fail, Job, Message, Retry, Worker

from .conftest import BrokerProcess, start_broker, stop_broker

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


def test_put_many_of_25000_comes_back_as_25000_ids_in_order(broker: BrokerProcess) -> None:
    bodies = [b"%05d" % n for n in range(25_000)]
    with Client(url=broker.url) as producer:
        ids = producer.put_many("many", bodies)
        assert len(ids) == 25_000 and ids == sorted(ids) and len(set(ids)) == 25_000
        assert producer.stats("many")["ready"] == 25_000
        leased = []
        while len(leased) < 2_500:
            leased += producer.reserve("many", max_messages=min(1000, 2_500 - len(leased)))
        assert [m.body for m in leased] == bodies[:2_500]  # the order they were put in
        assert producer.ack(leased) == 2_500  # three frames
        assert producer.stats("many")["totals"]["acked"] == 2_500

    async def scenario() -> list[int]:
        async with AsyncClient(url=broker.url) as other:
            return await other.put_many("many", bodies)

    again = asyncio.run(scenario())
    assert len(again) == 25_000 and again == sorted(again) and again[0] > ids[-1]


@pytest.mark.parametrize("form", ["sync", "async"])
def test_a_failed_frame_of_a_long_put_many_names_what_the_others_stored(
    broker: BrokerProcess, form: str
) -> None:
    queue = f"picky-{form}"
    bodies = [b"ok"] * 2_500
    bodies[1_500] = b"far too long"  # the second frame (1,000-1,999) is refused whole
    with Client(url=broker.url) as admin:
        admin.configure(queue, max_body=5)

    def put() -> list[int]:
        if form == "sync":
            with Client(url=broker.url) as producer:
                return producer.put_many(queue, bodies)

        async def scenario() -> list[int]:
            async with AsyncClient(url=broker.url) as producer:
                return await producer.put_many(queue, bodies)

        return asyncio.run(scenario())

    with pytest.raises(client.errors.TooLarge) as refused:
        put()
    details = refused.value.details
    assert details["stored"] == 1_500 and len(details["ids"]) == 1_500
    assert details["ids"] == sorted(details["ids"])
    assert "1500 messages of the others were stored" in str(refused.value)
    with Client(url=broker.url) as check:
        assert check.stats(queue)["ready"] == 1_500
        first = check.reserve(queue, max_messages=1)[0]
        assert first.id == details["ids"][0]


def test_a_long_ack_with_a_stale_lease_counts_what_every_frame_did(broker: BrokerProcess) -> None:
    with Client(url=broker.url) as worker:
        worker.configure("settle", dedup_window=301.0)  # kept once drained: totals read
        worker.put_many("settle", [b"s"] * 1_200)
        leased = worker.reserve("settle", max_messages=1000)
        leased += worker.reserve("settle", max_messages=1000)
        assert len(leased) == 1_200
        worker.ack(leased[1_100])  # its lease is gone before the long ack
        with pytest.raises(client.errors.LeaseLost) as lost:
            worker.ack(leased)
        assert lost.value.details["done"] == 1_199
        assert lost.value.details["failed"] == [leased[1_100].id]
        assert worker.stats("settle")["totals"]["acked"] == 1_200


def test_client_methods_show_their_real_parameters_and_docs() -> None:
    import inspect

    for cls in (Client, AsyncClient):
        put = inspect.signature(cls.put)
        assert list(put.parameters)[:3] == ["self", "queue", "body"]
        assert put.parameters["priority"].default == 0 and put.return_annotation == "MessageId"
        reserve = inspect.signature(cls.reserve)
        assert "max_messages" in reserve.parameters and "wait" in reserve.parameters
        assert cls.put.__doc__ and "dedup key" in cls.put.__doc__
        assert "result" in str(inspect.signature(cls.ack))
    bound = inspect.signature(Client().ack)
    assert list(bound.parameters) == ["deliveries", "result"]


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda c: c.reserve("jobs", wait=1e12), "0 to 3600 seconds"),
        (lambda c: c.reserve("jobs", wait=float("nan")), "0 to 3600 seconds"),
        (lambda c: c.result(7, wait=-1), "0 to 3600 seconds"),
        (lambda c: c.put_and_wait("jobs", b"x", timeout=0), "more than 0 to 3600"),
        (lambda c: c.put("jobs", b"x", priority=2**64), "[-2147483648, 2147483647]"),
        (lambda c: c.put_many("jobs", [b"x"], priority=True), "priority must be an integer"),
    ],
)
def test_values_the_broker_would_refuse_are_refused_before_connecting(
    call: Any, words: str
) -> None:
    with pytest.raises(client.errors.BadRequest) as refused:
        call(Client(port=UNREACHABLE_PORT))
    assert words in str(refused.value)


def test_a_refused_connection_is_broker_unavailable() -> None:
    with pytest.raises(client.errors.BrokerUnavailable) as refused:
        Client(port=UNREACHABLE_PORT).ping()
    assert isinstance(refused.value, client.errors.ConnectionClosed)
    assert "is the broker running" in str(refused.value)

    async def scenario() -> None:
        with pytest.raises(client.errors.BrokerUnavailable):
            await AsyncClient(port=UNREACHABLE_PORT).ping()

    asyncio.run(scenario())


@pytest.mark.parametrize("form", ["sync", "async"])
def test_a_request_over_the_broker_frame_limit_is_refused_before_it_is_sent(
    tmp_path: Path, form: str
) -> None:
    broker = start_broker(tmp_path / "broker.log", "--in-memory", "--max-frame", "1048576")
    try:
        bodies = [b"m" * 100_000] * 20  # 2 MB in one frame: over the 1 MiB limit

        async def scenario() -> None:
            async with AsyncClient(url=broker.url) as producer:
                with pytest.raises(client.errors.TooLarge, match="max_frame of 1048576"):
                    await producer.put_many("big", bodies)
                assert await producer.ping() > 0  # the same connection carries on
                assert await producer.put_many("big", bodies[:5])  # under the limit

        if form == "async":
            asyncio.run(scenario())
        else:
            with Client(url=broker.url) as producer:
                with pytest.raises(client.errors.TooLarge, match="max_frame of 1048576"):
                    producer.put_many("big", bodies)
                assert producer.ping() > 0
                assert producer.put_many("big", bodies[:5])
        with Client(url=broker.url) as check:
            assert check.stats("big")["ready"] == 5  # nothing of the refused call stored
    finally:
        stop_broker(broker)


def test_stale_leases_in_two_frames_of_one_ack_are_all_named(broker: BrokerProcess) -> None:
    with Client(url=broker.url) as worker:
        worker.put_many("settle-two", [b"s"] * 1_200)
        leased = worker.reserve("settle-two", max_messages=1000)
        leased += worker.reserve("settle-two", max_messages=1000)
        stale = [leased[10], leased[1_100]]  # one in each frame of the long ack
        worker.ack(stale)
        with pytest.raises(client.errors.LeaseLost) as lost:
            worker.ack(leased)
        assert lost.value.details["done"] == 1_198
        assert sorted(lost.value.details["failed"]) == sorted(m.id for m in stale)
        assert "2 of the frames this call was cut into failed" in str(lost.value)
