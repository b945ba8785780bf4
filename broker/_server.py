"""The asyncio side: one ``asyncio.Protocol`` per connection, one timer for the broker,
and the group commit that makes replies wait for the store.

A loop turn goes: bytes arrive -> frames -> requests handled against the core -> replies
queued on their connections -> ``end_turn`` collects long-poll completions, then either
writes every queued reply (one write per connection) or holds them, and re-arms the single
timer at the core's next deadline.

Group commit (with a store): at the end of a turn the core's changes since the last commit
are one batch, appended to the log as one record and synced: on the loop itself, so that
what arrives during the sync is read in the next turn and shares the next batch; or, when
the broker is busy (``_busy``) and the kernel has native AIO (``_aio``), in the kernel's
background while the loop serves on, one batch in flight, its completion read from an
eventfd (``_on_synced``) and acted on as an on-loop commit is. (A writer thread measured
slower here: the hand-off and the GIL cost more than the loop is blocked; the LMDB
checkpoints do run on a thread of the store's.) Batches are numbered. Each reply carries
the number of the batch it needs to be durable before it goes out (``need``):

- a reply that confirms something (put, ack, nack, bury, cancel, touch, progress,
  configure, admin, results) may depend on any change made so far: it needs the batch
  being gathered if the core has uncommitted changes, else the last one encoded;
- a reserve's reply promises nothing durable, but a message is never delivered before the
  commit that holds its put, nor with a lease token above the durable ceiling: it needs
  the latest of those (usually none);
- reads, pings, hello and errors of ops that changed nothing need none.

A reply whose batch is durable goes out at the end of the turn; the others are held until
their batch commits, a connection's in the order they were queued (a held reply needs at
least what that connection's held replies before it need). A connection's close waits
for all its replies. Job events go out once the batch holding their changes is durable.

Fairness: one connection's requests are answered at most ``MAX_FRAMES_PER_TURN`` in one
go, and a connection with ``MAX_UNCONFIRMED`` replies held is not read until they go
out, so one client pipelining without end adds a bounded amount to any batch and turn.

Memory: a connection whose unwritten reply bytes (queued this turn, held for a commit, and
in the transport's buffer) reach ``MAX_BEHIND`` is not read, nor are its buffered frames
answered, until they are down to half: a client that pipelines requests with large
replies (peek, stats, big reserves) and reads none makes the broker hold at most about
``MAX_BEHIND`` plus one reply for it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import ssl
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Final, cast

from protocol import (
    MAX_WAIT,
    NEED_DATA,
    OPS,
    PROTOCOL_VERSION,
    BadFrame,
    BadRequest,
    Forbidden,
    FrameDecoder,
    InternalError,
    ShuttingDown,
    SluiceError,
    TooLarge,
    Unauthorized,
    UnsupportedVersion,
    encode_frame,
    request_id_of,
    require_string_keys,
    shown,
    split_request,
)

from . import __version__
from ._aio import Aio, open_aio
from ._args import MAX_BATCH, MAX_WAITS_PER_CONNECTION
from ._audit import ADMIN_OPS, NOBODY, refused, run_admin
from ._auth import Authority, Principal, authorize, token_digest, visible
from ._channels import Channels, Sink
from ._core import Completion, Core
from ._feed import EventFeed
from ._gate import DEFAULT_HELLO_TIMEOUT, DEFAULT_MAX_CONNECTIONS, Gate
from ._handlers import PENDING, READ_ONLY_OPS, Call, deliveries, handle
from ._logging import event
from ._message import NOT_STORED, Message
from ._metrics import INVALID, OK, ServerMetrics, outcome_of
from ._store import Batch, Store

log = logging.getLogger("sluice.server")

Clock = Callable[[], float]
Frames = list[bytes | None]  # queued replies; None: close the connection after them

_CLOSE: Final = None
# Background syncs ("auto") from this many replies waiting for commits (see `_busy`).
_BUSY_HELD: Final = 4
_RETRY_COMMIT_AFTER: Final = 1.0
# Seconds between checks for a checkpoint that came due while no commit ran.
_CHECKPOINT_TICK: Final = 0.5
_SLOW_COMMIT: Final = 0.2  # seconds: a commit slower than this is logged
MAX_UNCONFIRMED: Final = 1024  # replies one connection may have waiting for a commit
MAX_FRAMES_PER_TURN: Final = 32  # requests of one connection answered in one go
MAX_BEHIND: Final = 8 * 1024 * 1024  # unwritten reply bytes at which a connection waits


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerLimits:
    max_frame: int
    auth_token: str | None = None
    fsync_interval: float = 0.1  # seconds between syncs in fsync "interval" mode
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    hello_timeout: float = DEFAULT_HELLO_TIMEOUT  # seconds a connection has to say hello
    # Seconds job events are still recorded after the last subscription to them ended
    # (None: always recorded; see _feed).
    event_linger: float | None = None
    # With fsync "always": "on", sync the log in the kernel's background (native AIO,
    # where the system has it), the loop serving on meanwhile; "off", sync on the loop;
    # "auto", in the background only when the loop is busy (`BrokerServer._busy`).
    background_sync: str = "auto"


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
        self.outbox: Frames = []  # replies to write at the end of this turn
        self.pushed = 0  # bytes of pushed frames (subscriptions') in the outbox
        self.held: Frames = []  # replies of this turn that wait for batch `held_need`
        self.held_need = 0
        self.last_need = 0  # the latest batch any reply queued so far needs
        self.held_upto = 0  # the latest batch its replies in the server's held queue need
        self.unconfirmed = 0  # replies handed to the server's held queue, not yet written
        self.queued = 0  # bytes of replies queued, held or unconfirmed: not yet written
        self.write_paused = False
        self.read_paused = False  # replies unconfirmed or unwritten: reading waits for them
        self.turn_paused = False  # frames wait for the next turn
        self.eof = False  # the peer sends nothing more
        self.reading = True
        self.close_requested = False
        self.waiting: set[int] = set()  # request ids of this connection's long-polls
        self.requests = 0  # requests answered (or waiting), for the close log line
        self.consumer = False  # has sent a reserve (metrics: sluice_consumer_connections)
        self.delivered = 0  # messages handed out over this connection
        self.opened_at = server.clock()
        self.principal: Principal | None = None  # None: nothing to check (see _auth)
        self.token_digest = ""

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.peer = _peer_name(transport.get_extra_info("peername"))
        self.server.connection_opened(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.decoder.feed(data)
        except (BadFrame, TooLarge) as error:
            self.fail(error)
        self.read_frames()

    def read_frames(self) -> None:
        """Answer the complete frames buffered so far: at most ``MAX_FRAMES_PER_TURN`` in
        one go (the rest in a later turn, so one connection cannot hold the loop), and
        none while ``MAX_UNCONFIRMED`` replies wait for a commit or ``MAX_BEHIND`` bytes
        of replies are unwritten (reading waits for them to be written). The socket is
        not read while frames wait here."""
        self.turn_paused = False
        budget = MAX_FRAMES_PER_TURN
        next_frame = self.decoder.next_frame
        try:
            while not self.closing:
                held_back = self.unconfirmed + len(self.held) >= MAX_UNCONFIRMED
                behind = self.queued >= MAX_BEHIND or (
                    self.write_paused and self._behind_by(MAX_BEHIND)
                )
                if held_back or behind:
                    self.read_paused = True
                    break
                if budget == 0:
                    self.turn_paused = True
                    self.server.loop.call_soon(self.read_frames)
                    break
                frame = next_frame()
                if frame is NEED_DATA:
                    if self.eof:  # everything the peer sent is answered (or waiting)
                        self.server.cancel_waits(self)
                        self.close_after_replies()
                    break
                self._on_frame(frame)
                budget -= 1
        except (BadFrame, TooLarge) as error:
            self.fail(error)
        if not self.reading or self.turn_paused or self.read_paused or self.close_requested:
            self._update_reading()  # (reading, and nothing to pause it: nothing to change)
        self.server.turn_ends_soon()

    def confirmed(self, frames: int) -> None:
        """``frames`` held replies were written: read on if reading waited for them."""
        self.unconfirmed -= frames
        self._read_on_if_drained()

    def _behind_by(self, limit: int) -> bool:
        """True if ``limit`` bytes of replies or more are not written to the socket yet.
        (The transport's buffer is asked only once it is over its high-water mark.)"""
        if self.queued >= limit:
            return True
        transport = self.transport
        return (
            self.write_paused
            and transport is not None
            and self.queued + transport.get_write_buffer_size() >= limit
        )

    def _read_on_if_drained(self) -> None:
        """Reading waited for replies to go out: read on once they are down to half."""
        if (
            self.read_paused
            and self.unconfirmed < MAX_UNCONFIRMED // 2
            and not self._behind_by(MAX_BEHIND // 2)
        ):
            self.read_paused = False
            self.read_frames()

    def _update_reading(self) -> None:
        """Read the socket unless the peer is not reading its replies, replies wait for a
        commit, frames wait for a turn, or the connection is closing."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        wanted = not (self.write_paused or self.read_paused or self.turn_paused or self.closing)
        if wanted != self.reading:
            self.reading = wanted
            if wanted:
                transport.resume_reading()
            else:
                transport.pause_reading()

    @property
    def closing(self) -> bool:
        """True once this connection is being closed: read no more requests from it."""
        return self.close_requested or self.transport is None or self.transport.is_closing()

    def eof_received(self) -> bool:
        """The peer sends nothing more but may still read: answer everything it sent
        (frames still buffered too), then close once the replies are written. Its
        long-polls end then, as if it had gone."""
        self.eof = True
        self.read_frames()
        return True  # keep the transport open for the replies

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connection_closed(self)

    def pause_writing(self) -> None:
        # The peer is not reading its replies: stop reading its requests until it does.
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._update_reading()
        self._read_on_if_drained()
        if self.server.feed.replaying:  # a replay of job events may go on now
            self.server.turn_ends_soon()

    # requests

    def _on_frame(self, frame: Any) -> None:
        started = time.perf_counter()
        op, outcome = self._answer(frame)
        self.server.metrics.request_done(op, outcome, time.perf_counter() - started)
        self.requests += 1
        if op == "reserve":
            self.consumer = True

    def _answer(self, frame: Any) -> tuple[str, str]:
        """Handle one request and queue its reply (a long-poll's comes later). Returns its
        op and outcome ("ok" or the error code) for the metrics."""
        try:
            request_id, op, args = split_request(frame)
        except SluiceError as error:
            self.reply_error(request_id_of(frame), error)
            return INVALID, outcome_of(error)
        need = 0
        try:
            result: Any
            if self.greeted and op != "hello":
                result, need = self.server.handle(self, request_id, op, args)
            elif op == "hello":
                result = self._hello(args)
            else:
                raise BadRequest('send hello first: [id, "hello", {"version": 1}]')
        except SluiceError as error:
            self.reply_error(request_id, error, self.server.need_of_error(error))
            if isinstance(error, UnsupportedVersion | Unauthorized):
                self.close_after_replies()
            return op, outcome_of(error)
        except Exception:
            log.exception(
                "internal error on %s %s",
                op,
                shown(args),
                extra=event("internal_error", op=op, connection_id=self.id),
            )
            self.reply_error(request_id, InternalError(f"internal error in {op}"))
            return op, "INTERNAL"
        if result is PENDING:
            self.waiting.add(request_id)
        else:
            self.reply(request_id, result, need)
        return op, OK

    def _hello(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.greeted:
            raise BadRequest("hello was already sent on this connection")
        require_string_keys(args)
        version = args.get("version")
        if type(version) is not int or version != PROTOCOL_VERSION:
            raise UnsupportedVersion(
                f"protocol version {shown(version)} is not supported; this broker speaks "
                f"version {PROTOCOL_VERSION}"
            )
        token = args.get("token")
        self.principal = self.server.authority.authenticate(token)
        if self.principal is not None:
            self.token_digest = token_digest(str(token))
        name = args.get("client")
        self.client_name = name[:200] if isinstance(name, str) else "?"
        self.greeted = True
        self.server.gate.greeted(self)
        log.debug(
            "connection %d from %s is %s",
            self.id,
            self.peer,
            self.client_name,
            extra=event("hello", connection_id=self.id, peer=self.peer, client=self.client_name),
        )
        return self.server.hello_result(self)

    # replies

    def reply(self, request_id: int | None, result: Any, need: int = 0) -> None:
        """Queue a reply that may go out once batch ``need`` is durable (0: at once)."""
        self._queue(encode_frame([request_id, True, result]), need)

    def reply_error(self, request_id: int | None, error: SluiceError, need: int = 0) -> None:
        self._queue(encode_frame([request_id, False, error.to_wire()]), need)

    def _queue(self, frame: bytes | None, need: int) -> None:
        if frame is not None:
            self.queued += len(frame)
        if need and need > self.server.durable:  # (0: nothing to wait for, in any mode)
            self.held.append(frame)
            if need > self.held_need:
                self.held_need = need
        else:
            self.outbox.append(frame)
        if need > self.last_need:
            self.last_need = need
        self.server.mark_dirty(self)

    def push(self, frame: bytes, limit: int | None) -> bool:
        """Queue a frame nobody asked for (a subscription's) for the end of this turn,
        unless the peer would then be behind by more than ``limit`` bytes (None: no
        limit; a larger frame goes only to a peer behind by nothing); False if it was
        not queued."""
        transport = self.transport
        if transport is None or self.closing:
            return False
        behind = transport.get_write_buffer_size() + self.pushed
        if limit is not None and behind and behind + len(frame) > limit:
            return False
        self.pushed += len(frame)
        self.queued += len(frame)
        self.outbox.append(frame)
        self.server.mark_dirty(self)
        return True

    def fail(self, error: SluiceError) -> None:
        """A framing error: one error reply, then this connection closes."""
        log.info(
            "closing connection %d from %s: %s",
            self.id,
            self.peer,
            error,
            extra=event("bad_frame", connection_id=self.id, peer=self.peer, error=str(error)),
        )
        self.reply_error(None, error, self.last_need)  # the last word, after every reply
        self.close_after_replies()

    def close_after_replies(self) -> None:
        """Read nothing more; close once the replies queued so far are written."""
        if not self.close_requested:
            self.close_requested = True
            self._queue(_CLOSE, self.last_need)  # after every reply queued before it
            self._update_reading()

    def take_outbox(self) -> Frames:
        frames, self.outbox = self.outbox, []
        self.pushed = 0
        return frames

    def take_held(self) -> tuple[int, Frames]:
        frames, self.held = self.held, []
        need, self.held_need = self.held_need, 0
        return need, frames

    def write(self, frames: Frames) -> None:
        """Send ``frames`` in one write; a ``_CLOSE`` among them closes the transport."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if _CLOSE in frames:
            data = b"".join(frame for frame in frames if frame is not None)
            transport.write(data)
            transport.close()
        else:
            # (No None among them, as just checked; a typing.cast costs ~130 ns a call.)
            data = b"".join(frames)  # type: ignore[arg-type]
            transport.write(data)
        self.queued -= len(data)
        if self.read_paused:
            self._read_on_if_drained()


class BrokerServer:
    """Owns the core, the connections, the single timer and (if durable) the store."""

    def __init__(
        self,
        core: Core,
        limits: ServerLimits,
        clock: Clock = time.time,
        store: Store | None = None,
        authority: Authority | None = None,
    ) -> None:
        self.core = core
        self.limits = limits
        self.authority = authority or Authority(limits.auth_token)
        self.gate = Gate(limits.max_connections, limits.hello_timeout, self._drop)
        self.clock = clock
        self.store = store
        self.channels = Channels()
        self.feed = EventFeed(core.events, self.channels, limits.event_linger)
        # Group commit: batches are numbered 1, 2, ... by the store; replies wait in `_held`
        # for the batch number they need. `_stalled`: a batch failed and waits to be tried
        # again; nothing after it may commit first.
        self._stalled = False
        # `_held` is a heap of (need, order, connection, frames): with a sync in the
        # background, one connection may need batch N+1 before another needs N.
        self._held: list[tuple[int, int, Connection, Frames]] = []
        self._held_order = itertools.count()
        self._commit_event = asyncio.Event()
        # A batch whose sync runs in the background (with `_aio`): the batch, when its
        # commit started, and the last event seq made before it was encoded. One at most.
        self._aio: Aio | None = None
        self._syncing: tuple[Batch, float, int] | None = None
        self._events_durable = 0  # the last event seq whose changes are all durable
        self._always_background = limits.background_sync == "on"
        self._sync_timer: asyncio.TimerHandle | None = None
        self._checkpoint_timer: asyncio.TimerHandle | None = None
        self._checkpoint_start_failing = False
        self._turn_scheduled = False
        self.connections: dict[int, Connection] = {}
        self.shutting_down = False
        self._ids = itertools.count(1)
        self._dirty: dict[int, Connection] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline: float | None = None
        self._listener: asyncio.Server | None = None
        self._no_connections = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.metrics = ServerMetrics()
        # Answers of views without a connection waiting for a batch: (need, seq, future).
        self._durable_waits: list[tuple[int, int, asyncio.Future[None]]] = []
        self._local_ids = itertools.count(1)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop this server runs on. Kept: ``asyncio.get_running_loop()`` costs a
        getpid system call each time (its check against a fork)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def start(
        self, host: str, port: int, tls: ssl.SSLContext | None = None
    ) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            lambda: Connection(self, next(self._ids)),
            host,
            port,
            reuse_address=True,
            ssl=tls,
            # A TLS connection says hello only after its handshake: both within the timeout.
            ssl_handshake_timeout=self.limits.hello_timeout if tls is not None else None,
        )
        bound = self._listener.sockets[0].getsockname()
        # Arm the timer (schedules fire with nobody connected) and commit what recovery
        # changed (leases that expired, slots that fired while the broker was down).
        loop.call_soon(self.end_turn)
        background = self.limits.background_sync
        if self.store is not None and self.store.fsync == "always" and background != "off":
            self._aio = open_aio()
            if self._aio is not None:
                loop.add_reader(self._aio.eventfd, self._on_synced)
            elif background == "on":
                log.warning(
                    "--background-sync on: this system has no native AIO, so every sync "
                    "is on the broker's thread",
                    extra=event("background_sync_unavailable"),
                )
        if self.store is not None and self.store.fsync == "interval":
            self._sync_timer = loop.call_later(self.limits.fsync_interval, self._sync)
        if self.store is not None:
            self._checkpoint_timer = loop.call_later(_CHECKPOINT_TICK, self._checkpoint_tick)
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

    def handle(
        self, connection: Connection, request_id: int, op: str, args: dict[str, Any]
    ) -> tuple[Any, int]:
        """Run one request of a connection; returns its result and the batch its reply
        needs."""
        if request_id in connection.waiting and not self.shutting_down:
            raise BadRequest(f"request id {request_id} is already in use by a waiting reserve")
        waits_left = MAX_WAITS_PER_CONNECTION - len(connection.waiting)
        key = (connection.id, request_id)
        result, need, delivered = self.run(
            op, args, key, waits_left, connection, principal=connection.principal
        )
        if delivered:
            connection.delivered += delivered
        return result, need

    def run(
        self,
        op: str,
        args: dict[str, Any],
        waiter_key: Hashable,
        waits_left: int,
        sink: Sink | None = None,
        principal: Principal | None = None,
        peer: str | None = None,
    ) -> tuple[Any, int, int]:
        """Run one op against the core: the one path of every view (wire, HTTP API).
        Returns its result, the batch its answer needs before it goes out (see the module
        docstring), and how many messages it delivered. Raises the op's ``SluiceError``
        (``FORBIDDEN``, changing nothing, if ``principal`` may not run it; None: no checks).
        Admin ops and refusals are audited (see ``_audit``) as from ``peer`` (None: the
        sink's, a connection's)."""
        if self.shutting_down:
            raise ShuttingDown("the broker is shutting down; reconnect to another or retry later")
        if principal is not None:
            try:
                authorize(principal, self.core, op, args)
            except SluiceError as error:
                if isinstance(error, Forbidden) or op in ADMIN_OPS:
                    refused(op, args, principal.name, self._peer(sink, peer), error)
                raise
        call = Call(
            self.core,
            self.clock(),
            waiter_key,
            waits_left,
            self.store,
            None,
            self.channels,
            sink,
            feed=self.feed,
        )
        if op in ADMIN_OPS:
            who = self._principal_name(principal)
            result = run_admin(handle, call, op, args, who, self._peer(sink, peer))
        else:
            result = handle(call, op, args)
        if principal is not None:
            result = visible(principal, op, result)
        delivered = 0 if call.delivered is None else len(call.delivered)
        if self.store is None:
            return result, 0, delivered
        if call.delivered is not None:
            return result, self.delivery_need(call.delivered), delivered
        read_only = op in READ_ONLY_OPS and not call.stored
        return result, 0 if read_only else self.pending_batch(), delivered

    def _principal_name(self, principal: Principal | None) -> str:
        """Who the audit log names: a principal, else the all-rights token's (None with
        a token required) or nobody (nothing checked)."""
        if principal is not None:
            return principal.name
        return Authority.ALL.name if self.authority.required else NOBODY

    @staticmethod
    def _peer(sink: Sink | None, peer: str | None) -> str:
        return peer if peer is not None else str(getattr(sink, "peer", "?"))

    async def run_confirmed(
        self,
        op: str,
        args: dict[str, Any],
        principal: Principal | None = None,
        peer: str = "http",
    ) -> Any:
        """Run an op for a view without a connection (the HTTP API) and return its result
        once the batch it needs is durable: an answer promises what a wire reply to the
        same request would. Never long-polls (no waits are allowed). ``peer``: who sent
        it, for the audit log."""
        result, need, _ = self.run(
            op, args, ("local", next(self._local_ids)), 0, principal=principal, peer=peer
        )
        self.turn_ends_soon()  # commit, serve waiters and re-arm the timer as a turn does
        if need > self.durable:
            done = self.loop.create_future()
            heapq.heappush(self._durable_waits, (need, next(self._local_ids), done))
            await done
        return result

    def _wake_durable_waits(self) -> None:
        durable = self.durable
        waits = self._durable_waits
        while waits and waits[0][0] <= durable:
            done = heapq.heappop(waits)[2]
            if not done.done():  # (cancelled when its HTTP client went away)
                done.set_result(None)

    @property
    def durable(self) -> int:
        """The last batch known durable (always 0 in memory, where nothing waits)."""
        return 0 if self.store is None else self.store.durable

    def pending_batch(self) -> int:
        """The batch that will hold every change made so far."""
        if self.store is None:
            return 0
        return self.store.encoded + 1 if self.core.has_changes else self.store.encoded

    def delivery_need(self, messages: list[Message]) -> int:
        """The batch a delivery of ``messages`` needs: each one's put durable, and its
        lease token under the durable token ceiling."""
        if self.store is None:
            return 0
        need, ceiling = 0, self.store.durable_token_ceiling
        for message in messages:
            stored = message.stored
            if stored == NOT_STORED or (message.lease_token or 0) >= ceiling:
                return self.pending_batch()
            need = max(need, stored)
        return need

    def need_of_error(self, error: SluiceError) -> int:
        """A failed request changed nothing, except a batch ack or nack that settled some
        of its items before one failed."""
        return self.pending_batch() if error.details.get("done") else 0

    def mark_dirty(self, connection: Connection) -> None:
        self._dirty[connection.id] = connection

    def turn_ends_soon(self) -> None:
        """Run ``end_turn`` once this loop iteration has read from every connection that
        had data, so that their changes share one commit and their replies one pass."""
        if self.store is None:
            self.end_turn()  # nothing to group: answer now, one hop sooner
        elif not self._turn_scheduled:
            self._turn_scheduled = True
            self.loop.call_soon(self.end_turn)

    def end_turn(self) -> None:
        """Write (or hold) the replies to this turn's requests, then deliver long-poll
        completions and write (or hold) theirs, start a commit if none is running, re-arm
        the timer. The first replies go out before the completions are encoded: a put
        that a waiting reserve took is confirmed one delivery's encoding sooner (1 x 8 in
        memory, ten alternated pairs: median 4,191 jobs/s against 3,915)."""
        self._turn_scheduled = False
        completions = self.core.take_completions()
        if completions and self._dirty:
            self._flush_first(completions)
        while completions:
            for key, answer in completions:
                waiter: tuple[int, int] = key  # type: ignore[assignment]  # (made by handle)
                connection_id, request_id = waiter
                connection = self.connections.get(connection_id)
                if isinstance(answer, dict):  # the outcome a result wait was waiting for
                    if connection is not None:
                        connection.waiting.discard(request_id)
                        connection.reply(request_id, answer, self.pending_batch())
                    continue
                if connection is None or connection.closing:
                    # Served in the same turn its connection broke: nobody will get these.
                    # Releasing may serve other waiters, hence the outer loop.
                    self.core.release(self.clock(), answer)
                    continue
                connection.waiting.discard(request_id)
                connection.delivered += len(answer)
                connection.reply(request_id, deliveries(answer), self.delivery_need(answer))
            completions = self.core.take_completions()
        self.flush()
        if self.store is not None:
            self._start_commit()
        self._publish_events()
        self._arm_timer()

    def _publish_events(self) -> None:
        """Hand job events to subscribers once their commit is done (held while commits
        fail), and replay on to those catching up."""
        feed = self.feed
        if not self._stalled:
            feed.publish(self.clock(), self._events_publishable())
        if feed.replaying and feed.go_on() and not self._turn_scheduled:
            # Some peer took all it was given: give it more in a turn of its own.
            self._turn_scheduled = True
            self.loop.call_soon(self.end_turn)
        if self._dirty:
            self.flush()

    def _flush_first(self, completions: list[Completion]) -> None:
        """``flush`` the connections that none of ``completions`` answers; the others
        keep their replies for one write with their completions'."""
        answered = {key[0] for key, _ in completions}  # type: ignore[index]  # (see handle)
        dirty = self._dirty
        first = [connection for number, connection in dirty.items() if number not in answered]
        for connection in first:
            del dirty[connection.id]
        self._write_or_hold(first)

    def flush(self) -> None:
        """Write every queued reply whose batch is durable; hold the others."""
        dirty, self._dirty = self._dirty, {}
        self._write_or_hold(dirty.values())

    def _write_or_hold(self, connections: Iterable[Connection]) -> None:
        durable = self.durable
        for connection in connections:
            if connection.outbox:
                connection.write(connection.take_outbox())
            if connection.held:
                need, frames = connection.take_held()
                # Behind its replies held before (a connection's replies that wait keep
                # their order), even if these need an earlier batch.
                need = max(need, connection.held_upto)
                if need <= durable:  # committed since they were queued
                    connection.write(frames)
                    connection.confirmed(0)
                else:
                    connection.unconfirmed += len(frames)
                    connection.held_upto = need
                    entry = (need, next(self._held_order), connection, frames)
                    heapq.heappush(self._held, entry)

    # group commit

    def _events_publishable(self) -> int | None:
        """The last event seq subscribers may hear of: all (None) once every change is
        durable, else those made before the last durable batch was encoded. (In memory
        nothing waits: the core tracks no changes.)"""
        if self.store is None or (self._syncing is None and not self.core.has_changes):
            return None
        return self._events_durable

    def _start_commit(self) -> None:
        if (
            self._stalled
            or self._syncing is not None
            or self.store is None
            or not self.core.has_changes
        ):
            return
        events = self.core.events.next_seq - 1  # (before encoding: the batch holds them)
        self._commit(self.store.encode(self.core.take_changes()), events)

    def _commit(self, batch: Batch, events: int) -> None:
        """Append ``batch`` and sync it: on the loop, or in the background with ``_aio``
        (``_on_synced`` goes on from there)."""
        assert self.store is not None
        self._stalled = False
        started = time.perf_counter()
        try:
            to_sync = self.store.append(batch)
            if to_sync is not None:
                if self._aio is not None and self._busy():
                    self._aio.submit(to_sync, batch.number)
                    self._syncing = (batch, started, events)
                    return
                os.fdatasync(to_sync)
            self.store.appended(batch)
        except Exception as error:
            self._committed_or_failed(error, time.perf_counter() - started, batch, events)
        else:
            self._committed_or_failed(None, time.perf_counter() - started, batch, events)

    def _busy(self) -> bool:
        """Whether requests are likely to arrive while a batch syncs: then the loop serves
        them meanwhile (a background sync), else it waits in the sync, which comes back
        sooner (by about 40 us here: the kernel worker's and the eventfd's wake-ups). Many
        replies waiting for commits is a busy broker; a few (one producer and its workers,
        each waiting for the last one's commit) is a chain of requests that nothing can
        overlap. Measured: 32 x 32 +11%, one producer and 8 workers slower when every
        sync is in the background."""
        return self._always_background or len(self._held) >= _BUSY_HELD

    def _on_synced(self) -> None:
        """The background sync finished (the AIO eventfd is readable)."""
        assert self._aio is not None and self.store is not None
        done = self._aio.reap()
        if not done or self._syncing is None:
            return
        batch, started, events = self._syncing
        self._syncing = None
        result = done[-1][1]  # one sync in flight at a time
        error: Exception | None = None
        if result != 0:
            error = OSError(-result, os.strerror(-result))
        if error is None:
            try:
                self.store.appended(batch)
            except Exception as failure:
                error = failure
        self._committed_or_failed(error, time.perf_counter() - started, batch, events)
        self._publish_events()

    def _committed_or_failed(
        self, error: Exception | None, seconds: float, batch: Batch, events: int
    ) -> None:
        assert self.store is not None
        if error is not None:
            # Nothing in this batch is confirmed to anyone yet: keep its replies held and
            # try again. A broker that cannot write stalls; it never answers "done" falsely.
            self.metrics.commit_failed(error)
            failures = self.metrics.failing_commits
            if failures == 1 or failures % 60 == 0:
                log.error(
                    "commit failed (%d times so far), retrying: %s",
                    failures,
                    error,
                    extra=event("commit_failed", failures=failures, error=str(error)),
                )
            self._stalled = True
            self.loop.call_later(_RETRY_COMMIT_AFTER, self._retry_commit, batch, events)
            return
        if failures := self.metrics.failing_commits:  # commit_done (below) resets it
            log.warning(
                "commit succeeded again after %d failures",
                failures,
                extra=event("commit_recovered", failures=failures),
            )
        self._note_commit(len(batch), seconds)
        self.store.committed(batch)
        self._events_durable = events
        durable = batch.number
        held = self._held
        while held and held[0][0] <= durable:
            _, _, connection, frames = heapq.heappop(held)
            connection.write(frames)
            connection.confirmed(len(frames))
        self._wake_durable_waits()
        self._commit_event.set()
        self._start_commit()

    def _retry_commit(self, batch: Batch, events: int) -> None:
        self._commit(batch, events)
        self._publish_events()  # (held while the commit failed)

    def _note_commit(self, records: int, seconds: float) -> None:
        self.metrics.commit_done(records, seconds)
        if seconds > _SLOW_COMMIT:
            log.warning(
                "slow commit: %d records took %.3f s",
                records,
                seconds,
                extra=event("slow_commit", records=records, seconds=round(seconds, 6)),
            )

    def _sync(self) -> None:
        """fsync=interval: flush what was committed to disk, then schedule the next sync."""
        assert self.store is not None
        try:
            self.store.sync()
        except OSError as failure:
            log.error(
                "periodic sync failed: %s", failure, extra=event("sync_failed", error=str(failure))
            )
        if self._sync_timer is not None:
            loop = asyncio.get_running_loop()
            self._sync_timer = loop.call_later(self.limits.fsync_interval, self._sync)

    def _checkpoint_tick(self) -> None:
        """Start a checkpoint that came due while no commit ran. A commit starts one when
        due; what was committed while the last one ran would otherwise wait, only in the
        log, for the next commit (an idle broker's log is then neither checkpointed nor
        recycled). Not while a sync is in flight: starting one may close the segment."""
        assert self.store is not None
        self._checkpoint_timer = self.loop.call_later(_CHECKPOINT_TICK, self._checkpoint_tick)
        if self._syncing is None and not self._stalled:
            try:
                self.store.checkpoint_if_due()
            except OSError as error:  # the next segment could not be opened: try again
                if not self._checkpoint_start_failing:  # (once a streak, not every tick)
                    log.warning(
                        "could not start a checkpoint, retrying: %s",
                        error,
                        extra=event("checkpoint_start_failed", error=str(error)),
                    )
                self._checkpoint_start_failing = True
            else:
                self._checkpoint_start_failing = False

    async def _drain(self) -> None:
        """Wait until every change is committed and every held reply written."""
        while self.store is not None and (
            self._stalled or self._syncing is not None or self.core.has_changes or self._held
        ):
            self._commit_event.clear()
            self._start_commit()
            await self._commit_event.wait()

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
            self._timer = self.loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_deadline = None
        try:
            self.core.tick(self.clock())
        except Exception:
            # A bug, but the broker must keep serving: the failing event was consumed,
            # and the timer is re-armed for the rest.
            log.exception("internal error while applying due events", extra=event("internal_error"))
        self.end_turn()

    # connections

    def connection_opened(self, connection: Connection) -> None:
        if not self.gate.admit(connection, len(self.connections), self.loop):
            return
        self.connections[connection.id] = connection
        self._no_connections.clear()
        self.metrics.connections_opened += 1
        log.debug(
            "connection %d opened from %s",
            connection.id,
            connection.peer,
            extra=event("connection_opened", connection_id=connection.id, peer=connection.peer),
        )

    def _drop(self, connection: Connection, error: SluiceError) -> None:
        """A connection the gate refuses or times out: one error frame, then the close."""
        connection.fail(error)
        self.turn_ends_soon()

    def connection_closed(self, connection: Connection) -> None:
        self.connections.pop(connection.id, None)
        self.gate.forget(connection)
        self._dirty.pop(connection.id, None)
        log_closed(connection)
        if not self.connections:
            self._no_connections.set()
        self.cancel_waits(connection)
        self.channels.drop_owner(connection.id)

    def cancel_waits(self, connection: Connection) -> None:
        for request_id in connection.waiting:
            self.core.cancel_wait((connection.id, request_id))
        connection.waiting.clear()

    def reload_auth(self) -> None:
        """Read the auth file again (SIGHUP); if it is good, every connection's token
        names its principal anew (a token gone from the file keeps no rights)."""
        if self.authority.reload():
            for connection in self.connections.values():
                principal = connection.principal
                if principal is not None and not principal.from_token:
                    connection.principal = self.authority.rebound(connection.token_digest)

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stop accepting, answer waiting reserves with empty results, write every queued
        reply, close the connections and wait (up to ``grace``) for them to go."""
        self.shutting_down = True
        if self._listener is not None:
            self._listener.close()
        self.gate.close()
        if self._timer is not None:
            self._timer.cancel()
        self.core.time_out_all_waits()
        self.end_turn()
        if self._timer is not None:
            self._timer.cancel()  # end_turn re-armed it
            self._timer = None
        await self._drain()
        if self._aio is not None:
            self.loop.remove_reader(self._aio.eventfd)
            self._aio.close()
            self._aio = None
        for timer in (self._sync_timer, self._checkpoint_timer):
            if timer is not None:
                timer.cancel()
        self._sync_timer = self._checkpoint_timer = None
        for connection in list(self.connections.values()):
            if connection.transport is not None:
                connection.transport.close()
        if self.connections:
            try:
                await asyncio.wait_for(self._no_connections.wait(), grace)
            except TimeoutError:
                still_open = len(self.connections)
                log.warning(
                    "%d connections still open after %.1fs",
                    still_open,
                    grace,
                    extra=event("connections_left_open", connections=still_open),
                )


def _peer_name(address: Any) -> str:
    """``host:port`` of a peer's socket address (``[host]:port`` for IPv6)."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


def log_closed(connection: Connection) -> None:
    log.info(
        "connection %d from %s (%s) closed after %d requests",
        connection.id,
        connection.peer,
        connection.client_name,
        connection.requests,
        extra=event(
            "connection_closed",
            connection_id=connection.id,
            peer=connection.peer,
            client=connection.client_name,
            requests=connection.requests,
        ),
    )
