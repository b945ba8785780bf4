"""Every error the client raises.

Errors the broker sends arrive as the class named by their wire code (``LeaseLost`` for
``LEASE_LOST``, and so on); all derive from ``SluiceError``. Failures the client detects
itself derive from ``ClientError`` (also a ``SluiceError``, with ``code`` None).
"""

from __future__ import annotations

from typing import Any

from protocol import (
    ERROR_CLASSES,
    BadFrame,
    BadRequest,
    ErrorCode,
    Forbidden,
    InternalError,
    LeaseLost,
    NotFound,
    Quota,
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


class BrokerUnavailable(ConnectionClosed):
    """No broker answered at the address: the connection was refused or could not be
    opened (nothing was sent). A ``ConnectionClosed``, so code catching that still works."""


class Timeout(ClientError, TimeoutError):
    """No reply within the client's timeout (the request may still be applied), or no
    job result within the time asked for (the job stays queued)."""


class JobFailed(ClientError):
    """The job a result was awaited for will never have one: it was dead-lettered
    (``reason``, ``last_error``), or removed (cancelled, purged)."""

    def __init__(self, outcome: dict[str, Any]) -> None:
        self.id: int | None = outcome.get("id")
        self.state: str = outcome.get("state", "gone")
        self.reason: str | None = outcome.get("dead_reason")
        self.last_error: str | None = outcome.get("last_error")
        what = "was dead-lettered" if self.state == "dead" else "was removed"
        text = f"job {self.id} {what}"
        if self.reason:
            text += f": {self.reason}"
        if self.last_error:
            text += f" (last error: {self.last_error})"
        super().__init__(text, dict(outcome))


class Lagged(ClientError):
    """A subscription fell behind and ended: the broker could not hand it a message (its
    connection's buffer was full), or the application left ``MAX_INBOX`` messages untaken.
    Messages after that point were not delivered to it; subscribe again to go on. For job
    events, ``seq`` is the first event it did not get: subscribe with ``from_seq=seq``."""

    def __init__(self, channel: str | None, seq: int | None = None) -> None:
        self.channel = channel
        self.seq = seq
        where = f" at a message on {channel!r}" if channel else ""
        if seq is not None:
            where += f" at event {seq}"
        again = "subscribe again" if seq is None else f"subscribe again with from_seq={seq}"
        super().__init__(f"the subscription fell behind{where} and ended; {again}")


__all__ = [
    "BrokerUnavailable",
    "ERROR_CLASSES",
    "BadFrame",
    "BadRequest",
    "ClientError",
    "ConnectionClosed",
    "ErrorCode",
    "Forbidden",
    "InternalError",
    "JobFailed",
    "Lagged",
    "LeaseLost",
    "NotFound",
    "ShuttingDown",
    "SluiceError",
    "Quota",
    "StorageFull",
    "Timeout",
    "TooLarge",
    "Unauthorized",
    "UnknownOp",
    "UnsupportedVersion",
]
