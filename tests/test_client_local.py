"""Client-side checks that happen before anything is sent."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from client import AsyncClient, Client, Message
from client.errors import BadRequest

UNREACHABLE_PORT = 1  # nothing listens there: a call that tried to connect would fail


@pytest.mark.parametrize("name", ["has space", "", "x" * 201, "ü", "x" * 1_000_000])
def test_sync_client_refuses_a_bad_queue_name_without_connecting(name: str) -> None:
    client = Client(port=UNREACHABLE_PORT)
    with pytest.raises(BadRequest) as raised:
        client.put(name, b"body")
    assert "invalid queue name" in str(raised.value)
    assert len(str(raised.value)) < 300  # a huge name is not echoed whole


def test_async_client_refuses_a_bad_queue_name_without_connecting() -> None:
    async def scenario() -> None:
        client = AsyncClient(port=UNREACHABLE_PORT)
        with pytest.raises(BadRequest):
            await client.reserve(["ok", "not ok"])

    asyncio.run(scenario())


WIRE_DELIVERY = {
    "id": 7,
    "queue": "emails",
    "body": b"hi",
    "attempts": 2,
    "max_attempts": 5,
    "enqueued_at": 12.5,
    "lease": 9,
    "lease_deadline": 42.0,
}


def test_a_delivery_from_the_wire_equals_the_message_built_from_its_fields() -> None:
    built = Message(
        id=7,
        queue="emails",
        body=b"hi",
        attempts=2,
        max_attempts=5,
        enqueued_at=12.5,
        lease=9,
        lease_deadline=42.0,
    )
    assert Message.from_wire(WIRE_DELIVERY) == built  # unset fields take the defaults
    assert Message.from_wire({**WIRE_DELIVERY, "headers": {"a": 1}}).headers == {"a": 1}
    with pytest.raises(KeyError):
        Message.from_wire({k: v for k, v in WIRE_DELIVERY.items() if k != "lease"})


@dataclasses.dataclass(slots=True, kw_only=True)
class TaggedMessage(Message):
    tag: str = "untagged"


def test_a_subclass_from_the_wire_keeps_its_own_fields_defaults() -> None:
    message = TaggedMessage.from_wire(WIRE_DELIVERY)
    assert type(message) is TaggedMessage
    assert (message.tag, message.id, message.lease) == ("untagged", 7, 9)


def test_the_calls_built_in_c_are_the_named_tuples_field_for_field() -> None:
    """put, put_many, reserve and ack build their ``Call`` without its own ``__new__``:
    each must equal the constructor's result with the same fields and the defaults (a
    field added, dropped or moved breaks this), and so must the asyncio client's pending
    entry's fields stay the four it builds."""
    from client import _calls
    from client._async import _Pending
    from client._calls import PUT_SPLIT, SETTLE_SPLIT, UNKNOWN, Call

    put = _calls.put("q", b"x")
    assert put == Call("put", put.args, put.parse)
    assert put.known is UNKNOWN and put.split is None and put.wait == 0.0
    many = _calls.put_many("q", [b"x", b"y"])
    assert many == Call("put", many.args, many.parse, split=PUT_SPLIT)
    assert _calls.put_many("q", []).known == []
    reserve = _calls.reserve(["a", "b"], max_messages=3, wait=2)
    assert reserve == Call("reserve", reserve.args, reserve.parse, wait=2.0)
    ack = _calls.ack((7, 9))
    assert ack == Call("ack", {"items": [[7, 9]]}, ack.parse, split=SETTLE_SPLIT)
    assert ack.parse({"acked": 1}) == 1
    assert _calls.ack([]).known == 0
    for call in (put, many, reserve, ack):
        assert type(call) is Call and len(call) == len(Call._fields)
    assert _Pending._fields == ("future", "deadline", "op", "limit")
