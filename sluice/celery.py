"""A kombu transport on Sluice, so that a Celery app can use the broker as it is.

    import sluice.celery  # registers the sluice:// scheme with kombu

    app = Celery("tasks", broker="sluice://127.0.0.1:7700")  # a token: sluice://:TOKEN@...

``sluices://`` is the same over TLS, verified against the system's CAs, or against your
own: ``Celery(..., broker_use_ssl=ssl_context)`` (an ``ssl.SSLContext``).

Built on kombu's virtual transport, but the broker keeps the truth:

- a task message is a Sluice message in the queue of the same name (characters a queue
  name may not have become ``_``); its priority is the Sluice priority (higher first, as
  in AMQP; not Redis's 0-is-highest), and a task with
  an ETA or countdown is put with that delay, so a worker never holds future tasks;
- a delivered task is a Sluice lease: ``basic_ack`` acks it with its lease, a reject
  with requeue nacks it (ready again at once), a reject without buries it (a dead letter
  saying so, rather than silently gone);
- kombu's own restore of unacked messages (putting a copy back) is off: a task whose
  worker died comes back when its lease runs out, and a worker that closes its channel
  gives its unfinished tasks back at once. While a task runs its lease is touched, so a
  task longer than the queue's visibility timeout is not run twice.

Fanout (broadcast) exchanges are not supported, so Celery's remote control (``celery
inspect``, ``control``) does not reach workers over this transport.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import threading
import time
from datetime import UTC, datetime
from queue import Empty
from typing import Any

from kombu.transport import TRANSPORT_ALIASES, virtual

from client import Client, Message
from client.errors import LeaseLost, NotFound, SluiceError

log = logging.getLogger("sluice.celery")

SCHEME = "sluice"
TLS_SCHEME = "sluices"
DEFAULT_PORT = 7700
_NOT_A_NAME = re.compile(r"[^A-Za-z0-9._:-]")
KEEP_ALIVE_EVERY = 1.0  # seconds between looks at the leases of running tasks
POLL_WAIT = 0.05  # seconds a poll of an empty queue waits in the broker for a message


def queue_name(kombu_queue: str) -> str:
    """The Sluice queue that carries ``kombu_queue``."""
    return _NOT_A_NAME.sub("_", kombu_queue)[:200] or "_"


def eta_delay(message: dict[str, Any], now: float) -> float:
    """Seconds until a task message's ETA (Celery puts countdowns there too), or 0."""
    eta = (message.get("headers") or {}).get("eta")
    if not eta:
        return 0.0
    try:
        due = datetime.fromisoformat(str(eta))
    except ValueError:
        return 0.0
    if due.tzinfo is None:
        due = due.replace(tzinfo=UTC)
    return max(0.0, due.timestamp() - now)


class Channel(virtual.Channel):
    """One kombu channel: a blocking Sluice client, and the leases of the messages it
    delivered that are not acked yet (by kombu delivery tag)."""

    do_restore = False  # never put a copy back: the lease brings the message back
    supports_fanout = False

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        info = connection.client
        self.client = Client(
            info.hostname or "127.0.0.1",
            info.port or DEFAULT_PORT,
            client_name="sluice-kombu",
            auth_token=info.password or None,
            tls=_tls(connection.tls, info.ssl),
        )
        self._leases: dict[str, Message] = {}  # kombu delivery tag -> its Sluice delivery
        self._lengths: dict[int, float] = {}  # message id -> its lease's length, seconds
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._keeper = threading.Thread(target=self._keep_alive, daemon=True)
        self._keeper.start()

    # -------------------------------------------------------------- messages

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        priority = message.get("properties", {}).get("priority") or 0
        self.client.put(
            queue_name(queue),
            json.dumps(message).encode(),
            priority=int(priority),
            delay=eta_delay(message, time.time()),
        )

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        delivered = self.client.reserve(queue_name(queue), wait=POLL_WAIT)
        if not delivered:
            raise Empty()
        (message,) = delivered
        payload: dict[str, Any] = json.loads(message.body)
        with self._lock:
            self._leases[payload["properties"]["delivery_tag"]] = message
            self._lengths[message.id] = max(0.0, message.lease_deadline - time.time())
        return payload

    def basic_ack(self, delivery_tag: str, multiple: bool = False) -> None:
        message = self._take(delivery_tag)
        if message is not None:
            try:
                self.client.ack(message)
            except LeaseLost:
                log.warning("task message %d: its lease ran out before the ack", message.id)
        super().basic_ack(delivery_tag, multiple)

    def basic_reject(self, delivery_tag: str, requeue: bool = False) -> None:
        message = self._take(delivery_tag)
        if message is not None:
            try:
                if requeue:
                    self.client.nack(message, delay=0, error="rejected with requeue")
                else:
                    self.client.bury(message, reason="rejected by the consumer")
            except LeaseLost:
                log.warning("task message %d: its lease ran out before the reject", message.id)
        self.qos.ack(delivery_tag)  # not QoS.reject: that would put a copy back

    def _take(self, delivery_tag: str) -> Message | None:
        with self._lock:
            message = self._leases.pop(delivery_tag, None)
            if message is not None:
                self._lengths.pop(message.id, None)
            return message

    # ---------------------------------------------------------------- queues

    def _size(self, queue: str) -> int:
        try:
            return int(self.client.stats(queue_name(queue))["ready"])
        except NotFound:
            return 0

    def _purge(self, queue: str) -> int:
        try:
            return self.client.purge(queue_name(queue))
        except NotFound:
            return 0

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        self._purge(queue)

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        """Queues come into being with their first put or reserve."""

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return True

    # ---------------------------------------------------------------- leases

    def _keep_alive(self) -> None:
        """Touch the lease of each delivered, unacked message when half of it is gone."""
        while not self._closed.wait(KEEP_ALIVE_EVERY):
            with self._lock:
                held = [(m, self._lengths.get(m.id, 0.0)) for m in self._leases.values()]
            now = time.time()
            for message, length in held:
                left = message.lease_deadline - now
                if left > max(KEEP_ALIVE_EVERY * 2, length / 2):
                    continue
                try:
                    self.client.touch(message)
                except LeaseLost:
                    log.warning("task message %d: its lease was lost while it ran", message.id)
                except SluiceError as error:
                    log.warning("could not touch task message %d: %s", message.id, error)

    def close(self) -> None:
        """Give every delivered, unacked message back for immediate redelivery."""
        if not self._closed.is_set():
            self._closed.set()
            with self._lock:
                held, self._leases, self._lengths = list(self._leases.values()), {}, {}
            if held:
                try:
                    self.client.nack(held, delay=0, error="the consumer closed its channel")
                except SluiceError as error:
                    log.warning("could not give back %d task messages: %s", len(held), error)
            self.client.close()
        super().close()


def _tls(wanted: bool, given: Any) -> bool | ssl.SSLContext:
    """An ``ssl.SSLContext`` given as kombu's ``ssl`` option, else TLS with the system's
    CAs for ``sluices://`` (or a true ``ssl`` option), else none."""
    if isinstance(given, ssl.SSLContext):
        return given
    return wanted or bool(given)


class Transport(virtual.Transport):
    """kombu's transport for ``sluice://host:port`` URLs."""

    tls = False

    Channel = Channel
    default_port = DEFAULT_PORT  # type: ignore[assignment]
    driver_type = driver_name = SCHEME
    polling_interval = 0.01  # seconds between polls, when every queue was empty or the
    # prefetch limit is reached (each empty poll has already waited POLL_WAIT)
    implements = virtual.Transport.implements.extend(
        asynchronous=False, exchange_type=frozenset(["direct", "topic"])
    )

    def driver_version(self) -> str:
        from broker import __version__

        return str(__version__)


class TlsTransport(Transport):
    """kombu's transport for ``sluices://host:port`` URLs: the same over TLS."""

    tls = True
    driver_type = driver_name = TLS_SCHEME


TRANSPORT_ALIASES.setdefault(SCHEME, f"{__name__}:Transport")
TRANSPORT_ALIASES.setdefault(TLS_SCHEME, f"{__name__}:TlsTransport")
