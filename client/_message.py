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
        return cls(
            id=wire["id"],
            queue=wire["queue"],
            body=wire["body"],
            priority=wire.get("priority", 0),
            attempts=wire.get("attempts", 0),
            max_attempts=wire.get("max_attempts"),
            headers=wire.get("headers") or {},
            enqueued_at=wire.get("enqueued_at", 0.0),
            lease=wire["lease"],
            lease_deadline=wire.get("lease_deadline", 0.0),
        )
