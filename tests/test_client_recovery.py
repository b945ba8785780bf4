"""Both clients recover from a corrupt reply stream by reconnecting on the next call.

A small TCP proxy sits between client and a real broker. On its first connection it passes
the hello reply through, then answers with a frame header announcing 4 GiB and keeps the
socket open, so the client sees a broken stream rather than a closed one. Later connections
pass straight through.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from client import AsyncClient, Client
from client.errors import SluiceError
from tests.conftest import BrokerProcess

GARBAGE = b"\xff\xff\xff\xff"


class CorruptingProxy:
    def __init__(self, broker: BrokerProcess) -> None:
        self.broker = broker
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((self.broker.host, self.broker.port))
            self.sockets += [client, upstream]
            self.connections += 1
            corrupt = self.connections == 1
            threading.Thread(target=_pump, args=(client, upstream), daemon=True).start()
            downstream = _corrupt_after_first_frame if corrupt else _pump
            threading.Thread(target=downstream, args=(upstream, client), daemon=True).start()

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def _pump(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(1 << 16):
            target.sendall(data)
    except OSError:
        pass


def _corrupt_after_first_frame(source: socket.socket, target: socket.socket) -> None:
    """Forward exactly one frame (the hello reply), then garbage in place of the rest."""
    buffer = b""
    try:
        while len(buffer) < 4 or len(buffer) < 4 + struct.unpack(">I", buffer[:4])[0]:
            buffer += source.recv(1 << 16)
        (length,) = struct.unpack(">I", buffer[:4])
        target.sendall(buffer[: 4 + length])
        if source.recv(1 << 16):
            target.sendall(GARBAGE)
    except OSError:
        pass


@pytest.fixture
def proxy(broker: BrokerProcess) -> Iterator[CorruptingProxy]:
    proxy = CorruptingProxy(broker)
    yield proxy
    proxy.close()


def test_sync_client_reconnects_after_a_corrupt_reply(
    proxy: CorruptingProxy, broker: BrokerProcess
) -> None:
    with Client(broker.host, proxy.port, timeout=5) as client:
        with pytest.raises(SluiceError):
            client.ping()  # the garbage reply: a typed error, not a hang
        message_id = client.put("after", b"recovered")  # a fresh connection
        assert proxy.connections == 2
    with broker.client() as direct:
        assert direct.status(message_id)["state"] == "ready"


def test_async_client_reconnects_after_a_corrupt_reply(
    proxy: CorruptingProxy, broker: BrokerProcess
) -> None:
    async def scenario() -> int:
        async with AsyncClient(broker.host, proxy.port, timeout=5) as client:
            with pytest.raises(SluiceError):
                await client.ping()
            return await client.put("after", b"recovered")

    message_id = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert proxy.connections == 2
    with broker.client() as direct:
        assert direct.status(message_id)["state"] == "ready"
