"""The asyncio client: many concurrent calls multiplexed over one connection."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from protocol import NEED_DATA, FrameDecoder, Reply, SluiceError, encode_frame

from . import _calls
from ._calls import Call
from ._common import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    DEFAULT_TIMEOUT,
    MAX_REPLY_FRAME,
    hello_args,
    parse_url,
    reply_of,
    result_of,
)
from .errors import ConnectionClosed, Timeout

P = ParamSpec("P")
T = TypeVar("T")


def _awaiting(
    build: Callable[P, Call[T]],
) -> Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]]:
    async def method(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.run(build(*args, **kwargs))

    method.__name__ = build.__name__
    method.__doc__ = build.__doc__
    return method


class _ReplyReader(asyncio.Protocol):
    """Routes each reply to the future of the request with its id."""

    def __init__(self, pending: dict[int, asyncio.Future[Reply]]) -> None:
        self.pending = pending
        self.decoder = FrameDecoder(MAX_REPLY_FRAME)
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.decoder.feed(data)
            while (frame := self.decoder.next_frame()) is not NEED_DATA:
                self._route(reply_of(frame))
        except SluiceError as error:
            self._fail_all(error)
            if self.transport is not None:
                self.transport.close()

    def _route(self, reply: Reply) -> None:
        if reply.request_id is None:
            # The broker could not tell which request failed: it is closing on us.
            self._fail_all(reply.error or ConnectionClosed("broker sent an unaddressed reply"))
            return
        future = self.pending.pop(reply.request_id, None)
        if future is not None and not future.done():
            future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(ConnectionClosed(f"the broker closed the connection ({exc or 'EOF'})"))
        if not self.closed.done():
            self.closed.set_result(None)

    def _fail_all(self, error: Exception) -> None:
        pending = list(self.pending.values())
        self.pending.clear()
        for future in pending:
            if not future.done():
                future.set_exception(error)


class AsyncClient:
    """asyncio Sluice client; the same methods as ``Client``, as coroutines.

    Concurrent calls share one connection: each waits only for its own reply, so a
    long-polling ``reserve`` does not hold up the others.

        async with AsyncClient() as client:
            await client.put("emails", b"hello")
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        client_name: str = "sluice-python-async",
        auth_token: str | None = None,
    ) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.client_name, self.auth_token = client_name, auth_token
        self.server_info: dict[str, Any] = {}
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._reader: _ReplyReader | None = None
        self._ids = itertools.count(1)
        self._connecting: asyncio.Lock | None = None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> AsyncClient:
        host, port = parse_url(url)
        return cls(host, port, **options)

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self) -> None:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if not self._connected():
                await self._open()

    async def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None and reader.transport is not None:
            reader.transport.close()
            await reader.closed

    async def run(self, call: Call[T]) -> T:
        """Send one call and wait for its reply."""
        if not self._connected():
            await self.connect()
        return result_of(call, await self._round_trip(call.op, call.args, call.wait))

    def _connected(self) -> bool:
        """False once the transport is closing, even before connection_lost has run."""
        reader = self._reader
        return (
            reader is not None
            and reader.transport is not None
            and not reader.transport.is_closing()
            and not reader.closed.done()
        )

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        self._pending = {}
        try:
            _, reader = await asyncio.wait_for(
                loop.create_connection(lambda: _ReplyReader(self._pending), self.host, self.port),
                self.timeout,
            )
        except (OSError, TimeoutError) as error:
            raise ConnectionClosed(
                f"cannot connect to sluice://{self.host}:{self.port}: {error}; is the broker "
                "running? (python -m broker)"
            ) from None
        self._reader = reader
        reply = await self._round_trip("hello", hello_args(self.client_name, self.auth_token), 0)
        if reply.error is not None:
            await self.close()
            raise reply.error
        self.server_info = reply.result

    async def _round_trip(self, op: str, args: dict[str, Any], wait: float) -> Reply:
        reader = self._reader
        if reader is None or not self._connected():
            raise ConnectionClosed(f"{op}: not connected to the broker")
        assert reader.transport is not None
        request_id = next(self._ids)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self._pending[request_id] = future
        reader.transport.write(encode_frame([request_id, op, args]))
        # A timer on the future, not asyncio.wait_for: that would cost a task per call.
        limit = self.timeout + wait
        timer = loop.call_later(limit, self._expire, request_id, op, limit)
        try:
            return await future
        finally:
            timer.cancel()

    def _expire(self, request_id: int, op: str, limit: float) -> None:
        future = self._pending.pop(request_id, None)
        if future is not None and not future.done():
            future.set_exception(Timeout(f"{op}: no reply within {limit:.1f}s"))

    ping = _awaiting(_calls.ping)
    put = _awaiting(_calls.put)
    put_many = _awaiting(_calls.put_many)
    reserve = _awaiting(_calls.reserve)
    ack = _awaiting(_calls.ack)
    nack = _awaiting(_calls.nack)
    touch = _awaiting(_calls.touch)
    bury = _awaiting(_calls.bury)
    cancel = _awaiting(_calls.cancel)
    status = _awaiting(_calls.status)
    stats = _awaiting(_calls.stats)
    queues = _awaiting(_calls.queues)
    configure = _awaiting(_calls.configure)
    pause = _awaiting(_calls.pause)
    resume = _awaiting(_calls.resume)
    purge = _awaiting(_calls.purge)
    dead_letters = _awaiting(_calls.dead_letters)
    peek = _awaiting(_calls.peek)
    put_and_wait = _awaiting(_calls.put_and_wait)
    result = _awaiting(_calls.result)
    progress = _awaiting(_calls.progress)
    replay = _awaiting(_calls.replay)
    purge_dead = _awaiting(_calls.purge_dead)
