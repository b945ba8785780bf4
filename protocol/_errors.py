"""One error hierarchy for the whole wire protocol.

Every error a broker sends is ``{"code": CODE, "message": text}`` (plus an optional
``details`` map). Each code has exactly one exception class here; the broker raises them
and the client re-raises the class named by the code it receives. The list is stable:
codes are only ever added, never renamed or reused.
"""

from __future__ import annotations

import enum
import reprlib
from typing import Any


class ErrorCode(enum.StrEnum):
    BAD_FRAME = "BAD_FRAME"
    BAD_REQUEST = "BAD_REQUEST"
    UNKNOWN_OP = "UNKNOWN_OP"
    UNSUPPORTED_VERSION = "UNSUPPORTED_VERSION"
    NOT_FOUND = "NOT_FOUND"
    LEASE_LOST = "LEASE_LOST"
    TOO_LARGE = "TOO_LARGE"
    UNAUTHORIZED = "UNAUTHORIZED"
    FORBIDDEN = "FORBIDDEN"
    STORAGE_FULL = "STORAGE_FULL"
    QUOTA = "QUOTA"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    INTERNAL = "INTERNAL"


class SluiceError(Exception):
    """Base of every Sluice error. Errors a broker sends have a wire ``code``; errors a
    client raises on its own (connection closed, timed out) have ``code`` None.

    ``details`` carries structured extras (for example the ids a batch ack could not
    acknowledge); it is always a dict, empty when there is nothing to add.
    """

    code: ErrorCode | None = None

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details or {}

    def to_wire(self) -> dict[str, Any]:
        code = self.code or ErrorCode.INTERNAL
        wire: dict[str, Any] = {"code": code.value, "message": self.message}
        if self.details:
            wire["details"] = self.details
        return wire

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}" if self.code else self.message


class BadFrame(SluiceError):
    """The byte stream is not a sequence of valid frames; the connection is closed."""

    code = ErrorCode.BAD_FRAME


class BadRequest(SluiceError):
    """The frame decoded, but the request or its arguments are malformed."""

    code = ErrorCode.BAD_REQUEST


class UnknownOp(SluiceError):
    code = ErrorCode.UNKNOWN_OP


class UnsupportedVersion(SluiceError):
    """The hello named a protocol version this peer does not speak; the connection closes."""

    code = ErrorCode.UNSUPPORTED_VERSION


class NotFound(SluiceError):
    code = ErrorCode.NOT_FOUND


class LeaseLost(SluiceError):
    """The lease token is not the message's current lease; nothing was changed."""

    code = ErrorCode.LEASE_LOST


class TooLarge(SluiceError):
    """A frame over the negotiated maximum, or a body over the queue's max_body."""

    code = ErrorCode.TOO_LARGE


class Unauthorized(SluiceError):
    code = ErrorCode.UNAUTHORIZED


class Forbidden(SluiceError):
    code = ErrorCode.FORBIDDEN


class StorageFull(SluiceError):
    code = ErrorCode.STORAGE_FULL


class Quota(SluiceError):
    """A limit of the broker is reached (its connections, its queues); nothing was
    changed."""

    code = ErrorCode.QUOTA


class ShuttingDown(SluiceError):
    code = ErrorCode.SHUTTING_DOWN


class InternalError(SluiceError):
    code = ErrorCode.INTERNAL


ERROR_CLASSES: dict[ErrorCode | None, type[SluiceError]] = {
    cls.code: cls
    for cls in (
        BadFrame,
        BadRequest,
        UnknownOp,
        UnsupportedVersion,
        NotFound,
        LeaseLost,
        TooLarge,
        Unauthorized,
        Forbidden,
        StorageFull,
        Quota,
        ShuttingDown,
        InternalError,
    )
}


def error_from_wire(wire: Any) -> SluiceError:
    """Turn a wire error map into its exception; an unknown code becomes INTERNAL.

    Ensures: never raises, whatever ``wire`` holds.
    """
    # reprlib, not repr()/str(): a peer's value may nest deeper than the recursion limit.
    if not isinstance(wire, dict):
        return InternalError(f"malformed error from peer: {reprlib.repr(wire)}")
    code = wire.get("code")
    message = wire.get("message")
    details = wire.get("details")
    if not isinstance(message, str):
        message = reprlib.repr(message)
    try:
        if not isinstance(code, str):
            raise ValueError("error code is not a string")
        cls = ERROR_CLASSES[ErrorCode(code)]
    except ValueError:
        cls = InternalError
        message = f"{reprlib.repr(code)}: {message}"
    return cls(message, details if isinstance(details, dict) else None)
