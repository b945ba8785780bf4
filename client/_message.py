"""A delivered message as the client sees it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True, kw_only=True)
class Message:
    """One delivery: the message plus the lease that lets this consumer ack it.

    ``lease`` names this delivery; once the lease expires (at ``lease_deadline``, epoch
    seconds) the message may be handed to someone else and acking it raises ``LeaseLost``.
    """

    id: int
    queue: str
    body: bytes
    priority: int = 0
    attempts: int = 0
    max_attempts: int | None = None
    headers: dict[str, str | int] = field(default_factory=dict)
    enqueued_at: float = 0.0
    lease: int = 0
    lease_deadline: float = 0.0

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Message:
        # Every field set here, as __init__ would: half the cost of its keyword call,
        # paid for each message delivered. A missing id, queue, body or lease: KeyError.
        # (A subclass may have fields of its own: its __init__ sets their defaults.)
        get = wire.get
        message = _new(cls) if cls is Message else cls(id=0, queue="", body=b"")
        message.id, message.queue, message.body = wire["id"], wire["queue"], wire["body"]
        message.priority = get("priority", 0)
        message.attempts = get("attempts", 0)
        message.max_attempts = get("max_attempts")
        message.headers = get("headers") or {}
        message.enqueued_at = get("enqueued_at", 0.0)
        message.lease = wire["lease"]
        message.lease_deadline = get("lease_deadline", 0.0)
        return message


_new = object.__new__
