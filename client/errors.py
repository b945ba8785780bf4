"""Every error the client raises.

Errors the broker sends arrive as the class named by their wire code (``LeaseLost`` for
``LEASE_LOST``, and so on); all derive from ``SluiceError``. Failures the client detects
itself derive from ``ClientError`` (also a ``SluiceError``, with ``code`` None).
"""

from __future__ import annotations

from protocol import (
    ERROR_CLASSES,
    BadFrame,
    BadRequest,
    ErrorCode,
    Forbidden,
    InternalError,
    LeaseLost,
    NotFound,
    ShuttingDown,
    SluiceError,
    StorageFull,
    TooLarge,
    Unauthorized,
    UnknownOp,
    UnsupportedVersion,
)


class ClientError(SluiceError):
    """Raised by the client itself, not sent by a broker."""


class ConnectionClosed(ClientError, ConnectionError):
    """The connection to the broker closed (or could not be opened). A request in flight
    may or may not have been applied by the broker."""


class Timeout(ClientError, TimeoutError):
    """No reply within the client's timeout. The request may still be applied."""


__all__ = [
    "ERROR_CLASSES",
    "BadFrame",
    "BadRequest",
    "ClientError",
    "ConnectionClosed",
    "ErrorCode",
    "Forbidden",
    "InternalError",
    "LeaseLost",
    "NotFound",
    "ShuttingDown",
    "SluiceError",
    "StorageFull",
    "Timeout",
    "TooLarge",
    "Unauthorized",
    "UnknownOp",
    "UnsupportedVersion",
]
