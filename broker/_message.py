"""The in-memory message record and the spec a put carries.

These are bookkeeping for the core, not the persisted format: the store keeps its own
versioned records and rebuilds these on recovery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Generic, NamedTuple, TypeVar, overload

from ._lifecycle import DELAYED, NEW, RESERVED

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


_new_tuple = tuple.__new__


def plain_spec(body: bytes) -> PutSpec:
    """``PutSpec(body=body)``: every option left to the queue. Built without the named
    tuple's keyword ``__new__``, which takes 2.5 times as long, once per message put.
    (The fields' defaults in order; a test checks it equals ``PutSpec(body=body)``.)"""
    return _new_tuple(PutSpec, (body, 0, 0.0, None, None, None, None))


class Rare:
    """What most messages never set, kept apart so that an ordinary message pays one slot
    for all of it: its put's options, and what retries, dead letters and progress reports
    note. Every field is None until set."""

    __slots__ = (
        "dead_at",
        "dead_expires_at",
        "dead_reason",
        "headers",
        "key",
        "last_error",
        "max_attempts",
        "progress",
        "visibility_timeout",
    )

    def __init__(self) -> None:
        self.max_attempts: int | None = None
        self.visibility_timeout: float | None = None
        self.headers: Headers | None = None
        self.key: str | None = None  # dedup key
        self.last_error: str | None = None
        self.dead_reason: str | None = None
        self.dead_at: float | None = None
        self.dead_expires_at: float | None = None  # None: kept until replayed or purged
        self.progress: tuple[float, str] | None = None  # (percent, note) from the handler


T = TypeVar("T")


class _Rarely(Generic[T]):
    """A ``Message`` attribute held in its ``rare`` record: reading it on a message
    without one gives None, and setting None on such a message stores nothing."""

    __slots__ = ("name",)

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, message: None, owner: type) -> _Rarely[T]: ...

    @overload
    def __get__(self, message: Message, owner: type) -> T: ...

    def __get__(self, message: Message | None, owner: type) -> T | _Rarely[T]:
        if message is None:
            return self
        rare = message.rare
        return None if rare is None else getattr(rare, self.name)  # type: ignore[return-value]

    def __set__(self, message: Message, value: T) -> None:
        rare = message.rare
        if rare is None:
            if value is None:
                return
            rare = message.rare = Rare()
        setattr(rare, self.name, value)


class Message:
    """One message. ``seq`` is stamped from the core's counter each time the message enters
    a heap, never the same one twice; a heap entry whose seq differs from the message's is
    stale. Among ready messages of equal priority, the lower seq became ready first; the
    messages of one put share one seq (one int for all), and the lower id goes first.

    Fields most messages never set live in ``rare`` (None until one is): reading them
    here works the same, and a plain message is 9 slots smaller (72 bytes)."""

    __slots__ = (
        "attempts",
        "body",
        "deadline",
        "enqueued_at",
        "id",
        "lease_duration",
        "lease_token",
        "priority",
        "queue",
        "rare",
        "seq",
        "since",
        "state",
        "stored",
    )

    max_attempts: _Rarely[int | None] = _Rarely()
    visibility_timeout: _Rarely[float | None] = _Rarely()
    headers: _Rarely[Headers | None] = _Rarely()
    key: _Rarely[str | None] = _Rarely()
    last_error: _Rarely[str | None] = _Rarely()
    dead_reason: _Rarely[str | None] = _Rarely()
    dead_at: _Rarely[float | None] = _Rarely()
    dead_expires_at: _Rarely[float | None] = _Rarely()
    progress: _Rarely[tuple[float, str] | None] = _Rarely()

    def __init__(self, message_id: int, queue: Queue, spec: PutSpec, now: float) -> None:
        self.id = message_id
        self.queue = queue
        self.body = spec.body
        self.priority = spec.priority
        self.rare: Rare | None = None
        if (
            spec.max_attempts is not None
            or spec.visibility_timeout is not None
            or spec.headers is not None
            or spec.key is not None
        ):
            rare = self.rare = Rare()
            rare.max_attempts, rare.visibility_timeout = spec.max_attempts, spec.visibility_timeout
            rare.headers, rare.key = spec.headers, spec.key
        self.enqueued_at = now
        self.state = NEW
        self.seq = 0
        self.attempts = 0
        # When it falls due (delayed) or its lease runs out (reserved); None otherwise.
        # One field for both, as a message is never delayed and reserved at once.
        self.deadline: float | None = None
        self.lease_token: int | None = None
        self.lease_duration = 0.0
        # The number of the store batch that wrote its body (its put), or NOT_STORED.
        self.stored = NOT_STORED
        # In memory only, for metrics: when it entered its state, if ready (it became
        # ready) or reserved (it was leased); other states leave it as it was.
        self.since = now

    @property
    def due_at(self) -> float | None:
        """When a delayed message becomes ready (None in other states)."""
        return self.deadline if self.state is DELAYED else None

    @property
    def lease_deadline(self) -> float | None:
        """When a reserved message's lease runs out (None in other states)."""
        return self.deadline if self.state is RESERVED else None

    @property
    def effective_max_attempts(self) -> int | None:
        rare = self.rare
        if rare is not None and rare.max_attempts is not None:
            return rare.max_attempts
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
            "lease_deadline": self.deadline,  # (delivered: reserved)
        }
        rare = self.rare
        if rare is not None and rare.headers:
            wire["headers"] = rare.headers
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
