"""The two frame shapes: requests and replies.

Request: ``[request_id, op, args]`` — request_id an unsigned int the client picks (unique
among its in-flight requests), op a string, args a map with string keys.
Reply:   ``[request_id, ok, result_or_error]`` — ok true with a result, or false with an
error map ``{code, message[, details]}``. A reply to a frame whose request id could not be
read carries ``None`` as its id.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass, field
from typing import Any, Final

from ._errors import BadRequest, SluiceError, error_from_wire

PROTOCOL_VERSION: Final = 1
MAX_REQUEST_ID: Final = 2**64 - 1
# What an auth file's grants allow, each op needing one of them (PROTOCOL.md §4).
VERBS: Final = ("produce", "consume", "read", "admin")

OPS: Final = frozenset(
    {
        "hello",
        "ping",
        "put",
        "reserve",
        "ack",
        "nack",
        "touch",
        "bury",
        "cancel",
        "status",
        "queues",
        "stats",
        "configure",
        "pause",
        "resume",
        "purge",
        "dead_letters",
        "peek",
        "put_and_wait",
        "result",
        "progress",
        "replay",
        "purge_dead",
        "schedule",
        "unschedule",
        "schedules",
        "trigger",
        "publish",
        "subscribe",
        "unsubscribe",
        "bind",
        "unbind",
        "bindings",
    }
)


def _is_request_id(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_REQUEST_ID


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    request_id: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _is_request_id(self.request_id):
            raise BadRequest(
                f"request id must be an int in 0..2^64-1, got {reprlib.repr(self.request_id)}"
            )
        if not isinstance(self.op, str) or not self.op:
            raise BadRequest(f"op must be a non-empty string, got {reprlib.repr(self.op)}")
        if not isinstance(self.args, dict):
            raise BadRequest("args must be a map with string keys")
        require_string_keys(self.args)

    def to_wire(self) -> list[Any]:
        return [self.request_id, self.op, self.args]


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """A successful reply (``error is None``) or an error reply (``result is None``)."""

    request_id: int | None
    result: Any = None
    error: SluiceError | None = None

    def __post_init__(self) -> None:
        if self.request_id is not None and not _is_request_id(self.request_id):
            raise BadRequest(
                f"reply id must be an int in 0..2^64-1, got {reprlib.repr(self.request_id)}"
            )
        if self.error is not None and self.result is not None:
            raise BadRequest("a reply carries a result or an error, not both")

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_wire(self) -> list[Any]:
        if self.error is None:
            return [self.request_id, True, self.result]
        return [self.request_id, False, self.error.to_wire()]


def require_string_keys(args: dict[Any, Any]) -> None:
    """Raise ``BadRequest`` unless every key of a request's args is a string."""
    if not all(isinstance(key, str) for key in args):
        raise BadRequest("args must be a map with string keys")


def parse_request(obj: Any) -> Request:
    """Validate a decoded frame as a request. Raises ``BadRequest``."""
    if not isinstance(obj, list | tuple) or len(obj) != 3:
        raise BadRequest("a request is a 3-element array [request_id, op, args]")
    request_id, op, args = obj
    return Request(request_id=request_id, op=op, args=args)


def split_request(obj: Any) -> tuple[int, str, dict[Any, Any]]:
    """``(request_id, op, args)`` of a decoded request frame, checked as ``parse_request``
    checks it except for the keys of ``args``: whoever reads args must refuse keys that are
    not strings (``require_string_keys``). For the broker's hot path: it builds no object."""
    if type(obj) is list and len(obj) == 3:
        request_id, op, args = obj
        if (
            type(request_id) is int
            and 0 <= request_id <= MAX_REQUEST_ID
            and type(op) is str
            and op
            and type(args) is dict
        ):
            return request_id, op, args
    request = parse_request(obj)  # raises the error that says what is wrong
    return request.request_id, request.op, request.args


def request_id_of(obj: Any) -> int | None:
    """Best-effort request id of a frame that failed to parse, for the error reply."""
    if isinstance(obj, list | tuple) and obj and _is_request_id(obj[0]):
        return int(obj[0])
    return None


def split_reply(obj: Any) -> tuple[int | None, bool, Any]:
    """``(request_id, ok, result_or_error)`` of a decoded reply frame, checked as
    ``parse_reply`` checks it; the error of a failed reply is its ``SluiceError``. For the
    clients' hot path: a successful reply builds no object."""
    if type(obj) is list and len(obj) == 3:
        request_id, ok, payload = obj
        if ok is True and type(request_id) is int and 0 <= request_id <= MAX_REQUEST_ID:
            return request_id, True, payload
    reply = parse_reply(obj)  # raises the error that says what is wrong
    if reply.error is None:
        return reply.request_id, True, reply.result
    return reply.request_id, False, reply.error


def parse_reply(obj: Any) -> Reply:
    """Validate a decoded frame as a reply. Raises ``BadRequest``."""
    if not isinstance(obj, list | tuple) or len(obj) != 3 or not isinstance(obj[1], bool):
        raise BadRequest("a reply is a 3-element array [request_id, ok, result_or_error]")
    request_id, ok, payload = obj
    if ok:
        return Reply(request_id=request_id, result=payload)
    return Reply(request_id=request_id, error=error_from_wire(payload))
