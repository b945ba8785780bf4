"""The order in which one turn's replies leave the broker: a request's own reply is
written before the long-poll completions that request caused are encoded."""

from __future__ import annotations

import asyncio
from typing import Any

from bench.micro_server import CollectingTransport, decoded
from broker import Core
from broker._server import BrokerServer, Connection, ServerLimits
from protocol import FrameDecoder, encode_frame


class RecordingTransport(CollectingTransport):
    """Each write goes to a log shared by the connections, with how many replies the
    ``other`` connection (if any) had queued but not written at that moment."""

    def __init__(self, name: str, log: list[tuple[str, bytes, int]]) -> None:
        super().__init__()
        self.name, self.log = name, log
        self.other: Connection | None = None

    def write(self, data: bytes) -> None:
        queued = 0 if self.other is None else len(self.other.outbox)
        self.log.append((self.name, data, queued))


def _frames(data: bytes) -> list[Any]:
    return decoded(FrameDecoder(), [data])


async def _put_while_a_reserve_waits() -> list[tuple[str, bytes, int]]:
    server = BrokerServer(Core(), ServerLimits(max_frame=1 << 20))
    log: list[tuple[str, bytes, int]] = []
    producer, worker = Connection(server, 1), Connection(server, 2)
    producer_transport = RecordingTransport("producer", log)
    worker_transport = RecordingTransport("worker", log)
    producer_transport.other, worker_transport.other = worker, producer
    producer.connection_made(producer_transport)  # type: ignore[arg-type]
    worker.connection_made(worker_transport)  # type: ignore[arg-type]
    for connection in (producer, worker):
        connection.data_received(encode_frame([0, "hello", {"version": 1}]))
    worker.data_received(encode_frame([1, "reserve", {"queues": ["q"], "wait": 5}]))
    log.clear()  # the hellos' replies
    producer.data_received(encode_frame([1, "put", {"queue": "q", "messages": [{"body": b"x"}]}]))
    return log


def test_a_put_is_confirmed_before_the_waiting_reserve_it_served_is_encoded() -> None:
    log = asyncio.run(_put_while_a_reserve_waits())
    assert [name for name, _, _ in log] == ["producer", "worker"]
    (confirmation,) = _frames(log[0][1])
    assert confirmation[:2] == [1, True] and len(confirmation[2]["ids"]) == 1
    (delivery,) = _frames(log[1][1])
    assert delivery[:2] == [1, True]
    assert [m["id"] for m in delivery[2]["messages"]] == confirmation[2]["ids"]
    # When the confirmation was written, nothing for the worker was queued yet.
    assert log[0][2] == 0


async def _put_serving_its_own_wait() -> list[tuple[str, bytes, int]]:
    """One connection long-polls, then puts: its own put serves its own wait."""
    server = BrokerServer(Core(), ServerLimits(max_frame=1 << 20))
    log: list[tuple[str, bytes, int]] = []
    both = Connection(server, 1)
    both.connection_made(RecordingTransport("both", log))  # type: ignore[arg-type]
    both.data_received(encode_frame([0, "hello", {"version": 1}]))
    both.data_received(encode_frame([1, "reserve", {"queues": ["q"], "wait": 5}]))
    log.clear()
    both.data_received(encode_frame([2, "put", {"queue": "q", "messages": [{"body": b"x"}]}]))
    return log


def test_a_connection_whose_put_serves_its_own_wait_gets_both_replies_in_one_write() -> None:
    log = asyncio.run(_put_serving_its_own_wait())
    assert len(log) == 1  # not one write for the put and another for the delivery
    confirmation, delivery = _frames(log[0][1])
    assert confirmation[:2] == [2, True]
    assert delivery[:2] == [1, True]
    assert [m["id"] for m in delivery[2]["messages"]] == confirmation[2]["ids"]
