"""Rate limits and concurrency caps of a queue: the settings, and the in-memory state that
enforces them at reserve. No I/O, no clock of its own: every call takes ``now``.

A rate limit is a token bucket shared by every consumer of the queue: ``burst`` tokens when
full, one more every ``per / rate`` seconds, one taken per message delivered. So over any
window of T seconds a queue delivers at most ``burst + rate * T / per`` messages. The bucket
is not persisted: a restarted broker starts it full.

``max_in_flight`` caps the messages of the queue reserved at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

from protocol import BadRequest, shown

MAX_RATE: Final = 1e9
MAX_PER: Final = 14 * 24 * 3600.0
MAX_BURST: Final = 2**31 - 1


@dataclass(frozen=True, slots=True)
class RateLimit:
    """``rate`` messages per ``per`` seconds, at most ``burst`` at once."""

    rate: float
    per: float
    burst: int

    @property
    def interval(self) -> float:
        """Seconds between two tokens."""
        return self.per / self.rate

    def to_wire(self) -> dict[str, Any]:
        return {"rate": self.rate, "per": self.per, "burst": self.burst}

    @classmethod
    def from_wire(cls, value: Any) -> RateLimit:
        """From ``{"rate": N, "per": seconds, "burst": B}``; ``per`` defaults to 1 and
        ``burst`` to the rate rounded up (at least 1). Raises ``BadRequest`` naming the
        field."""
        if not isinstance(value, dict):
            raise BadRequest(
                'rate_limit must be a map like {"rate": 10, "per": 1, "burst": 10}, or null '
                f"to turn it off; got {shown(value)}"
            )
        unknown = set(value) - {"rate", "per", "burst"}
        if unknown:
            raise BadRequest(
                f"unknown rate_limit fields {shown(sorted(unknown, key=repr))}; "
                "allowed: ['burst', 'per', 'rate']"
            )
        if "rate" not in value:
            raise BadRequest("rate_limit needs a rate (messages per 'per' seconds)")
        rate = _positive("rate_limit.rate", value["rate"], MAX_RATE)
        per = _positive("rate_limit.per", value.get("per", 1.0), MAX_PER)
        burst = value.get("burst", max(1, math.ceil(rate)))
        if isinstance(burst, bool) or not isinstance(burst, int) or not 1 <= burst <= MAX_BURST:
            raise BadRequest(
                f"rate_limit.burst must be an integer in [1, {MAX_BURST}], got {shown(burst)}"
            )
        return cls(rate, per, burst)


def _positive(name: str, value: Any, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{name} must be a number, got {shown(value)}")
    if not 0 < value <= high:
        raise BadRequest(f"{name} must be in (0, {high}], got {shown(value)}")
    return float(value)


class Bucket:
    """A token bucket, kept as the time ``base`` from which it has been filling: at ``now``
    it holds the largest ``k <= burst`` with ``base + k * interval <= now``. Taking a token
    moves ``base`` on by one interval. The next token is due at exactly the time
    ``available`` first counts it, so a consumer woken then is served then."""

    __slots__ = ("base", "burst", "interval")

    def __init__(self, limit: RateLimit, now: float) -> None:
        self.burst = limit.burst
        self.interval = limit.interval
        self.base = now - limit.burst * self.interval  # full

    def available(self, now: float) -> int:
        """Whole tokens available at ``now`` (a full bucket stops filling)."""
        full_from = now - self.burst * self.interval
        if self.base <= full_from:
            self.base = full_from
            return self.burst
        base, interval = self.base, self.interval
        count = min(self.burst, max(0, int((now - base) / interval)))
        while count < self.burst and base + (count + 1) * interval <= now:
            count += 1
        while count > 0 and base + count * interval > now:
            count -= 1
        return count

    def take(self, count: int) -> None:
        """Spend ``count`` tokens (the caller took no more than ``available``)."""
        self.base += count * self.interval

    def next_token_at(self, now: float) -> float:
        """When the next token beyond those available at ``now`` comes due."""
        return self.base + (self.available(now) + 1) * self.interval


class Limits:
    """The enforcement state of a queue that has a rate limit, a concurrency cap or both.
    ``wake_at``/``wake_seq``: the core's timer entry that serves the queue's waiters when
    its next token comes due (one per queue at most). ``blocked_since``: when a reserve
    last found the queue's ready messages held back by a limit (None: not held back since
    its last delivery); ``blocked_seconds`` sums such spells, ``parked`` counts long-polls
    that had to wait because of a limit."""

    __slots__ = (
        "blocked_seconds",
        "blocked_since",
        "bucket",
        "max_in_flight",
        "parked",
        "rate_limit",
        "wake_at",
        "wake_seq",
    )

    def __init__(self, rate_limit: RateLimit | None, max_in_flight: int | None, now: float):
        self.rate_limit = rate_limit
        self.bucket = Bucket(rate_limit, now) if rate_limit is not None else None
        self.max_in_flight = max_in_flight
        self.wake_at: float | None = None
        self.wake_seq = 0
        self.blocked_since: float | None = None
        self.blocked_seconds = 0.0
        self.parked = 0

    def quota(self, now: float, reserved: int) -> int:
        """How many messages the queue may deliver at ``now`` with ``reserved`` leased."""
        allowed = MAX_BURST
        if self.max_in_flight is not None:
            allowed = max(0, self.max_in_flight - reserved)
        if self.bucket is not None and allowed > 0:
            allowed = min(allowed, self.bucket.available(now))
        return allowed

    def delivered(self, count: int, now: float) -> None:
        """``count`` (> 0) messages went out: spend their tokens, end a blocked spell."""
        if self.bucket is not None:
            self.bucket.take(count)
        if self.blocked_since is not None:
            self.blocked_seconds += now - self.blocked_since
            self.blocked_since = None

    def blocked(self, now: float) -> None:
        if self.blocked_since is None:
            self.blocked_since = now

    def stats(self, now: float, reserved: int) -> dict[str, Any]:
        held = self.blocked_seconds
        if self.blocked_since is not None:
            held += now - self.blocked_since
        return {
            "tokens": self.bucket.available(now) if self.bucket is not None else None,
            "in_flight": reserved,
            "max_in_flight": self.max_in_flight,
            "throttled_seconds": held,
            "parked_by_limit": self.parked,
        }
