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
