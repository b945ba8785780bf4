"""Hostile and malformed input against the real daemon, over a raw socket.

DESIGN.md: bad input gets a typed error, never a crash; a broken frame closes only that
connection; other clients and stored messages are untouched. So every test here checks,
besides the error itself, that the daemon is up, that a client connected *before* the bad
input (the ``Witness``) carries on, and that the messages it stored beforehand, in every
state, are exactly as they were.
"""

from __future__ import annotations

import itertools
import random
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from client import Message
from client.errors import NotFound
from tests.conftest import (
    BrokerProcess,
    RawConnection,
    error_code,
    frame,
    start_broker,
    stop_broker,
    wait_for_state,
)

_queue_numbers = itertools.count(1)


class Witness:
    """A client connected before the bad input, owning a queue with a message in each
    state: two ready, one delayed, one reserved, one dead."""

    def __init__(self, broker: BrokerProcess) -> None:
        self.broker = broker
        self.queue = f"keep-{next(_queue_numbers)}"
        self.client = broker.client(client_name="witness")
        client, queue = self.client, self.queue
        client.put(queue, b"to reserve", priority=9)
        (self.reserved,) = client.reserve(queue)
        client.put(queue, b"to bury", priority=8)
        (dead,) = client.reserve(queue)
        client.bury(dead, reason="witness")
        self.dead_id = dead.id
        self.ready_ids = client.put_many(queue, [b"ready-0", b"ready-1"], priority=1)
        self.delayed_id = client.put(queue, b"later", delay=3600, headers={"h": "v"})
        self.ids = [self.reserved.id, self.dead_id, *self.ready_ids, self.delayed_id]
        self.before = self.snapshot()

    def snapshot(self) -> dict[str, Any]:
        client = self.client
        return {
            "stats": client.stats(self.queue),
            "statuses": [self._status(message_id) for message_id in self.ids],
            "settings": client.configure(self.queue),
            "dead": client.dead_letters(self.queue),
        }

    def _status(self, message_id: int) -> dict[str, Any] | str:
        try:
            return self.client.status(message_id)
        except NotFound:
            return "gone"

    def check(self) -> None:
        """The daemon is up, nothing stored changed, and this client still works."""
        self.broker.assert_alive()
        assert self.snapshot() == self.before, "stored messages changed"
        client, other = self.client, f"{self.queue}-other"
        assert client.ping() > 0
        message_id = client.put(other, b"still working")
        (message,) = client.reserve(other)
        assert message.id == message_id
        assert client.ack(message) == 1

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def witness(broker: BrokerProcess) -> Iterator[Witness]:
    """A witness on a fresh daemon."""
    watcher = Witness(broker)
    yield watcher
    watcher.close()


@pytest.fixture
def shared_witness(shared_broker: BrokerProcess) -> Iterator[Witness]:
    """A witness (with a queue of its own) on this module's shared daemon."""
    watcher = Witness(shared_broker)
    yield watcher
    watcher.close()


def assert_error(reply: list[Any], code: str, request_id: int | None) -> None:
    assert reply[0] == request_id, f"reply id {reply[0]!r}, expected {request_id!r}: {reply!r}"
    assert error_code(reply) == code, f"expected {code}, got {reply!r}"


def assert_broken_frame(connection: RawConnection, code: str) -> None:
    """One error reply with no request id, then the broker closes the connection."""
    replies = connection.read_until_closed()
    assert len(replies) == 1, f"expected exactly one error reply then EOF, got {replies!r}"
    assert_error(replies[0], code, None)


# -------------------------------------------------------------------- broken frames


def _first_frame_outcome(data: bytes, max_frame: int) -> str:
    """What the contract says happens to the first frame of ``data``."""
    if len(data) < 4:
        return "incomplete"
    (length,) = struct.unpack_from(">I", data)
    if length > max_frame:
        return "TOO_LARGE"
    if len(data) < 4 + length:
        return "incomplete"
    try:
        msgpack.unpackb(data[4 : 4 + length], raw=False, strict_map_key=False)
    except (ValueError, TypeError):
        return "BAD_FRAME"
    return "decoded"


def _random_input(kind: str, seed: int) -> bytes:
    rng = random.Random(seed)
    if kind == "stream":
        return rng.randbytes(rng.randint(1, 4096))
    payload = rng.randbytes(rng.randint(1, 512))
    return struct.pack(">I", len(payload)) + payload


@pytest.mark.parametrize(
    ("kind", "seed"),
    [("stream", seed) for seed in range(4)] + [("framed", seed) for seed in range(4)],
)
def test_random_bytes(broker: BrokerProcess, witness: Witness, kind: str, seed: int) -> None:
    data = _random_input(kind, seed)
    with broker.raw(hello=seed % 2 == 0) as connection:
        outcome = _first_frame_outcome(data, int(witness.client.server_info["max_frame"]))
        connection.send_bytes(data)
        connection.sock.shutdown(socket.SHUT_WR)
        replies = connection.read_until_closed()
    if outcome in ("TOO_LARGE", "BAD_FRAME"):
        assert len(replies) == 1, replies
        assert_error(replies[0], outcome, None)
    elif outcome == "incomplete":
        assert replies == []
    else:
        assert replies, "a decoded frame got no reply"
        assert all(reply[1] is False for reply in replies), replies
        assert all(reply[0] is not None for reply in replies[:-1]), replies
    witness.check()


def test_random_inputs_cover_each_outcome() -> None:
    """Guard for ``test_random_bytes``: its seeds exercise more than one path."""
    outcomes = {
        _first_frame_outcome(_random_input(kind, seed), 16 * 1024 * 1024)
        for kind in ("stream", "framed")
        for seed in range(4)
    }
    assert {"TOO_LARGE", "BAD_FRAME"} <= outcomes


@pytest.mark.parametrize("greeted", [True, False])
def test_4_gib_length_prefix_is_refused_before_buffering(
    broker: BrokerProcess, witness: Witness, greeted: bool
) -> None:
    with broker.raw(hello=greeted) as connection:
        # Only the header: a broker that waited for the 4 GiB would never answer.
        connection.send_bytes(b"\xff\xff\xff\xff")
        assert_broken_frame(connection, "TOO_LARGE")
    witness.check()


def test_frame_one_byte_over_max_frame(broker: BrokerProcess, witness: Witness) -> None:
    with broker.raw() as connection:
        max_frame = int(connection.server_info["max_frame"])
        connection.send_bytes(struct.pack(">I", max_frame + 1) + b"\x00" * 100)
        assert_broken_frame(connection, "TOO_LARGE")
    witness.check()


def test_frame_of_exactly_max_frame_is_read(broker: BrokerProcess, witness: Witness) -> None:
    """N == max_frame is a frame like any other: its body is over max_body, so the put
    fails with a TOO_LARGE that has the request id, and the connection stays open."""
    with broker.raw() as connection:
        max_frame = int(connection.server_info["max_frame"])
        request = [3, "put", {"queue": witness.queue, "messages": [{"body": b""}]}]
        overhead = len(msgpack.packb(request)) + 3  # the body's header: bin8 -> bin32
        request[2]["messages"][0]["body"] = b"b" * (max_frame - overhead)
        data = frame(request)
        assert len(data) == 4 + max_frame
        connection.send_bytes(data)
        assert_error(connection.read_reply(), "TOO_LARGE", 3)
        assert connection.call("ping", {})["time"] > 0
    witness.check()


def test_broken_frame_cancels_the_connections_long_poll(
    broker: BrokerProcess, witness: Witness
) -> None:
    with broker.raw() as connection:
        connection.send_request("reserve", {"queues": ["waitq"], "wait": 20})
        # One connection's requests are handled in order: once the ping is answered, the
        # reserve is registered.
        assert connection.call("ping", {})["time"] > 0
        assert witness.client.stats("waitq")["waiting"] == 1
        connection.send_bytes(b"\xff\xff\xff\xff")
        assert_broken_frame(connection, "TOO_LARGE")
    wait_for_state(
        lambda: "waitq" not in {q["name"] for q in witness.client.queues()},
        "the closed connection's wait was not cancelled (its queue, unused, would go)",
    )
    message_id = witness.client.put("waitq", b"not for the closed connection")
    assert witness.client.status(message_id)["state"] == "ready"
    witness.check()


def test_truncated_frame(broker: BrokerProcess, witness: Witness) -> None:
    request = frame([1, "put", {"queue": witness.queue, "messages": [{"body": b"x" * 50}]}])
    # A frame split into pieces is answered once it is whole...
    with broker.raw() as connection:
        request_id = 2
        pieces = frame([request_id, "ping", {}])
        for index in range(len(pieces)):
            connection.send_bytes(pieces[index : index + 1])
        assert connection.read_reply()[:2] == [request_id, True]
    # ...a truncated one is never acted on, whether the client half-closes...
    with broker.raw() as connection:
        connection.send_bytes(request[: len(request) // 2])
        connection.sock.shutdown(socket.SHUT_WR)
        connection.assert_closed()
    # ...or just goes away.
    with broker.raw() as connection:
        connection.send_bytes(request[:-1])
    witness.check()


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(msgpack.packb([1, "ping", {}]) + b"\x00", id="trailing-data"),
        pytest.param(b"\x93\x01", id="incomplete-object"),
        pytest.param(b"\x91" * 100_000 + b"\xc0", id="nested-too-deep"),
        pytest.param(b"\x81\x91\x01\x01", id="unhashable-map-key"),
        pytest.param(b"\xdd\xff\xff\xff\xff", id="array-of-4g-items"),
        pytest.param(b"\xdb\xff\xff\xff\xffabc", id="str-of-4-gib"),
        pytest.param(b"\xc6\xff\xff\xff\xff", id="bin-of-4-gib"),
        pytest.param(b"", id="empty-payload"),
        pytest.param(b"\x93\x01\xa4pi\xffg\x80", id="invalid-utf8-str"),
    ],
)
def test_invalid_msgpack_in_a_frame(
    broker: BrokerProcess, witness: Witness, payload: bytes
) -> None:
    with broker.raw() as connection:
        # The ping before it in the same write is still answered.
        connection.send_bytes(frame([5, "ping", {}]) + struct.pack(">I", len(payload)) + payload)
        assert connection.read_reply()[:2] == [5, True]
        assert_broken_frame(connection, "BAD_FRAME")
    witness.check()


# ----------------------------------------------------- frames that are not requests


NOT_REQUESTS: list[tuple[str, Any, int | None]] = [
    ("map", {"op": "ping", "id": 1}, None),
    ("int", 42, None),
    ("string", "ping", None),
    ("nil", None, None),
    ("empty-list", [], None),
    ("one-element", [3], 3),
    ("two-elements", [3, "ping"], 3),
    ("four-elements", [3, "ping", {}, {}], 3),
    ("op-not-string", [3, 7, {}], 3),
    ("op-empty", [3, "", {}], 3),
    ("op-nil", [3, None, {}], 3),
    ("args-list", [3, "ping", []], 3),
    ("args-nil", [3, "ping", None], 3),
    ("args-int-keys", [3, "ping", {1: 2}], 3),
    ("id-negative", [-1, "ping", {}], None),
    ("id-float", [1.0, "ping", {}], None),
    ("id-string", ["1", "ping", {}], None),
    ("id-bool", [True, "ping", {}], None),
    ("id-nil", [None, "ping", {}], None),
    ("id-timestamp", [msgpack.Timestamp(1), "ping", {}], None),
    ("args-ext", [3, "ping", msgpack.ExtType(5, b"x")], 3),
]


@pytest.mark.parametrize(
    ("obj", "request_id"),
    [pytest.param(obj, rid, id=name) for name, obj, rid in NOT_REQUESTS],
)
def test_frame_that_is_not_a_request(
    shared_broker: BrokerProcess, shared_witness: Witness, obj: Any, request_id: int | None
) -> None:
    with shared_broker.raw() as connection:
        connection.send(obj)
        assert_error(connection.read_reply(), "BAD_REQUEST", request_id)
        assert connection.call("ping", {})["time"] > 0  # not a broken frame: still open
    with shared_broker.raw(hello=False) as connection:
        connection.send(obj)
        assert_error(connection.read_reply(), "BAD_REQUEST", request_id)
    shared_witness.check()


def test_largest_request_id_is_accepted(shared_broker: BrokerProcess) -> None:
    with shared_broker.raw() as connection:
        reply = connection.request("ping", {}, request_id=2**64 - 1)
        assert reply[:2] == [2**64 - 1, True]
        reply = connection.request("ping", {}, request_id=0)
        assert reply[:2] == [0, True]


@pytest.mark.parametrize("op", ["explode", "PING", "Put", "ping ", "_ping", "__class__", "get"])
def test_unknown_op(shared_broker: BrokerProcess, shared_witness: Witness, op: str) -> None:
    with shared_broker.raw() as connection:
        reply = connection.request(op, {"queue": shared_witness.queue}, request_id=41)
        assert_error(reply, "UNKNOWN_OP", 41)
        assert connection.call("ping", {})["time"] > 0
    shared_witness.check()


# ------------------------------------------------------------- bad argument values

Args = Callable[[Witness], dict[str, Any]]


def _put(*messages: Any, **extra: Any) -> Args:
    return lambda w: {"queue": w.queue, "messages": list(messages), **extra}


def _reserve(**extra: Any) -> Args:
    return lambda w: {"queues": [w.queue], **extra}


def _items(make: Callable[[Message], Any], **extra: Any) -> Args:
    return lambda w: {"items": make(w.reserved), **extra}


def _leased(**extra: Any) -> Args:
    return lambda w: {"id": w.reserved.id, "lease": w.reserved.lease, **extra}


def _settings(settings: Any) -> Args:
    return lambda w: {"queue": w.queue, "settings": settings}


def _queue(**extra: Any) -> Args:
    return lambda w: {"queue": w.queue, **extra}


def _ready_id(value: Callable[[int], Any]) -> Args:
    return lambda w: {"id": value(w.ready_ids[0])}


MANY_HEADERS = {f"k{i}": i for i in range(65)}

# Each case names the witness's own messages and queue, so a request wrongly accepted
# would change what the witness stored, and its check would fail.
BAD_ARGUMENTS: list[tuple[str, str, Args]] = [
    ("put-queue-int", "put", lambda w: {"queue": 5, "messages": [{"body": b"x"}]}),
    ("put-queue-bytes", "put", lambda w: {"queue": w.queue.encode(), "messages": [{"body": b"x"}]}),
    ("put-queue-missing", "put", lambda w: {"messages": [{"body": b"x"}]}),
    ("put-body-str", "put", _put({"body": "text"})),
    ("put-body-missing", "put", _put({"priority": 1})),
    ("put-body-nil", "put", _put({"body": None})),
    ("put-body-ext", "put", _put({"body": msgpack.ExtType(1, b"x")})),
    ("put-priority-str", "put", _put({"body": b"x", "priority": "high"})),
    ("put-priority-float", "put", _put({"body": b"x", "priority": 1.5})),
    ("put-priority-bool", "put", _put({"body": b"x", "priority": True})),
    ("put-priority-over-int32", "put", _put({"body": b"x", "priority": 2**31})),
    ("put-priority-under-int32", "put", _put({"body": b"x", "priority": -(2**31) - 1})),
    ("put-delay-negative", "put", _put({"body": b"x", "delay": -1})),
    ("put-delay-nan", "put", _put({"body": b"x", "delay": float("nan")})),
    ("put-delay-inf", "put", _put({"body": b"x", "delay": float("inf")})),
    ("put-delay-str", "put", _put({"body": b"x", "delay": "5"})),
    ("put-delay-too-long", "put", _put({"body": b"x", "delay": 10**8})),
    ("put-max-attempts-zero", "put", _put({"body": b"x", "max_attempts": 0})),
    ("put-visibility-zero", "put", _put({"body": b"x", "visibility_timeout": 0})),
    ("put-visibility-tiny", "put", _put({"body": b"x", "visibility_timeout": 1e-9})),
    ("put-headers-list", "put", _put({"body": b"x", "headers": [1, 2]})),
    ("put-headers-float", "put", _put({"body": b"x", "headers": {"k": 1.5}})),
    ("put-headers-uint64", "put", _put({"body": b"x", "headers": {"k": 2**64 - 1}})),
    ("put-headers-int-key", "put", _put({"body": b"x", "headers": {1: "x"}})),
    ("put-headers-empty-key", "put", _put({"body": b"x", "headers": {"": "x"}})),
    ("put-headers-too-many", "put", _put({"body": b"x", "headers": MANY_HEADERS})),
    ("put-headers-value-too-long", "put", _put({"body": b"x", "headers": {"k": "v" * 4097}})),
    ("put-messages-map", "put", lambda w: {"queue": w.queue, "messages": {"body": b"x"}}),
    ("put-messages-empty", "put", _put()),
    ("put-messages-too-many", "put", _put(*[{"body": b""}] * 1001)),
    ("put-message-not-map", "put", _put(b"x")),
    ("put-message-unknown-field", "put", _put({"body": b"x", "color": "red"})),
    ("put-one-bad-in-batch", "put", _put({"body": b"ok"}, {"body": b"ok"}, {"body": "bad"})),
    ("put-unknown-argument", "put", _put({"body": b"x"}, mode="fast")),
    ("reserve-max-negative", "reserve", _reserve(max=-1)),
    ("reserve-max-zero", "reserve", _reserve(max=0)),
    ("reserve-max-too-big", "reserve", _reserve(max=1001)),
    ("reserve-max-str", "reserve", _reserve(max="1")),
    ("reserve-max-float", "reserve", _reserve(max=1.0)),
    ("reserve-wait-negative", "reserve", _reserve(wait=-1)),
    ("reserve-wait-too-long", "reserve", _reserve(wait=3601)),
    ("reserve-wait-str", "reserve", _reserve(wait="1")),
    ("reserve-visibility-zero", "reserve", _reserve(visibility_timeout=0)),
    ("reserve-visibility-tiny", "reserve", _reserve(visibility_timeout=1e-300)),
    ("reserve-queues-empty", "reserve", lambda w: {"queues": []}),
    ("reserve-queues-int", "reserve", lambda w: {"queues": 5}),
    ("reserve-queues-item-int", "reserve", lambda w: {"queues": [w.queue, 5]}),
    ("reserve-queues-too-many", "reserve", lambda w: {"queues": [w.queue] * 101}),
    ("reserve-queues-missing", "reserve", lambda w: {"max": 1}),
    ("reserve-singular-queue", "reserve", lambda w: {"queue": w.queue}),
    ("ack-items-missing", "ack", lambda w: {}),
    ("ack-items-int", "ack", lambda w: {"items": 5}),
    ("ack-items-empty", "ack", lambda w: {"items": []}),
    ("ack-item-short", "ack", _items(lambda m: [[m.id]])),
    ("ack-item-long", "ack", _items(lambda m: [[m.id, m.lease, 1, 2]])),
    ("ack-result-over-1mib", "ack", _items(lambda m: [[m.id, m.lease, b"r" * (1 << 20)]])),
    ("nack-item-with-result", "nack", _items(lambda m: [[m.id, m.lease, 1]])),
    ("ack-item-str-id", "ack", _items(lambda m: [[str(m.id), m.lease]])),
    ("ack-item-float-lease", "ack", _items(lambda m: [[m.id, float(m.lease)]])),
    ("ack-item-bool-lease", "ack", _items(lambda m: [[m.id, True]])),
    ("ack-item-zero-id", "ack", _items(lambda m: [[0, m.lease]])),
    ("ack-item-map", "ack", _items(lambda m: [{"id": m.id, "lease": m.lease}])),
    ("ack-item-flat", "ack", _items(lambda m: [m.id, m.lease])),
    ("ack-items-too-many", "ack", _items(lambda m: [[m.id, m.lease]] * 1001)),
    ("ack-one-bad-in-batch", "ack", _items(lambda m: [[m.id, m.lease], [m.id]])),
    ("ack-unknown-argument", "ack", _items(lambda m: [[m.id, m.lease]], result=b"done")),
    ("nack-error-int", "nack", _items(lambda m: [[m.id, m.lease]], error=5)),
    ("nack-delay-negative", "nack", _items(lambda m: [[m.id, m.lease]], delay=-1)),
    ("nack-delay-str", "nack", _items(lambda m: [[m.id, m.lease]], delay="1")),
    ("nack-unknown-argument", "nack", _items(lambda m: [[m.id, m.lease]], reason="x")),
    ("touch-lease-missing", "touch", lambda w: {"id": w.reserved.id}),
    ("touch-lease-str", "touch", lambda w: {"id": w.reserved.id, "lease": str(w.reserved.lease)}),
    ("touch-seconds-zero", "touch", _leased(seconds=0)),
    ("touch-seconds-negative", "touch", _leased(seconds=-5)),
    ("touch-seconds-too-long", "touch", _leased(seconds=10**8)),
    ("touch-id-negative", "touch", lambda w: {"id": -w.reserved.id, "lease": w.reserved.lease}),
    ("bury-reason-int", "bury", _leased(reason=5)),
    ("bury-id-missing", "bury", lambda w: {"lease": w.reserved.lease, "reason": "x"}),
    ("cancel-id-str", "cancel", _ready_id(str)),
    ("cancel-id-float", "cancel", _ready_id(float)),
    ("cancel-id-list", "cancel", _ready_id(lambda i: [i])),
    ("cancel-id-zero", "cancel", lambda w: {"id": 0}),
    ("cancel-id-over-int64", "cancel", lambda w: {"id": 2**63}),
    ("cancel-id-missing", "cancel", lambda w: {}),
    ("status-id-negative", "status", lambda w: {"id": -1}),
    ("configure-settings-str", "configure", _settings("paused")),
    ("configure-settings-missing", "configure", _queue()),
    ("configure-visibility-zero", "configure", _settings({"visibility_timeout": 0})),
    ("configure-visibility-tiny", "configure", _settings({"visibility_timeout": 1e-300})),
    ("configure-max-body-over-frame", "configure", _settings({"max_body": 32 * 1024 * 1024})),
    ("configure-max-attempts-zero", "configure", _settings({"max_attempts": 0})),
    ("configure-paused-str", "configure", _settings({"paused": "yes"})),
    ("configure-paused-int", "configure", _settings({"paused": 1})),
    ("configure-unknown-setting", "configure", _settings({"colour": "red"})),
    ("configure-int-setting-key", "configure", _settings({1: True})),
    ("configure-backoff-type", "configure", _settings({"backoff": {"type": "linear"}})),
    ("configure-backoff-field", "configure", _settings({"backoff": {"type": "fixed", "base": 1}})),
    ("configure-backoff-factor", "configure", _settings({"backoff": {"factor": 0.5}})),
    ("configure-backoff-jitter", "configure", _settings({"backoff": {"jitter": 2}})),
    ("configure-backoff-not-map", "configure", _settings({"backoff": "fixed"})),
    ("configure-max-body-zero", "configure", _settings({"max_body": 0})),
    ("configure-max-body-huge", "configure", _settings({"max_body": 2**40})),
    ("configure-dead-letter-ttl-zero", "configure", _settings({"dead_letter_ttl": 0})),
    ("configure-one-bad-of-two", "configure", _settings({"paused": True, "max_attempts": 0})),
    ("pause-unknown-argument", "pause", _queue(now=True)),
    ("resume-queue-list", "resume", lambda w: {"queue": [w.queue]}),
    ("purge-unknown-argument", "purge", _queue(delayed=False)),
    ("purge-queue-missing", "purge", lambda w: {}),
    ("stats-queue-nil", "stats", lambda w: {"queue": None}),
    ("queues-unknown-argument", "queues", _queue()),
    ("ping-unknown-argument", "ping", lambda w: {"x": 1}),
    ("dead-letters-limit-zero", "dead_letters", _queue(limit=0)),
    ("dead-letters-limit-too-big", "dead_letters", _queue(limit=1001)),
    ("dead-letters-after-negative", "dead_letters", _queue(after=-1)),
    ("peek-state-unknown", "peek", _queue(state="gone")),
    ("peek-state-int", "peek", _queue(state=1)),
    ("peek-limit-too-big", "peek", _queue(limit=1001)),
    ("peek-unknown-argument", "peek", _queue(lease=1)),
    ("replay-ids-str", "replay", _queue(ids="all")),
    ("replay-ids-zero", "replay", _queue(ids=[0])),
    ("replay-ids-nested", "replay", lambda w: {"queue": w.queue, "ids": [[w.dead_id]]}),
    ("replay-ids-one-bad", "replay", lambda w: {"queue": w.queue, "ids": [w.dead_id, "x"]}),
    ("purge-dead-unknown-argument", "purge_dead", lambda w: {"queue": w.queue, "ids": [w.dead_id]}),
]


@pytest.mark.parametrize(
    ("op", "make_args"),
    [pytest.param(op, make, id=name) for name, op, make in BAD_ARGUMENTS],
)
def test_bad_arguments(
    shared_broker: BrokerProcess, shared_witness: Witness, op: str, make_args: Args
) -> None:
    with shared_broker.raw() as connection:
        reply = connection.request(op, make_args(shared_witness), request_id=77)
        assert_error(reply, "BAD_REQUEST", 77)
        assert connection.call("ping", {})["time"] > 0
    shared_witness.check()


INVALID_QUEUE_NAMES = ["", " ", "a b", "x" * 201, "é", "q/1", "q\n", "q*", "../etc", "ćwierć"]


@pytest.mark.parametrize("name", [pytest.param(n, id=repr(n)[:20]) for n in INVALID_QUEUE_NAMES])
def test_invalid_queue_name(
    shared_broker: BrokerProcess, shared_witness: Witness, name: str
) -> None:
    requests = [
        ("put", {"queue": name, "messages": [{"body": b"x"}]}),
        ("reserve", {"queues": [name]}),
        ("reserve", {"queues": [shared_witness.queue, name]}),
        ("stats", {"queue": name}),
        ("configure", {"queue": name, "settings": {"paused": True}}),
        ("pause", {"queue": name}),
        ("purge", {"queue": name}),
        ("dead_letters", {"queue": name}),
        ("peek", {"queue": name}),
        ("replay", {"queue": name}),
        ("purge_dead", {"queue": name}),
    ]
    with shared_broker.raw() as connection:
        before = connection.call("queues", {})
        for op, args in requests:
            reply = connection.request(op, args)
            assert_error(reply, "BAD_REQUEST", reply[0])
        assert connection.call("queues", {}) == before  # no queue was created
    shared_witness.check()


def test_queue_name_boundaries_are_accepted(shared_broker: BrokerProcess) -> None:
    with shared_broker.raw() as connection:
        for name in ("x" * 200, "a.B_c:d-9", "Z"):
            assert len(connection.call("put", {"queue": name, "messages": [{"body": b"1"}]})["ids"])
            assert connection.call("stats", {"queue": name})["ready"] == 1
            # "queues" may be a single name instead of a list.
            (message,) = connection.call("reserve", {"queues": name})["messages"]
            assert message["queue"] == name


# ------------------------------------------------------------- limits and leases


def test_body_over_max_body_is_refused(broker: BrokerProcess, witness: Witness) -> None:
    with broker.raw() as connection:
        connection.call("configure", {"queue": "small", "settings": {"max_body": 16}})
        reply = connection.request("put", {"queue": "small", "messages": [{"body": b"x" * 17}]})
        assert_error(reply, "TOO_LARGE", reply[0])
        batch = [{"body": b"fits"}, {"body": b"y" * 17}, {"body": b"fits too"}]
        reply = connection.request("put", {"queue": "small", "messages": batch})
        assert_error(reply, "TOO_LARGE", reply[0])
        stats = connection.call("stats", {"queue": "small"})
        assert (stats["ready"], stats["totals"]["put"]) == (0, 0)  # all or nothing
        assert connection.call("reserve", {"queues": ["small"], "max": 10}) == {"messages": []}

        ids = connection.call("put", {"queue": "small", "messages": [{"body": b"z" * 16}]})["ids"]
        stats = connection.call("stats", {"queue": "small"})
        assert (stats["ready"], stats["totals"]["put"], len(ids)) == (1, 1, 1)
    witness.check()


def test_stale_lease_is_lease_lost_and_changes_nothing(
    broker: BrokerProcess, witness: Witness
) -> None:
    with broker.raw() as connection:
        connection.call("configure", {"queue": "jobs", "settings": {"max_attempts": 2}})
        (message_id,) = connection.call("put", {"queue": "jobs", "messages": [{"body": b"j"}]})[
            "ids"
        ]
        (first,) = connection.call("reserve", {"queues": ["jobs"]})["messages"]
        connection.call("nack", {"items": [[message_id, first["lease"]]], "delay": 0})
        (second,) = connection.call("reserve", {"queues": ["jobs"]})["messages"]
        assert second["id"] == message_id and second["lease"] != first["lease"]
        before = connection.call("status", {"id": message_id})
        assert (before["state"], before["attempts"]) == ("reserved", 2)

        stale = {"id": message_id, "lease": first["lease"]}
        for op, args in [
            ("ack", {"items": [[message_id, first["lease"]]]}),
            ("nack", {"items": [[message_id, first["lease"]]], "delay": 0, "error": "x"}),
            ("touch", {**stale, "seconds": 60}),
            ("bury", {**stale, "reason": "stale"}),
        ]:
            reply = connection.request(op, args)
            assert_error(reply, "LEASE_LOST", reply[0])
            assert reply[2]["details"]["failed"] == [message_id]
            assert connection.call("status", {"id": message_id}) == before

        # The same delivery twice in one batch: the first is applied, the second fails.
        (twice_id,) = connection.call("put", {"queue": "jobs", "messages": [{"body": b"t"}]})["ids"]
        (twice,) = connection.call("reserve", {"queues": ["jobs"]})["messages"]
        pair = [twice_id, twice["lease"]]
        reply = connection.request("ack", {"items": [pair, pair]})
        assert_error(reply, "LEASE_LOST", reply[0])
        assert reply[2]["details"] == {"failed": [twice_id], "done": 1}
        assert error_code(connection.request("status", {"id": twice_id})) == "NOT_FOUND"

        # In a batch, the current lease is acked and the stale one reported.
        (other_id,) = connection.call("put", {"queue": "jobs", "messages": [{"body": b"o"}]})["ids"]
        (other,) = connection.call("reserve", {"queues": ["jobs"]})["messages"]
        reply = connection.request(
            "ack", {"items": [[other_id, other["lease"]], [message_id, first["lease"]]]}
        )
        assert_error(reply, "LEASE_LOST", reply[0])
        assert reply[2]["details"] == {"failed": [message_id], "done": 1}
        assert connection.call("status", {"id": message_id}) == before
        assert error_code(connection.request("status", {"id": other_id})) == "NOT_FOUND"
        assert connection.call("ack", {"items": [[message_id, second["lease"]]]}) == {"acked": 1}
    witness.check()


# ---------------------------------------------------------------------- hello


def test_request_before_hello(broker: BrokerProcess, witness: Witness) -> None:
    with broker.raw(hello=False) as connection:
        assert_error(connection.request("ping", {}), "BAD_REQUEST", 1)
        put = {"queue": witness.queue, "messages": [{"body": b"sneaky"}]}
        assert_error(connection.request("put", put), "BAD_REQUEST", 2)
        assert_error(connection.request("explode", {}), "BAD_REQUEST", 3)
        witness.check()  # the put was not stored

        assert connection.hello()["protocol"] == 1
        assert connection.call("ping", {})["time"] > 0
        reply = connection.request("hello", {"version": 1})
        assert_error(reply, "BAD_REQUEST", reply[0])  # only once per connection
        assert connection.call("ping", {})["time"] > 0
    witness.check()


@pytest.mark.parametrize(
    "hello_args",
    [
        pytest.param({"version": 2}, id="2"),
        pytest.param({"version": 0}, id="0"),
        pytest.param({"version": -1}, id="-1"),
        pytest.param({"version": "1"}, id="str"),
        pytest.param({"version": True}, id="bool"),
        pytest.param({"version": None}, id="nil"),
        pytest.param({"version": [1]}, id="list"),
        pytest.param({"client": "no version"}, id="missing"),
    ],
)
def test_hello_with_wrong_version(
    broker: BrokerProcess, witness: Witness, hello_args: dict[str, Any]
) -> None:
    with broker.raw(hello=False) as connection:
        # A put pipelined behind the bad hello must not be applied.
        put = {"queue": witness.queue, "messages": [{"body": b"sneaky"}]}
        connection.send_bytes(frame([1, "hello", hello_args]) + frame([2, "put", put]))
        reply = connection.read_reply()
        assert_error(reply, "UNSUPPORTED_VERSION", 1)
        connection.assert_closed()
    witness.check()


def test_auth_token(tmp_path: Any) -> None:
    secured = start_broker(tmp_path / "secured.log", "--auth-token", "s3cret")
    try:
        for token in (None, "wrong", 12345):
            with secured.raw(hello=False) as connection:
                args: dict[str, Any] = {"version": 1}
                if token is not None:
                    args["token"] = token
                assert_error(connection.request("hello", args), "UNAUTHORIZED", 1)
                connection.assert_closed()
        with secured.raw(hello=False) as connection:
            assert connection.call("hello", {"version": 1, "token": "s3cret"})["protocol"] == 1
            assert connection.call("ping", {})["time"] > 0
    finally:
        stop_broker(secured)


# -------------------------------------------------------------- request ids


def test_request_id_reused_while_its_reserve_waits(broker: BrokerProcess, witness: Witness) -> None:
    with broker.raw() as connection:
        waiting_id = 7
        connection.send_request("reserve", {"queues": ["waitq"], "wait": 20}, waiting_id)
        # Requests on one connection are handled in order: the reserve is waiting by now.
        assert_error(connection.request("ping", {}, waiting_id), "BAD_REQUEST", waiting_id)
        again = connection.request("reserve", {"queues": ["waitq"], "wait": 20}, waiting_id)
        assert_error(again, "BAD_REQUEST", waiting_id)
        assert witness.client.stats("waitq")["waiting"] == 1

        message_id = witness.client.put("waitq", b"for the first reserve")
        reply = connection.read_reply()
        assert reply[:2] == [waiting_id, True]
        assert [m["id"] for m in reply[2]["messages"]] == [message_id]
        # Answered, the id is free again.
        assert connection.request("ping", {}, waiting_id)[:2] == [waiting_id, True]
        assert witness.client.stats("waitq")["waiting"] == 0
    witness.check()


# ------------------------------------------------------------ misbehaving peers


def test_client_that_does_not_read_its_replies(broker: BrokerProcess, witness: Witness) -> None:
    """20 MiB of replies asked for by a client that is not reading: the broker answers
    until 8 MiB of them are unwritten (and what the sockets hold) and then waits; others
    are not held up, and the replies all arrive, in order, once it reads."""
    witness.client.configure("big", max_body=2 * 1024 * 1024)
    ids = [witness.client.put("big", bytes([n]) * (1024 * 1024)) for n in range(20)]
    with broker.raw() as connection:
        first_id = 1000
        requests = [[first_id + n, "reserve", {"queues": ["big"]}] for n in range(20)]
        requests += [[first_id + 20 + n, "ping", {}] for n in range(50)]
        connection.send_bytes(b"".join(frame(request) for request in requests))
        wait_for_state(
            lambda: witness.client.stats("big")["reserved"] >= 8,
            "the unread client's requests were not handled",
        )
        witness.check()

        for n in range(20):
            reply = connection.read_reply()
            assert reply[:2] == [first_id + n, True]
            (message,) = reply[2]["messages"]
            assert (message["id"], message["body"]) == (ids[n], bytes([n]) * (1024 * 1024))
        for n in range(50):
            assert connection.read_reply()[:2] == [first_id + 20 + n, True]
    witness.check()


def rss_bytes(broker: BrokerProcess) -> int:
    status = Path(f"/proc/{broker.process.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_replies_held_for_a_client_that_does_not_read_are_bounded_in_bytes(
    broker: BrokerProcess, witness: Witness
) -> None:
    """A client pipelines 100 peeks of 2.5 MiB each (250 MiB of replies) and reads none:
    the broker stops answering it once 8 MiB are unwritten, so its memory grows by far
    less than the replies; another client carries on meanwhile; and every reply comes,
    in order, once the client reads."""
    body = b"p" * (256 * 1024)
    witness.client.put_many("wide", [body] * 10)
    with broker.raw() as connection:
        before = rss_bytes(broker)
        requests = [[1 + n, "peek", {"queue": "wide", "limit": 10}] for n in range(100)]
        connection.send_bytes(b"".join(frame(request) for request in requests))
        peak = before
        for _ in range(20):  # 1 s: the broker answers what it will, then waits
            witness.check()
            with broker.client() as other:
                other.put("elsewhere", b"x")
                [message] = other.reserve("elsewhere")
                other.ack(message)
            peak = max(peak, rss_bytes(broker))
            time.sleep(0.05)
        assert peak - before < 64 * 1024 * 1024, f"RSS grew by {(peak - before) >> 20} MiB"
        for n in range(100):
            reply = connection.read_reply()
            assert reply[:2] == [1 + n, True] and len(reply[2]["items"]) == 10
    witness.check()


def test_idle_connections_do_not_hold_up_others(broker: BrokerProcess, witness: Witness) -> None:
    idle = [socket.create_connection((broker.host, broker.port), timeout=5) for _ in range(100)]
    try:
        for index, sock in enumerate(idle):
            if index % 2:  # half of them stop in the middle of a frame
                sock.sendall(frame([1, "hello", {"version": 1}])[:7])
        witness.check()
        with broker.raw() as connection:
            assert connection.call("ping", {})["time"] > 0
    finally:
        for sock in idle:
            sock.close()
    witness.check()


# ---------------------------------------------------------------------- fuzzing


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(7)
        at = rng.randrange(len(buffer)) if buffer else 0
        if choice == 0 and buffer:
            buffer[at] ^= 1 << rng.randrange(8)
        elif choice == 1 and buffer:
            buffer[at] = rng.randrange(256)
        elif choice == 2:
            buffer[at:at] = rng.randbytes(rng.randint(1, 8))
        elif choice == 3 and buffer:
            del buffer[at : at + rng.randint(1, 8)]
        elif choice == 4:
            del buffer[rng.randrange(len(buffer) + 1) :]
        elif choice == 5 and len(buffer) >= 4:
            buffer[0:4] = struct.pack(">I", max(0, len(buffer) - 4 + rng.randint(-8, 8)))
        else:
            buffer += buffer[at : at + rng.randint(1, 16)]
    return bytes(buffer)


FUZZ_OUTCOMES = {"ok", "BAD_FRAME", "BAD_REQUEST", "TOO_LARGE", "UNKNOWN_OP", "no reply"}


def test_fuzzed_put_frames(broker: BrokerProcess, witness: Witness) -> None:
    rng = random.Random(20240611)
    valid = frame([9, "put", {"queue": "fz", "messages": [{"body": b"fuzz-body", "priority": 3}]}])
    outcomes: dict[str, int] = {}
    stored = 0
    for _ in range(300):
        with broker.raw() as connection:
            connection.send_bytes(_mutate(rng, valid))
            connection.sock.shutdown(socket.SHUT_WR)
            replies = connection.read_until_closed()
        for index, reply in enumerate(replies):
            if reply[1]:
                outcome = "ok"
                stored += len(reply[2]["ids"])
            else:
                outcome = error_code(reply)
                assert outcome != "INTERNAL", reply
                if reply[0] is None:
                    assert index == len(replies) - 1, f"replies after a broken frame: {replies}"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if not replies:
            outcomes["no reply"] = outcomes.get("no reply", 0) + 1
    # The mutations reached the framing, decoding and argument checks alike.
    assert {"ok", "BAD_FRAME", "BAD_REQUEST", "no reply"} <= outcomes.keys(), outcomes
    assert set(outcomes) <= FUZZ_OUTCOMES, outcomes
    witness.check()
    # Every put the broker confirmed is stored, and nothing else.
    queues = [q for q in witness.client.queues() if not q["name"].startswith(witness.queue)]
    assert sum(q["ready"] + q["delayed"] + q["reserved"] + q["dead"] for q in queues) == stored


def test_nothing_after_a_failed_hello_is_read(broker: BrokerProcess, witness: Witness) -> None:
    with broker.raw(hello=False) as connection:
        connection.send_bytes(
            frame([1, "hello", {"version": 2}])
            + frame([2, "hello", {"version": 1}])
            + frame([3, "put", {"queue": "sneaky", "messages": [{"body": b"x"}]}])
        )
        replies = connection.read_until_closed()
    assert len(replies) == 1
    assert_error(replies[0], "UNSUPPORTED_VERSION", 1)
    with pytest.raises(NotFound):
        witness.client.stats("sneaky")
    witness.check()


def test_messages_served_to_a_connection_that_breaks_in_the_same_read_are_released(
    broker: BrokerProcess, witness: Witness
) -> None:
    with broker.raw() as connection:
        connection.send_request("reserve", {"queues": ["lost"], "wait": 20})
        assert connection.call("ping", {})["time"] > 0  # the reserve is waiting by now
        # One write: a put that serves this connection's own long-poll, then a broken
        # frame that closes the connection before the reply can go out.
        put = [99, "put", {"queue": "lost", "messages": [{"body": b"orphan"}]}]
        connection.send_bytes(frame(put) + b"\xff\xff\xff\xff")
        replies = connection.read_until_closed()
    assert [reply[0] for reply in replies] == [99, None]
    (message_id,) = replies[0][2]["ids"]
    status = witness.client.status(message_id)
    assert (status["state"], status["attempts"]) == ("ready", 0)
    witness.check()


def test_a_connection_cannot_hold_unbounded_long_polls(
    broker: BrokerProcess, witness: Witness
) -> None:
    with broker.raw() as connection:
        limit = connection.server_info["max_waits_per_connection"]
        request = {"queues": ["flood"], "wait": 60}
        for _ in range(limit):
            connection.send_request("reserve", request)
        over = connection.request("reserve", request)
        assert_error(over, "BAD_REQUEST", over[0])
        assert "long-polls" in over[2]["message"]
        # A reserve that does not wait is still served, and the waits are all registered.
        assert connection.call("reserve", {"queues": ["flood"]}) == {"messages": []}
        assert witness.client.stats("flood")["waiting"] == limit
    witness.check()
