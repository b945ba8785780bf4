"""The in-memory message record and the spec a put carries.

These are bookkeeping for the core, not the persisted format: the store keeps its own
versioned records and rebuilds these on recovery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, NamedTuple

from ._lifecycle import State

if TYPE_CHECKING:
    from ._queue import Queue

Headers = dict[str, str | int]
NOT_STORED: Final = -1  # ``Message.stored`` of a message the store has not written yet
RECOVERED: Final = 0  # ... of one read back by recovery (durable before this run began)


class PutSpec(NamedTuple):
    """One message of a put, already type-checked. ``None`` means "the queue's setting".
    (A named tuple: immutable, and built several times faster than a frozen dataclass,
    once per message put.)"""

    body: bytes
    priority: int = 0
    delay: float = 0.0
    max_attempts: int | None = None
    visibility_timeout: float | None = None
    headers: Headers | None = None
    key: str | None = None  # dedup key


class Message:
    """One message. ``seq`` is stamped from the core's counter each time the message enters
    a heap; a heap entry whose seq differs from the message's is stale. Among ready
    messages of equal priority, the lower seq became ready first."""

    __slots__ = (
        "attempts",
        "body",
        "dead_at",
        "dead_expires_at",
        "dead_reason",
        "due_at",
        "enqueued_at",
        "headers",
        "id",
        "key",
        "last_error",
        "lease_deadline",
        "lease_duration",
        "lease_token",
        "max_attempts",
        "priority",
        "progress",
        "queue",
        "ready_at",
        "reserved_at",
        "seq",
        "state",
        "stored",
        "visibility_timeout",
    )

    def __init__(self, message_id: int, queue: Queue, spec: PutSpec, now: float) -> None:
        self.id = message_id
        self.queue = queue
        self.body = spec.body
        self.priority = spec.priority
        self.headers = spec.headers
        self.key = spec.key
        self.progress: tuple[float, str] | None = None  # (percent, note) from the handler
        self.max_attempts = spec.max_attempts
        self.visibility_timeout = spec.visibility_timeout
        self.enqueued_at = now
        self.state = State.NEW
        self.seq = 0
        self.attempts = 0
        self.due_at: float | None = None
        self.lease_token: int | None = None
        self.lease_deadline: float | None = None
        self.lease_duration = 0.0
        self.last_error: str | None = None
        self.dead_reason: str | None = None
        self.dead_at: float | None = None
        self.dead_expires_at: float | None = None  # None: kept until replayed or purged
        # The number of the store batch that wrote its body (its put), or NOT_STORED.
        self.stored = NOT_STORED
        # In memory only, for metrics: when it last became ready, and was last reserved.
        self.ready_at = now
        self.reserved_at = now

    def restore_times(self) -> None:
        """After recovery, set the times the store does not keep: ``ready_at`` to
        ``enqueued_at`` (so a recovered backlog never looks younger than it is), and
        ``reserved_at`` to when the current lease started or was last touched."""
        self.ready_at = self.enqueued_at
        deadline = self.lease_deadline
        self.reserved_at = self.enqueued_at if deadline is None else deadline - self.lease_duration

    @property
    def effective_max_attempts(self) -> int | None:
        if self.max_attempts is not None:
            return self.max_attempts
        return self.queue.settings.max_attempts

    def delivery(self) -> dict[str, Any]:
        """The wire form handed to a consumer by reserve."""
        wire: dict[str, Any] = {
            "id": self.id,
            "queue": self.queue.name,
            "body": self.body,
            "priority": self.priority,
            "attempts": self.attempts,
            "max_attempts": self.effective_max_attempts,
            "enqueued_at": self.enqueued_at,
            "lease": self.lease_token,
            "lease_deadline": self.lease_deadline,
        }
        if self.headers:
            wire["headers"] = self.headers
        return wire

    def status(self) -> dict[str, Any]:
        """Everything but the body, for ``status`` and dead-letter listings."""
        wire: dict[str, Any] = {
            "id": self.id,
            "queue": self.queue.name,
            "state": self.state.value,
            "priority": self.priority,
            "attempts": self.attempts,
            "max_attempts": self.effective_max_attempts,
            "enqueued_at": self.enqueued_at,
            "due_at": self.due_at,
            "lease_deadline": self.lease_deadline,
            "last_error": self.last_error,
            "dead_reason": self.dead_reason,
            "dead_at": self.dead_at,
            "headers": self.headers or {},
            "body_size": len(self.body),
        }
        if self.key is not None:
            wire["key"] = self.key
        if self.progress is not None:
            wire["progress"] = {"percent": self.progress[0], "note": self.progress[1]}
        return wire
