"""The asyncio client: many concurrent calls multiplexed over one connection."""

from __future__ import annotations

import asyncio
import itertools
import math
import socket
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, NamedTuple, ParamSpec, TypeVar, cast

from protocol import NEED_DATA, FrameDecoder, SluiceError, encode_frame

from . import _calls
from ._calls import UNKNOWN, Call, merge_answers, new_tuple, split_call
from ._channels import Event, Inbox, is_push
from ._common import (
    DEFAULT_TIMEOUT,
    MAX_REPLY_FRAME,
    Limits,
    Tls,
    as_method,
    broker_address,
    broker_tls,
    format_url,
    hello_args,
    result_of,
    split_reply_frame,
    too_large,
)
from ._sealing import BodyKey, Sealer
from .errors import BrokerUnavailable, ConnectionClosed, Timeout

P = ParamSpec("P")
T = TypeVar("T")


def _awaiting(
    build: Callable[P, Call[T]],
) -> Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]]:
    async def method(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.run(build(*args, **kwargs))

    as_method(method, build)
    return method


Answer = tuple[bool, Any]  # (ok, result or SluiceError) of one reply


class _Pending(NamedTuple):
    """A request sent and not yet answered."""

    future: asyncio.Future[Answer]
    deadline: float  # loop time after which the call times out
    op: str
    limit: float  # its timeout in seconds, for the error


class _ReplyReader(asyncio.Protocol):
    """Routes each reply to the future of the request with its id."""

    def __init__(self, pending: dict[int, _Pending], loop: asyncio.AbstractEventLoop) -> None:
        self.pending = pending
        self.subscriptions: dict[int, AsyncSubscription] = {}
        self.decoder = FrameDecoder(MAX_REPLY_FRAME)
        self.transport: asyncio.Transport | None = None
        self.closed = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            frame = self.decoder.feed_and_next(data)
            while frame is not NEED_DATA:
                if is_push(frame):
                    subscription = self.subscriptions.get(frame[0])
                    if subscription is not None:
                        subscription.feed(frame[1], frame[2])
                else:
                    self._route(*split_reply_frame(frame))
                frame = self.decoder.next_frame()
        except SluiceError as error:
            self._fail_all(error)
            if self.transport is not None:
                self.transport.close()

    def _route(self, request_id: int | None, ok: bool, value: Any) -> None:
        if request_id is None:
            # The broker could not tell which request failed: it is closing on us.
            error = value if not ok else None
            self._fail_all(error or ConnectionClosed("broker sent an unaddressed reply"))
            return
        pending = self.pending.pop(request_id, None)
        if pending is not None and not pending.future.done():
            pending.future.set_result((ok, value))

    def connection_lost(self, exc: Exception | None) -> None:
        error = ConnectionClosed(f"the broker closed the connection ({exc or 'EOF'})")
        self._fail_all(error)
        for subscription in list(self.subscriptions.values()):
            subscription.end(error)
        if not self.closed.done():
            self.closed.set_result(None)

    def _fail_all(self, error: Exception) -> None:
        pending = list(self.pending.values())
        self.pending.clear()
        for call in pending:
            if not call.future.done():
                call.future.set_exception(error)


class AsyncClient:
    """asyncio Sluice client; the same methods as ``Client``, as coroutines.

    The broker is ``url`` (``sluice://host:port``), or ``host`` and ``port``, or else
    the ``SLUICE_URL`` environment variable, or else sluice://127.0.0.1:7700. ``tls``:
    an ``ssl.SSLContext`` (see ``tls_context``), True (the system's CAs), False, or None
    for TLS exactly when the URL is ``sluices://``.
    ``body_key``: bodies and results sealed with AES-GCM in this client, so the broker
    stores ciphertext (a key, or a map of key id to key; see ``client._sealing``).

    Concurrent calls share one connection: each waits only for its own reply, so a
    long-polling ``reserve`` does not hold up the others.

        async with AsyncClient() as client:
            await client.put("emails", b"hello")
    """

    def __init__(
        self,
        host: str | None = None,
        port: int | None = None,
        *,
        url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        client_name: str = "sluice-python-async",
        auth_token: str | None = None,
        tls: Tls = None,
        body_key: BodyKey | None = None,
    ) -> None:
        self.host, self.port = broker_address(url, host, port)
        self.tls = broker_tls(tls, url, host, port)
        self._sealer = Sealer(body_key) if body_key is not None else None
        self.timeout = timeout
        self.client_name, self.auth_token = client_name, auth_token
        self.server_info: dict[str, Any] = {}
        self._limits = Limits()
        self._pending: dict[int, _Pending] = {}
        self._reader: _ReplyReader | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count(1)
        self._connecting: asyncio.Lock | None = None
        # One timer for every call's timeout, at the earliest deadline it has to catch.
        self._expiry: asyncio.TimerHandle | None = None
        self._expiry_at = math.inf

    @classmethod
    def from_url(cls, url: str, **options: Any) -> AsyncClient:
        return cls(url=url, **options)

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
        """Send one call and wait for its reply (none for a call with nothing to send)."""
        if call.known is not UNKNOWN:
            return call.known  # type: ignore[no-any-return]
        if self._sealer is not None:
            call = self._sealer.seal(call)
        if not self._connected():
            await self.connect()
        split, limits = call.split, self._limits
        if split is None or len(call.args[split.key]) <= limits.max_batch:
            ok, value = await self._round_trip(call.op, call.args, call.wait)
            return result_of(call, ok, value)
        parts = cast(list[Call[T]], split_call(call, limits.max_batch))
        # Every frame is encoded (and an oversized one refused) before any is sent, and
        # every one is written before the first reply is awaited: pipelined.
        frames = [self._encode(part.op, part.args) for part in parts]
        sent = [
            self._send(frame, part.op, part.wait) for frame, part in zip(frames, parts, strict=True)
        ]
        answers = await asyncio.gather(*sent, return_exceptions=True)
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer  # the connection failed or timed out: nothing is known
        return merge_answers(call, parts, cast(list[Answer], answers))

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
        # Kept: asyncio.get_running_loop() costs a getpid system call each time.
        loop = self._loop = asyncio.get_running_loop()
        pending: dict[int, _Pending] = {}
        self._pending = pending
        try:
            _, reader = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _ReplyReader(pending, loop), self.host, self.port, ssl=self.tls
                ),
                self.timeout,
            )
        except (OSError, TimeoutError) as error:
            raise BrokerUnavailable(
                f"cannot connect to {format_url(self.host, self.port, self.tls is not None)}: "
                f"{error}; is the broker running? (python -m broker)"
            ) from None
        self._reader = reader
        hello = hello_args(self.client_name, self.auth_token)
        ok, value = await self._round_trip("hello", hello, 0)
        if not ok:
            await self.close()
            raise value
        self.server_info, self._limits = value, Limits.of(value)

    def _round_trip(self, op: str, args: dict[str, Any], wait: float) -> asyncio.Future[Answer]:
        """Send one request; the future gets its reply's ``(ok, value)``, or ``Timeout``
        after ``timeout + wait`` seconds, or ``ConnectionClosed``."""
        return self._send(self._encode(op, args), op, wait)

    def _encode(self, op: str, args: dict[str, Any]) -> tuple[int, bytes]:
        """A new request id and the request's frame; ``TooLarge`` over the broker's limit."""
        request_id = next(self._ids)
        frame = encode_frame([request_id, op, args])
        if len(frame) > self._limits.frame_bytes:
            raise too_large(frame, op, self._limits)
        return request_id, frame

    def _send(self, encoded: tuple[int, bytes], op: str, wait: float) -> asyncio.Future[Answer]:
        reader, loop = self._reader, self._loop
        if reader is None or loop is None or not self._connected():
            raise ConnectionClosed(f"{op}: not connected to the broker")
        assert reader.transport is not None
        request_id, frame = encoded
        future: asyncio.Future[Answer] = loop.create_future()
        limit = self.timeout + wait
        deadline = loop.time() + limit
        self._pending[request_id] = new_tuple(_Pending, (future, deadline, op, limit))
        reader.transport.write(frame)
        # Not a timer per call (nor asyncio.wait_for, a task per call): one timer, at the
        # earliest deadline of the calls in flight.
        if deadline < self._expiry_at:
            self._expire_at(loop, deadline)
        return future

    def _expire_at(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry = loop.call_at(when, self._expire_due, loop)
        self._expiry_at = when

    def _expire_due(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fail every call past its deadline with ``Timeout``; wait for the next one."""
        self._expiry, self._expiry_at = None, math.inf
        now, pending = loop.time(), self._pending
        earliest = math.inf
        for request_id, call in list(pending.items()):
            if call.deadline <= now:
                del pending[request_id]
                if not call.future.done():
                    message = f"{call.op}: no reply within {call.limit:.1f}s"
                    call.future.set_exception(Timeout(message))
            elif call.deadline < earliest:
                earliest = call.deadline
        if earliest < math.inf:
            self._expire_at(loop, earliest)

    def subscribe(self, *patterns: str, from_seq: int | None = None) -> AsyncSubscription:
        """A subscription to the channels matching ``patterns`` (``*`` one token, ``>``
        the rest): ``async for message in client.subscribe("orders.*")``. Job events on
        ``queue.<queue>.<event>`` come as ``JobEvent``; with ``from_seq``, the ones the
        broker still holds from that seq on come first (a ``Gap`` first if some are
        gone). It starts on first iteration (or ``await start()``), shares this
        connection with other calls, and ends on ``unsubscribe()``; raises ``Lagged`` if
        it fell behind, ``ConnectionClosed`` if the connection went."""
        return AsyncSubscription(self, list(patterns), from_seq)

    async def _start_subscription(self, subscription: AsyncSubscription) -> int:
        if not self._connected():
            await self.connect()
        reader = self._reader
        assert reader is not None
        args: dict[str, Any] = {"patterns": subscription.patterns}
        if subscription.from_seq is not None:
            args["from_seq"] = subscription.from_seq
        encoded = self._encode("subscribe", args)
        reader.subscriptions[encoded[0]] = subscription  # its pushes may precede the reply
        ok, value = await self._send(encoded, "subscribe", 0)
        if not ok:
            reader.subscriptions.pop(encoded[0], None)
            raise value
        subscription.reader = reader
        subscription.next_seq = value.get("next_seq")
        return encoded[0]

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
    delete_queue = _awaiting(_calls.delete_queue)
    schedule = _awaiting(_calls.schedule)
    unschedule = _awaiting(_calls.unschedule)
    schedules = _awaiting(_calls.schedules)
    trigger = _awaiting(_calls.trigger)
    publish = _awaiting(_calls.publish)
    unsubscribe = _awaiting(_calls.unsubscribe)
    bind = _awaiting(_calls.bind)
    unbind = _awaiting(_calls.unbind)
    bindings = _awaiting(_calls.bindings)


class AsyncSubscription:
    """An async iterator of ``ChannelMessage``, ``JobEvent`` and ``Gap`` (see
    ``AsyncClient.subscribe``). Also an async context manager that starts it and
    unsubscribes on exit. ``next_seq``: the seq of the broker's next job event when it
    subscribed (None before that, or from an older broker)."""

    def __init__(
        self, client: AsyncClient, patterns: list[str], from_seq: int | None = None
    ) -> None:
        self.client, self.patterns, self.from_seq = client, patterns, from_seq
        self.next_seq: int | None = None
        self.id: int | None = None  # the broker's name for it, once started
        self.started = False
        self.reader: _ReplyReader | None = None
        self._inbox: Inbox | None = None
        self._wakeup: asyncio.Future[None] | None = None

    async def start(self) -> AsyncSubscription:
        """Subscribe (once): messages published after this returns reach it."""
        if not self.started:
            self.started = True
            self._inbox = Inbox(0)
            self.id = await self.client._start_subscription(self)
        return self

    async def unsubscribe(self) -> None:
        """End it: iteration stops; messages not yet taken are dropped."""
        if self._inbox is None or self.id is None or self._inbox.ended:
            return
        self._end_here(None)
        if self.client._connected():
            await self.client.run(_calls.unsubscribe(self.id))

    def _end_here(self, error: Exception | None) -> None:
        assert self._inbox is not None
        self._inbox.end(error)
        self._inbox.events.clear()
        if self.reader is not None and self.id is not None:
            self.reader.subscriptions.pop(self.id, None)
        self._wake()

    def feed(self, kind: str, payload: Any) -> None:
        if self._inbox is not None and not self._inbox.feed(kind, payload):
            self._end_here(self._inbox.error)  # overflowed: tell the broker too
            if self.id is not None and self.client._connected():
                encoded = self.client._encode("unsubscribe", {"subscription": self.id})
                sent = self.client._send(encoded, "unsubscribe", 0)
                sent.add_done_callback(_ignore_outcome)  # nothing waits for it
        self._wake()

    def end(self, error: Exception) -> None:
        if self._inbox is not None:
            self._inbox.end(error)
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def __aiter__(self) -> AsyncSubscription:
        return self

    async def __anext__(self) -> Event:
        await self.start()
        assert self._inbox is not None
        while True:
            try:
                event = self._inbox.take()
            except StopIteration:
                raise StopAsyncIteration from None
            if event is not None:
                return event
            self._wakeup = asyncio.get_running_loop().create_future()
            await self._wakeup

    async def __aenter__(self) -> AsyncSubscription:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.unsubscribe()


def _ignore_outcome(future: asyncio.Future[Answer]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: a closed connection is no news here
