"""Client timeouts against a real broker: a call gives up after ``timeout`` (plus its own
``wait``) and never earlier, and the connection it gave up on is not used again.

The broker is made silent with SIGSTOP (a real stall: the socket stays open, nothing
answers), and a long-poll is answered late by a put from another client."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Iterator

import pytest

from client import AsyncClient, Client
from client.errors import Timeout

from .conftest import BrokerProcess, wait_for_state

SHORT = 0.5  # the clients' timeout in these tests, seconds


@contextlib.contextmanager
def stopped(broker: BrokerProcess) -> Iterator[None]:
    """The broker process frozen (SIGSTOP) for the duration, then running again."""
    broker.process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        broker.process.send_signal(signal.SIGCONT)


def put_later(broker: BrokerProcess, seconds: float) -> threading.Thread:
    """Put one message into "late" from another connection after ``seconds``."""

    def put() -> None:
        with broker.client() as producer:
            producer.put("late", b"late")

    timer = threading.Timer(seconds, put)
    timer.start()
    return timer


@pytest.mark.parametrize("wait", [0.0, 0.3])
def test_sync_call_to_a_silent_broker_times_out_and_reconnects(
    broker: BrokerProcess, wait: float
) -> None:
    with broker.client(timeout=SHORT) as client:
        client.ping()
        with stopped(broker), pytest.raises(Timeout, match="no reply within"):
            client.reserve("q", wait=wait)
        assert client.ping() > 0  # a new connection: the old one was closed
        # The broker forgot the abandoned wait, and with it the queue it alone used.
        wait_for_state(lambda: client.queues() == [])


def test_sync_long_poll_answered_after_the_timeout_but_within_its_wait(
    broker: BrokerProcess,
) -> None:
    # The reply comes after `timeout` but before `timeout + wait`: it must be received.
    with broker.client(timeout=SHORT) as client:
        client.ping()
        timer = put_later(broker, 1.0)
        (message,) = client.reserve("late", wait=3.0)
        timer.join()
        assert message.body == b"late"
        client.ack(message)
        with stopped(broker), pytest.raises(Timeout):  # the plain timeout is back
            client.ping()


def test_sync_long_poll_answered_in_the_last_stretch_of_its_wait(broker: BrokerProcess) -> None:
    # wait < timeout, and the broker stalls (SIGSTOP) while the long-poll waits, past the
    # client's `timeout`: its reply (the wait ended empty) comes inside the last stretch,
    # `timeout` to `timeout + wait` after the request was sent.
    with broker.client(timeout=1.0) as client:
        client.ping()
        stall = threading.Timer(0.2, broker.process.send_signal, (signal.SIGSTOP,))
        resume = threading.Timer(1.3, broker.process.send_signal, (signal.SIGCONT,))
        stall.start()
        resume.start()
        try:
            assert client.reserve("q", wait=0.9) == []  # gives up at 1.9 s
        finally:
            resume.join()
            broker.process.send_signal(signal.SIGCONT)
        with stopped(broker), pytest.raises(Timeout):  # the plain timeout is back
            client.ping()


def test_async_call_to_a_silent_broker_times_out_and_reconnects(broker: BrokerProcess) -> None:
    async def scenario() -> None:
        async with AsyncClient(broker.host, broker.port, timeout=SHORT) as client:
            await client.ping()
            with stopped(broker):
                calls = [client.ping(), client.reserve("q", wait=0.3), client.stats("q")]
                outcomes = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(outcome, Timeout) for outcome in outcomes), outcomes
            assert await client.ping() > 0

    asyncio.run(scenario())


def test_async_long_poll_answered_after_the_timeout_but_within_its_wait(
    broker: BrokerProcess,
) -> None:
    async def scenario() -> None:
        async with AsyncClient(broker.host, broker.port, timeout=SHORT) as client:
            timer = put_later(broker, 1.0)
            # Other calls come and go meanwhile: their deadlines are earlier than the
            # long-poll's, and each is answered.
            poll = asyncio.ensure_future(client.reserve("late", wait=3.0))
            for _ in range(5):
                assert await client.ping() > 0
            (message,) = await poll
            timer.join()
            assert message.body == b"late"
            assert await client.ack(message) == 1

    asyncio.run(scenario())


def test_sync_client_without_kernel_timeouts_still_times_out(
    broker: BrokerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where the platform refuses SO_RCVTIMEO, the client falls back on socket timeouts.
    monkeypatch.setattr("client._sync._set_kernel_timeouts", lambda sock, seconds: False)
    with Client(broker.host, broker.port, timeout=SHORT) as client:
        client.ping()
        with stopped(broker), pytest.raises(Timeout):
            client.reserve("q", wait=0.3)
        assert client.ping() > 0
