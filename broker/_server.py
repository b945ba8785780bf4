"""The asyncio side: one ``asyncio.Protocol`` per connection, one timer for the broker.

A loop turn goes: bytes arrive -> frames -> requests handled against the core -> replies
queued on their connections -> ``_end_turn`` collects long-poll completions, writes every
queued reply in one write per connection, and re-arms the single timer at the core's
next deadline. The store seam: replies are only queued during a turn and written in
``_flush``; a durable store commits the turn's changes before that write.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, cast

from protocol import (
    NEED_DATA,
    OPS,
    PROTOCOL_VERSION,
    BadFrame,
    BadRequest,
    FrameDecoder,
    InternalError,
    ShuttingDown,
    SluiceError,
    TooLarge,
    Unauthorized,
    UnsupportedVersion,
    encode_frame,
    parse_request,
    request_id_of,
    shown,
)

from . import __version__
from ._args import MAX_BATCH, MAX_WAIT, MAX_WAITS_PER_CONNECTION
from ._core import Core
from ._handlers import PENDING, Call, deliveries, handle

log = logging.getLogger("sluice.server")

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerLimits:
    max_frame: int
    auth_token: str | None = None


class Connection(asyncio.Protocol):
    """One client. Parses frames, enforces hello-first, and queues replies for the server
    to write. A framing error gets one error reply and closes this connection only."""

    def __init__(self, server: BrokerServer, connection_id: int) -> None:
        self.server = server
        self.id = connection_id
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder(server.limits.max_frame)
        self.greeted = False
        self.client_name = "?"
        self.peer = "?"
        self.outbox: list[bytes] = []
        self.waiting: set[int] = set()  # request ids of this connection's long-polls

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.peer = str(transport.get_extra_info("peername"))
        self.server.connection_opened(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.decoder.feed(data)
            while not self.closing and (frame := self.decoder.next_frame()) is not NEED_DATA:
                self._on_frame(frame)
        except (BadFrame, TooLarge) as error:
            self.fail(error)
        self.server.end_turn()

    @property
    def closing(self) -> bool:
        """True once this connection is being closed: read no more requests from it."""
        return self.transport is None or self.transport.is_closing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connection_closed(self)

    def pause_writing(self) -> None:
        # The peer is not reading its replies: stop reading its requests until it does.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # requests

    def _on_frame(self, frame: Any) -> None:
        try:
            request = parse_request(frame)
        except SluiceError as error:
            self.reply_error(request_id_of(frame), error)
            return
        try:
            result: Any
            if request.op == "hello":
                result = self._hello(request.args)
            elif not self.greeted:
                raise BadRequest('send hello first: [id, "hello", {"version": 1}]')
            else:
                result = self.server.handle(self, request.request_id, request.op, request.args)
        except SluiceError as error:
            self.reply_error(request.request_id, error)
            if isinstance(error, UnsupportedVersion | Unauthorized):
                self.close_after_replies()
            return
        except Exception:
            log.exception("internal error on %s %s", request.op, shown(request.args))
            self.reply_error(request.request_id, InternalError(f"internal error in {request.op}"))
            return
        if result is PENDING:
            self.waiting.add(request.request_id)
        else:
            self.reply(request.request_id, result)

    def _hello(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.greeted:
            raise BadRequest("hello was already sent on this connection")
        version = args.get("version")
        if type(version) is not int or version != PROTOCOL_VERSION:
            raise UnsupportedVersion(
                f"protocol version {shown(version)} is not supported; this broker speaks "
                f"version {PROTOCOL_VERSION}"
            )
        expected = self.server.limits.auth_token
        token = args.get("token")
        if expected is not None and not (
            isinstance(token, str) and hmac.compare_digest(token.encode(), expected.encode())
        ):
            raise Unauthorized("hello needs the broker's auth token ('token')")
        name = args.get("client")
        self.client_name = name[:200] if isinstance(name, str) else "?"
        self.greeted = True
        log.debug("connection %d from %s is %s", self.id, self.peer, self.client_name)
        return self.server.hello_result(self)

    # replies

    def reply(self, request_id: int | None, result: Any) -> None:
        self._queue_frame([request_id, True, result])

    def reply_error(self, request_id: int | None, error: SluiceError) -> None:
        self._queue_frame([request_id, False, error.to_wire()])

    def _queue_frame(self, wire: list[Any]) -> None:
        self.outbox.append(encode_frame(wire))
        self.server.mark_dirty(self)

    def fail(self, error: SluiceError) -> None:
        """A framing error: one error reply, then this connection closes."""
        log.info("closing connection %d from %s: %s", self.id, self.peer, error)
        self.reply_error(None, error)
        self.close_after_replies()

    def close_after_replies(self) -> None:
        self.server.flush()
        if self.transport is not None:
            self.transport.close()

    def flush(self) -> None:
        if self.outbox and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self.outbox))
        self.outbox.clear()


class BrokerServer:
    """Owns the core, the connections and the single timer."""

    def __init__(self, core: Core, limits: ServerLimits, clock: Clock = time.time) -> None:
        self.core = core
        self.limits = limits
        self.clock = clock
        self.connections: dict[int, Connection] = {}
        self.shutting_down = False
        self._ids = itertools.count(1)
        self._dirty: dict[int, Connection] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline: float | None = None
        self._listener: asyncio.Server | None = None
        self._no_connections = asyncio.Event()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            lambda: Connection(self, next(self._ids)), host, port, reuse_address=True
        )
        bound = self._listener.sockets[0].getsockname()
        return bound[0], bound[1]

    def hello_result(self, connection: Connection) -> dict[str, Any]:
        return {
            "server": "sluice",
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "connection_id": connection.id,
            "max_frame": self.limits.max_frame,
            "max_batch": MAX_BATCH,
            "max_wait": MAX_WAIT,
            "max_waits_per_connection": MAX_WAITS_PER_CONNECTION,
            "features": sorted(OPS),
        }

    # per request

    def handle(self, connection: Connection, request_id: int, op: str, args: dict[str, Any]) -> Any:
        if self.shutting_down:
            raise ShuttingDown("the broker is shutting down; reconnect to another or retry later")
        key: Hashable = (connection.id, request_id)
        if request_id in connection.waiting:
            raise BadRequest(f"request id {request_id} is already in use by a waiting reserve")
        waits_left = MAX_WAITS_PER_CONNECTION - len(connection.waiting)
        return handle(Call(self.core, self.clock(), key, waits_left), op, args)

    def mark_dirty(self, connection: Connection) -> None:
        self._dirty[connection.id] = connection

    def end_turn(self) -> None:
        """Deliver long-poll completions, write queued replies, re-arm the timer."""
        while completions := self.core.take_completions():
            for key, messages in completions:
                connection_id, request_id = cast(tuple[int, int], key)
                connection = self.connections.get(connection_id)
                if connection is None or connection.closing:
                    # Served in the same turn its connection broke: nobody will get these.
                    # Releasing may serve other waiters, hence the outer loop.
                    self.core.release(self.clock(), messages)
                    continue
                connection.waiting.discard(request_id)
                connection.reply(request_id, deliveries(messages))
        self.flush()
        self._arm_timer()

    def flush(self) -> None:
        dirty, self._dirty = self._dirty, {}
        for connection in dirty.values():
            connection.flush()

    # the one timer

    def _arm_timer(self) -> None:
        armed = self._timer_deadline if self._timer is not None else None
        if armed is not None and armed <= self.core.due_hint:
            return  # the armed timer fires early enough, and recomputes when it does
        deadline = self.core.next_deadline()
        if deadline == self._timer_deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_deadline = deadline
        if deadline is not None:
            delay = max(0.0, deadline - self.clock())
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_deadline = None
        try:
            self.core.tick(self.clock())
        except Exception:
            # A bug, but the broker must keep serving: the failing event was consumed,
            # and the timer is re-armed for the rest.
            log.exception("internal error while applying due events")
        self.end_turn()

    # connections

    def connection_opened(self, connection: Connection) -> None:
        self.connections[connection.id] = connection
        self._no_connections.clear()

    def connection_closed(self, connection: Connection) -> None:
        self.connections.pop(connection.id, None)
        self._dirty.pop(connection.id, None)
        if not self.connections:
            self._no_connections.set()
        for request_id in connection.waiting:
            self.core.cancel_wait((connection.id, request_id))
        connection.waiting.clear()

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stop accepting, answer waiting reserves with empty results, write every queued
        reply, close the connections and wait (up to ``grace``) for them to go."""
        self.shutting_down = True
        if self._listener is not None:
            self._listener.close()
        self.core.time_out_all_waits()
        self.end_turn()
        if self._timer is not None:
            self._timer.cancel()
        for connection in list(self.connections.values()):
            if connection.transport is not None:
                connection.transport.close()
        if self.connections:
            try:
                await asyncio.wait_for(self._no_connections.wait(), grace)
            except TimeoutError:
                log.warning("%d connections still open after %.1fs", len(self.connections), grace)
