"""Client-side checks that happen before anything is sent."""

from __future__ import annotations

import asyncio

import pytest

from client import AsyncClient, Client
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
