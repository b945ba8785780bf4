"""The blocking client: one socket, one request at a time (thread-safe by a lock)."""

from __future__ import annotations

import itertools
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

from protocol import NEED_DATA, FrameDecoder, SluiceError, encode_frame

from . import _calls
from ._calls import UNKNOWN, Call, merge_answers, split_call
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


def _blocking(build: Callable[P, Call[T]]) -> Callable[Concatenate[Client, P], T]:
    def method(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return self.run(build(*args, **kwargs))

    as_method(method, build)
    return method


class Client:
    """Blocking Sluice client.

    The broker is ``url`` (``sluice://host:port``), or ``host`` and ``port``, or else
    the ``SLUICE_URL`` environment variable, or else sluice://127.0.0.1:7700. ``tls``:
    an ``ssl.SSLContext`` (see ``tls_context``), True (the system's CAs), False, or None
    for TLS exactly when the URL is ``sluices://``.
    ``body_key``: bodies and results sealed with AES-GCM in this client, so the broker
    stores ciphertext (a key, or a map of key id to key; see ``client._sealing``).

    Connects on first use (or ``connect()``), says hello, and reconnects on the next call
    after the connection was lost. A call that times out closes the connection, so a late
    reply can never be mistaken for another's; the broker then cancels any wait of it.

        with Client() as client:
            client.put("emails", b"hello")
    """

    def __init__(
        self,
        host: str | None = None,
        port: int | None = None,
        *,
        url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        client_name: str = "sluice-python",
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
        self._sock: socket.socket | None = None
        self._decoder = FrameDecoder(MAX_REPLY_FRAME)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._subscriptions: dict[int, Subscription] = {}  # live ones, on this socket

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Client:
        return cls(url=url, **options)

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def connect(self) -> None:
        with self._lock:
            self._ensure_connected()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        subscriptions, self._subscriptions = self._subscriptions, {}
        for subscription in subscriptions.values():
            subscription.inbox.end(ConnectionClosed("the connection to the broker closed"))

    def run(self, call: Call[T]) -> T:
        """Send one call and wait for its reply (none for a call with nothing to send)."""
        if call.known is not UNKNOWN:
            return call.known  # type: ignore[no-any-return]
        if self._sealer is not None:
            call = self._sealer.seal(call)
        with self._lock:
            if self._sock is None:
                self._ensure_connected()
            split = call.split
            if split is None or len(call.args[split.key]) <= self._limits.max_batch:
                ok, value = self._round_trip(call.op, call.args, call.wait)
            else:
                parts = split_call(call, self._limits.max_batch)
                assert parts is not None
                answers = self._round_trips(parts, call.wait)
                return merge_answers(call, parts, answers)
        return result_of(call, ok, value)

    def _ensure_connected(self) -> None:
        if self._sock is not None:
            return
        try:
            sock = self._open_socket()
        except OSError as error:
            raise BrokerUnavailable(
                f"cannot connect to {format_url(self.host, self.port, self.tls is not None)}: "
                f"{error}; is the broker running? (python -m broker)"
            ) from None
        # An SSL socket reports a kernel timeout as "want read": it keeps Python's timeouts.
        self._kernel_timeouts = self.tls is None and _set_kernel_timeouts(sock, self.timeout)
        self._sock, self._decoder = sock, FrameDecoder(MAX_REPLY_FRAME)
        try:
            hello = Call("hello", hello_args(self.client_name, self.auth_token), dict)
            ok, value = self._round_trip(hello.op, hello.args, 0)
            if not ok:
                raise value
        except SluiceError:
            self.close()
            raise
        self.server_info, self._limits = value, Limits.of(value)

    def _open_socket(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:  # the handshake within the timeout
                return self.tls.wrap_socket(sock, server_hostname=self.host)
        except OSError:
            sock.close()
            raise
        return sock

    def _round_trips(self, calls: list[Call[Any]], wait: float) -> list[tuple[bool, Any]]:
        """Send the requests of ``calls`` (the frames of one split call) in one write
        (pipelined) and read replies until each has its own: their ``(ok, result or
        error)`` in order. No reply within ``timeout + wait`` seconds is ``Timeout``."""
        first = next(self._ids)  # the requests' ids are first, first + 1, ...
        for _ in range(len(calls) - 1):
            next(self._ids)
        frames = [encode_frame([first + n, c.op, c.args]) for n, c in enumerate(calls)]
        for frame in frames:
            if len(frame) > self._limits.frame_bytes:
                raise too_large(frame, calls[0].op, self._limits)  # before anything is sent
        return self._exchange(b"".join(frames), first, len(calls), calls[0].op, wait)

    def _round_trip(self, op: str, args: dict[str, Any], wait: float) -> tuple[bool, Any]:
        """``_round_trips`` of one request, the usual case, without its lists."""
        request_id = next(self._ids)
        frame = encode_frame([request_id, op, args])
        if len(frame) > self._limits.frame_bytes:
            raise too_large(frame, op, self._limits)
        return self._exchange(frame, request_id, 1, op, wait)[0]

    def _exchange(
        self, data: bytes, first: int, count: int, op: str, wait: float
    ) -> list[tuple[bool, Any]]:
        """Send ``data`` (the frames of requests ``first`` to ``first + count - 1``) and
        read until each has its reply."""
        sock = self._sock
        assert sock is not None
        answers: list[tuple[bool, Any] | None] = [None] * count
        missing = count
        limit = self.timeout + wait
        deadline = time.monotonic() + limit if wait else None
        decoder = self._decoder
        try:
            if not self._kernel_timeouts:
                sock.settimeout(limit)
            sock.sendall(data)
            while missing:
                frame = decoder.next_frame()
                if frame is NEED_DATA:
                    received = self._receive(sock, deadline)
                    if not received:
                        self.close()
                        raise ConnectionClosed("the broker closed the connection")
                    frame = decoder.feed_and_next(received)
                    if frame is NEED_DATA:
                        continue
                if is_push(frame):
                    self._pushed(frame)
                    continue
                reply_id, ok, value = split_reply_frame(frame)
                if reply_id is None:
                    self.close()  # an unaddressed error: the broker is closing on us
                    return [answer or (ok, value) for answer in answers]
                index = reply_id - first
                if 0 <= index < count and answers[index] is None:
                    answers[index] = (ok, value)
                    missing -= 1
            return answers  # type: ignore[return-value]
        except (TimeoutError, BlockingIOError):  # BlockingIOError: a kernel timeout
            self.close()
            raise Timeout(f"{op}: no reply within {limit:.1f}s") from None
        except OSError as error:
            self.close()
            raise ConnectionClosed(f"{op}: connection to the broker failed: {error}") from None
        except SluiceError:
            # The byte stream from the broker is corrupt: this socket is of no further use,
            # and the next call connects afresh.
            self.close()
            raise

    def _read_frame(self, sock: socket.socket, deadline: float | None) -> Any:
        while (frame := self._decoder.next_frame()) is NEED_DATA:
            data = self._receive(sock, deadline)
            if not data:
                self.close()
                raise ConnectionClosed("the broker closed the connection")
            self._decoder.feed(data)
        return frame

    def _pushed(self, frame: list[Any]) -> None:
        subscription = self._subscriptions.get(frame[0])
        if subscription is not None and not subscription.inbox.feed(frame[1], frame[2]):
            del self._subscriptions[frame[0]]  # it overflowed: the broker hears of it below
            subscription.overflowed = True

    def subscribe(self, *patterns: str, from_seq: int | None = None) -> Subscription:
        """Subscribe to the channels matching ``patterns`` (``*`` one token, ``>`` the
        rest); messages published once this returns reach it, and job events on
        ``queue.<queue>.<event>`` (``JobEvent``). With ``from_seq``, the job events the
        broker still holds from that seq on come first (a ``Gap`` first if some are
        gone). Iterate it (blocking), or ``get(timeout)``; ``unsubscribe()`` ends it.
        It shares this connection: other calls go on between messages (pushes that
        arrive meanwhile are kept for it). While one thread waits for a message, another
        thread's call on this client waits for the lock, up to the client's ``timeout``
        at a time: give a thread that must not wait a client of its own. Raises
        ``Lagged`` when it fell behind."""
        with self._lock:
            self._ensure_connected()
            args: dict[str, Any] = {"patterns": list(patterns)}
            if from_seq is not None:
                args["from_seq"] = from_seq
            call = Call("subscribe", args, _reply_of_subscribe)
            request_id = self._ids_peek()
            subscription = Subscription(self, request_id)
            self._subscriptions[request_id] = subscription
            try:
                ok, value = self._round_trip(call.op, call.args, 0)
            except BaseException:
                self._subscriptions.pop(request_id, None)
                raise
            if not ok:
                self._subscriptions.pop(request_id, None)
                raise value
            subscription.next_seq = value.get("next_seq")
        return subscription

    def _ids_peek(self) -> int:
        """The id the next request will get (the counter is only read under the lock)."""
        request_id = next(self._ids)
        self._ids = itertools.count(request_id)
        return request_id

    def _next_event(self, subscription: Subscription, timeout: float | None) -> Any:
        """The subscription's next event, reading the socket for it for up to ``timeout``
        seconds (None: without end); None if none came."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while (event := subscription.inbox.take()) is None:
                if subscription.overflowed:
                    subscription.overflowed = False
                    unsubscribe = _calls.unsubscribe(subscription.id)
                    self._round_trip(unsubscribe.op, unsubscribe.args, 0)
                    continue
                sock = self._sock
                if sock is None:
                    raise ConnectionClosed("the connection to the broker closed")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                try:
                    sock.settimeout(self.timeout if left is None else min(left, self.timeout))
                    frame = self._read_frame(sock, None)
                except (TimeoutError, BlockingIOError):
                    continue  # quiet for a while: read on
                except OSError as error:
                    self.close()
                    raise ConnectionClosed(f"connection to the broker failed: {error}") from None
                finally:
                    if self._sock is not None and self._kernel_timeouts:
                        self._sock.settimeout(None)
                if is_push(frame):
                    self._pushed(frame)
        return event

    def _receive(self, sock: socket.socket, deadline: float | None) -> bytes:
        """The next bytes from the broker. With kernel timeouts, a recv gives up after
        ``timeout`` seconds (``BlockingIOError``); a call with a ``wait`` reads on until
        its own ``deadline``, the last stretch with the kernel timeout cut to what is left."""
        cut = False
        while True:
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                remaining = deadline - time.monotonic() if deadline is not None else 0.0
                if remaining <= 0:
                    raise
                if remaining < self.timeout:
                    cut = _set_kernel_timeouts(sock, remaining)
                continue
            if cut:
                _set_kernel_timeouts(sock, self.timeout)
            return data

    _kernel_timeouts = False  # True once SO_RCVTIMEO/SO_SNDTIMEO bound the socket's calls

    ping = _blocking(_calls.ping)
    put = _blocking(_calls.put)
    put_many = _blocking(_calls.put_many)
    reserve = _blocking(_calls.reserve)
    ack = _blocking(_calls.ack)
    nack = _blocking(_calls.nack)
    touch = _blocking(_calls.touch)
    bury = _blocking(_calls.bury)
    cancel = _blocking(_calls.cancel)
    status = _blocking(_calls.status)
    stats = _blocking(_calls.stats)
    queues = _blocking(_calls.queues)
    configure = _blocking(_calls.configure)
    pause = _blocking(_calls.pause)
    resume = _blocking(_calls.resume)
    purge = _blocking(_calls.purge)
    dead_letters = _blocking(_calls.dead_letters)
    peek = _blocking(_calls.peek)
    put_and_wait = _blocking(_calls.put_and_wait)
    result = _blocking(_calls.result)
    progress = _blocking(_calls.progress)
    replay = _blocking(_calls.replay)
    purge_dead = _blocking(_calls.purge_dead)
    delete_queue = _blocking(_calls.delete_queue)
    schedule = _blocking(_calls.schedule)
    unschedule = _blocking(_calls.unschedule)
    schedules = _blocking(_calls.schedules)
    trigger = _blocking(_calls.trigger)
    publish = _blocking(_calls.publish)
    unsubscribe = _blocking(_calls.unsubscribe)
    bind = _blocking(_calls.bind)
    unbind = _blocking(_calls.unbind)
    bindings = _blocking(_calls.bindings)


def _reply_of_subscribe(result: Any) -> dict[str, Any]:
    return dict(result)  # {subscription, patterns, next_seq}


class Subscription:
    """A blocking iterator of ``ChannelMessage``, ``JobEvent`` and ``Gap`` (see
    ``Client.subscribe``); a context manager that unsubscribes on exit. ``next_seq``: the
    seq of the broker's next job event when it subscribed (None from an older broker)."""

    def __init__(self, client: Client, subscription_id: int) -> None:
        self.client, self.id = client, subscription_id
        self.next_seq: int | None = None
        self.inbox = Inbox(subscription_id)
        self.overflowed = False  # ended by its own inbox; the broker still has it

    def get(self, timeout: float | None = None) -> Event | None:
        """The next message, waiting up to ``timeout`` seconds (None: without end); None
        if none came. Raises ``StopIteration`` once unsubscribed, ``Lagged`` if it fell
        behind, ``ConnectionClosed`` if the connection went."""
        return self.client._next_event(self, timeout)  # type: ignore[no-any-return]

    def __iter__(self) -> Subscription:
        return self

    def __next__(self) -> Event:
        event = self.get(None)
        assert event is not None
        return event

    def unsubscribe(self) -> None:
        """End it: iteration stops; messages not yet taken are dropped."""
        if self.inbox.ended and not self.overflowed:
            return
        self.inbox.end(None)
        self.inbox.events.clear()
        self.overflowed = False
        self.client._subscriptions.pop(self.id, None)
        if self.client._sock is not None:
            self.client.unsubscribe(self.id)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.unsubscribe()


def _set_kernel_timeouts(sock: socket.socket, seconds: float) -> bool:
    """Make ``sock`` blocking, with the kernel bounding each send and recv to ``seconds``
    (SO_SNDTIMEO, SO_RCVTIMEO; a call that runs out fails with ``BlockingIOError``). A
    Python socket timeout instead polls before every send and recv: twice the system
    calls. False, and ``sock`` left as it was, where the platform refuses."""
    if not seconds > 0:
        return False
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
    except OSError:
        return False
    sock.settimeout(None)
    return True
