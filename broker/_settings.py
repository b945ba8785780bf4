"""Per-queue settings and retry backoff. Values are validated on the way in; a bad value
raises ``BadRequest`` that names the setting and the accepted range."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Final

from protocol import BadRequest, shown

from ._limits import RateLimit

MAX_DURATION: Final = 14 * 24 * 3600.0  # the longest delay, lease, ttl or window accepted
MAX_BODY_LIMIT: Final = 64 * 1024 * 1024
MIN_LEASE: Final = 0.001  # seconds: the shortest visibility timeout (or touch) accepted


def _number(
    name: str, value: Any, *, low: float, high: float, low_open: bool = False, op: str = ""
) -> float:
    """``value`` as a float if it is a finite number in range, else ``BadRequest`` naming
    ``op: name`` (or ``name``) and the range. The accepting path builds no text."""
    exact = type(value) is float or type(value) is int
    if exact and low <= value <= high and not (low_open and value == low):
        return float(value)
    where = f"{op}: {name}" if op else name
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequest(f"{where} must be a number, got {shown(value)}")
    if value < low or (low_open and value == low) or value > high:
        bracket = "(" if low_open else "["
        raise BadRequest(f"{where} must be in {bracket}{low}, {high}], got {shown(value)}")
    return float(value)


def _integer(name: str, value: Any, *, low: int, high: int, op: str = "") -> int:
    """``value`` if it is an int (not a bool) in ``[low, high]``, else ``BadRequest``."""
    if type(value) is int and low <= value <= high:
        return value
    where = f"{op}: {name}" if op else name
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{where} must be an integer, got {shown(value)}")
    if not low <= value <= high:
        raise BadRequest(f"{where} must be in [{low}, {high}], got {shown(value)}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """Delay before retry number ``attempts`` (1-based): ``base * factor**(attempts-1)``,
    scaled by a uniform factor in ``[1-jitter, 1+jitter]``, then capped at ``cap``.
    ``kind="fixed"`` is the same with factor 1."""

    kind: str = "exponential"
    base: float = 1.0
    factor: float = 2.0
    cap: float = 600.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in ("exponential", "fixed"):
            raise BadRequest(
                f"backoff type must be 'exponential' or 'fixed', got {shown(self.kind)}"
            )
        # Stored as floats whatever number type came in, so they echo back as floats.
        set_field = object.__setattr__
        set_field(self, "base", _number("backoff base", self.base, low=0, high=MAX_DURATION))
        set_field(self, "factor", _number("backoff factor", self.factor, low=1, high=100))
        set_field(self, "cap", _number("backoff cap", self.cap, low=0, high=MAX_DURATION))
        set_field(self, "jitter", _number("backoff jitter", self.jitter, low=0, high=1))

    def delay(self, attempts: int, unit_random: float) -> float:
        """Seconds to wait; ``unit_random`` is a draw from [0, 1). Ensures a finite result
        in [0, cap] for any number of attempts (jitter never lifts it over the cap)."""
        growth = 1.0 if self.kind == "fixed" else self.factor
        exponent = max(0, attempts - 1)
        try:
            raw = self.base * growth**exponent
        except OverflowError:  # factor**exponent beyond float range: past any cap
            raw = math.inf
        jittered = raw * (1.0 + self.jitter * (2.0 * unit_random - 1.0))
        return max(0.0, min(jittered, self.cap))

    def to_wire(self) -> dict[str, Any]:
        if self.kind == "fixed":
            return {"type": "fixed", "delay": self.base, "jitter": self.jitter}
        return {
            "type": "exponential",
            "base": self.base,
            "factor": self.factor,
            "cap": self.cap,
            "jitter": self.jitter,
        }

    @classmethod
    def from_wire(cls, value: Any) -> Backoff:
        if not isinstance(value, dict):
            raise BadRequest("backoff must be a map with a 'type' of 'exponential' or 'fixed'")
        kind = value.get("type", "exponential")
        if kind == "fixed":
            allowed = {"type", "delay", "jitter"}
            fields = {"kind": "fixed", "base": value.get("delay", 1.0), "factor": 1.0}
            fields["cap"] = MAX_DURATION
        else:
            allowed = {"type", "base", "factor", "cap", "jitter"}
            fields = {"kind": kind}
            fields.update({k: value[k] for k in ("base", "factor", "cap") if k in value})
        unknown = set(value) - allowed
        if unknown:
            raise BadRequest(
                f"unknown backoff fields {shown(sorted(unknown, key=repr))}; "
                f"allowed: {sorted(allowed)}"
            )
        if "jitter" in value:
            fields["jitter"] = value["jitter"]
        elif kind == "fixed":
            fields["jitter"] = 0.0
        return cls(**fields)


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueSettings:
    """Persisted per queue; changed with ``configure``. Durations are seconds."""

    visibility_timeout: float = 30.0
    max_attempts: int | None = 5  # None: retry forever
    backoff: Backoff = Backoff()
    paused: bool = False
    max_body: int = 1024 * 1024
    dead_letter_ttl: float | None = 7 * 24 * 3600.0  # None: keep dead letters until purged
    result_ttl: float = 3600.0
    dedup_window: float = 300.0
    rate_limit: RateLimit | None = None  # a token bucket over every consumer (_limits)
    max_in_flight: int | None = None  # at most this many of the queue's messages reserved

    @property
    def limited(self) -> bool:
        return self.rate_limit is not None or self.max_in_flight is not None

    def to_wire(self) -> dict[str, Any]:
        wire = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        wire["backoff"] = self.backoff.to_wire()
        wire["rate_limit"] = self.rate_limit.to_wire() if self.rate_limit is not None else None
        return wire

    def updated(self, changes: Any) -> QueueSettings:
        """A copy with ``changes`` (a wire map) applied; raises ``BadRequest`` on any bad
        name or value, in which case nothing is applied."""
        if not isinstance(changes, dict):
            raise BadRequest("settings must be a map of setting name to value")
        fields = {}
        for name, value in changes.items():
            parse = _SETTING_PARSERS.get(name)
            if parse is None:
                known = sorted(_SETTING_PARSERS)
                raise BadRequest(f"unknown setting {shown(name)}; known: {known}")
            fields[name] = parse(value)
        return dataclasses.replace(self, **fields)


# A fresh queue's settings: one shared object, so that most checks for defaults are `is`.
DEFAULT_SETTINGS: Final = QueueSettings()


def _optional(parse: Any) -> Any:
    return lambda value: None if value is None else parse(value)


def _bool(name: str) -> Any:
    def parse(value: Any) -> bool:
        if not isinstance(value, bool):
            raise BadRequest(f"{name} must be true or false, got {shown(value)}")
        return value

    return parse


_SETTING_PARSERS: Final[dict[str, Any]] = {
    "visibility_timeout": lambda v: _number(
        "visibility_timeout", v, low=MIN_LEASE, high=MAX_DURATION
    ),
    "max_attempts": _optional(lambda v: _integer("max_attempts", v, low=1, high=2**31 - 1)),
    "backoff": Backoff.from_wire,
    "paused": _bool("paused"),
    "max_body": lambda v: _integer("max_body", v, low=1, high=MAX_BODY_LIMIT),
    "dead_letter_ttl": _optional(
        lambda v: _number("dead_letter_ttl", v, low=0, high=MAX_DURATION, low_open=True)
    ),
    "result_ttl": lambda v: _number("result_ttl", v, low=0, high=MAX_DURATION),
    "dedup_window": lambda v: _number("dedup_window", v, low=0, high=MAX_DURATION),
    "rate_limit": _optional(RateLimit.from_wire),
    "max_in_flight": _optional(lambda v: _integer("max_in_flight", v, low=1, high=2**31 - 1)),
}

number_in_range = _number
integer_in_range = _integer
