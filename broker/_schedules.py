"""Recurring schedules: what a schedule is, when it fires, and what each fire puts. Pure:
no I/O and no clock of its own; the core keeps the schedules and fires them from its one
timer.

A schedule belongs to a queue and has a name. It fires on the slots of its recurrence: a
cron expression in an IANA time zone (evaluated by cronsim, which follows Debian cron
across DST changes: a local time that does not exist fires at the first valid minute after
it, one that happens twice fires once), or every N seconds from an anchor (its
``start_at``, or the moment it was created). Each fire puts one message whose dedup key is
``schedule:<name>:<slot>`` (the slot as a UTC time), with headers ``schedule`` and
``scheduled_for``; ``last_slot`` is persisted with the fire, so a slot never fires twice.
"""

from __future__ import annotations

import math
import zoneinfo
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from cronsim import CronSim, CronSimError

from protocol import PRIORITY_RANGE, BadRequest, shown

from ._message import Headers, PutSpec

FIRE_HEADERS: Final = ("schedule", "scheduled_for")  # the headers each fire adds
MIN_EVERY: Final = 0.1  # seconds
MAX_EVERY: Final = 366 * 24 * 3600.0
MAX_CATCHUP: Final = 1000  # slots fired at most by catchup="all"
MAX_COUNTED: Final = 10_000  # missed slots counted one by one, at most, per catch-up
RECENT_WINDOW: Final = 24 * 3600.0  # when more are missed: where to look for the recent
CATCHUP_MODES: Final = ("latest", "skip", "all")
OVERLAP_MODES: Final = ("allow", "skip")
MAX_TIME: Final = 253402300799.0  # 9999-12-31T23:59:59Z
ALIASES: Final = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}
FIELDS: Final = frozenset(
    {
        "body",
        "cron",
        "every",
        "tz",
        "priority",
        "headers",
        "max_attempts",
        "start_at",
        "end_at",
        "limit",
        "catchup",
        "overlap",
    }
)


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    """What the user asked for (validated): the message to put and when. ``headers`` are
    the user's own; each fire adds ``schedule`` and ``scheduled_for``."""

    body: bytes
    cron: str | None = None
    every: float | None = None
    tz: str = "UTC"
    priority: int = 0
    headers: Headers | None = None
    max_attempts: int | None = None
    start_at: float | None = None
    end_at: float | None = None
    limit: int | None = None
    catchup: str = "latest"
    overlap: str = "allow"

    def to_wire(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def parse_spec(fields: dict[str, Any], where: str = "schedule") -> ScheduleSpec:
    """A ``ScheduleSpec`` from its wire fields (already checked for unknown names and a
    bytes body), or ``BadRequest`` naming the field at fault."""
    cron, every = fields.get("cron"), fields.get("every")
    if (cron is None) == (every is None):
        raise BadRequest(f"{where}: give exactly one of cron or every")
    tz = fields.get("tz", "UTC")
    if cron is not None:
        cron = _cron(where, cron)
        zone = _zone(where, tz)
        _check_cron(where, cron, zone)
    else:
        every = _number(f"{where}: every", every, MIN_EVERY, MAX_EVERY)
        _zone(where, tz)
    start_at = _optional_time(where, "start_at", fields.get("start_at"))
    end_at = _optional_time(where, "end_at", fields.get("end_at"))
    if start_at is not None and end_at is not None and end_at < start_at:
        raise BadRequest(f"{where}: end_at ({end_at}) is before start_at ({start_at})")
    return ScheduleSpec(
        body=fields["body"],
        cron=cron,
        every=every,
        tz=tz,
        priority=_integer(where, "priority", fields.get("priority", 0), *PRIORITY_RANGE),
        headers=fields.get("headers"),
        max_attempts=_optional_integer(where, "max_attempts", fields.get("max_attempts")),
        start_at=start_at,
        end_at=end_at,
        limit=_optional_integer(where, "limit", fields.get("limit")),
        catchup=_choice(where, "catchup", fields.get("catchup", "latest"), CATCHUP_MODES),
        overlap=_choice(where, "overlap", fields.get("overlap", "allow"), OVERLAP_MODES),
    )


# ------------------------------------------------------------------ slots


class Recurrence:
    """The slots of a spec, as UTC epoch seconds: ``after(t)`` is the first slot later
    than ``t``, within ``start_at`` .. ``end_at``. For ``every``, slot k is
    ``anchor + k * every`` (k >= 1 from the creation time, k >= 0 from a ``start_at``), so
    the same slot is always the same float."""

    __slots__ = ("anchor", "spec", "zone")

    def __init__(self, spec: ScheduleSpec, created_at: float) -> None:
        self.spec = spec
        self.anchor = spec.start_at if spec.start_at is not None else created_at
        self.zone = zoneinfo.ZoneInfo(spec.tz)

    def after(self, t: float) -> float | None:
        spec = self.spec
        if spec.start_at is not None and t < spec.start_at:
            t = math.nextafter(spec.start_at, -math.inf)  # start_at itself may be a slot
        slot = self._every_after(t) if spec.every is not None else self._cron_after(t)
        if slot is None or (spec.end_at is not None and slot > spec.end_at):
            return None
        return slot

    def _every_after(self, t: float) -> float:
        every = self.spec.every
        assert every is not None
        first = 0 if self.spec.start_at is not None else 1
        k = max(first, math.floor((t - self.anchor) / every) + 1)
        while self.anchor + k * every <= t:
            k += 1
        while k > first and self.anchor + (k - 1) * every > t:
            k -= 1
        return self.anchor + k * every

    def _cron_after(self, t: float) -> float | None:
        assert self.spec.cron is not None
        if t >= MAX_TIME:
            return None
        start = datetime.fromtimestamp(math.floor(t), self.zone)
        try:
            for moment in CronSim(self.spec.cron, start):
                slot = moment.timestamp()
                if slot > t:  # (the repeated hour of a DST change may yield a past time)
                    return slot if slot <= MAX_TIME else None
        except StopIteration:  # no slot within the next 50 years
            return None
        return None

    def missed(self, first: float, now: float) -> tuple[int, list[float]]:
        """The slots from ``first`` (itself a slot) up to ``now``: how many (counted one by
        one up to ``MAX_COUNTED``: more reads as that many) and the last ``MAX_CATCHUP``
        of them, oldest first."""
        every = self.spec.every
        if every is not None:  # by arithmetic, however many
            k_first = round((first - self.anchor) / every)
            k_last = k_first
            while self.anchor + (k_last + 1) * every <= now:  # (a step or two after the guess)
                k_last = max(k_last + 1, math.floor((now - self.anchor) / every) - 1)
            low = max(k_first, k_last - MAX_CATCHUP + 1)
            return k_last - k_first + 1, [self.anchor + k * every for k in range(low, k_last + 1)]
        count, recent = self._walk(first, now)
        if count >= MAX_COUNTED:  # a dense cron down for long: find the recent slots afresh
            recent = self._recent(now)
        return count, list(recent)

    def _recent(self, now: float) -> deque[float]:
        """The last ``MAX_CATCHUP`` slots up to ``now``, walked from a window back from
        ``now`` that doubles until it holds that many. A cron fires at most once a minute,
        so a day's window (1,440 at most) is walked whole, and each doubling at most
        doubles what is walked: every walk reaches ``now`` within ``MAX_COUNTED``."""
        window = RECENT_WINDOW
        while True:
            start = self.after(now - window)
            count, recent = self._walk(start, now) if start is not None else (0, deque())
            if count >= MAX_CATCHUP or window > MAX_TIME:
                return recent
            window *= 2

    def _walk(self, first: float, now: float) -> tuple[int, deque[float]]:
        recent: deque[float] = deque(maxlen=MAX_CATCHUP)
        count = 0
        slot: float | None = first
        while slot is not None and slot <= now and count < MAX_COUNTED:
            recent.append(slot)
            count += 1
            slot = self.after(slot)
        return count, recent


def slot_text(slot: float) -> str:
    """A slot as its UTC time, to the millisecond: ``2026-03-29T01:00:00.000Z``."""
    moment = datetime.fromtimestamp(slot, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def fire_spec(spec: ScheduleSpec, name: str, slot: float) -> PutSpec:
    """The message a fire for ``slot`` puts."""
    when = slot_text(slot)
    headers = {**(spec.headers or {}), FIRE_HEADERS[0]: name, FIRE_HEADERS[1]: when}
    return PutSpec(
        body=spec.body,
        priority=spec.priority,
        max_attempts=spec.max_attempts,
        headers=headers,
        key=f"schedule:{name}:{when}",
    )


# --------------------------------------------------------------- schedule


class Schedule:
    """A schedule and where it has got to. ``next_at``: its next slot (None: finished,
    by ``limit`` or ``end_at``); ``last_slot``: the newest slot fired; ``runs``: slots
    fired; ``triggered``: fires by ``trigger``; ``missed``: slots that came due while the
    broker was down; ``skipped``: slots not fired (catch-up or overlap); ``seq``: its
    entry in the core's timer."""

    __slots__ = (
        "created_at",
        "last_message_id",
        "last_slot",
        "missed",
        "name",
        "next_at",
        "queue",
        "recurrence",
        "runs",
        "seq",
        "skipped",
        "spec",
        "triggered",
    )

    def __init__(self, queue: str, name: str, spec: ScheduleSpec, created_at: float) -> None:
        self.queue = queue
        self.name = name
        self.spec = spec
        self.created_at = created_at
        self.recurrence = Recurrence(spec, created_at)
        self.next_at: float | None = None
        self.last_slot: float | None = None
        self.last_message_id: int | None = None
        self.runs = self.triggered = self.missed = self.skipped = 0
        self.seq = 0

    @property
    def key(self) -> tuple[str, str]:
        return self.queue, self.name

    def finished(self) -> bool:
        return self.spec.limit is not None and self.runs >= self.spec.limit

    def plan_after(self, t: float) -> None:
        """Set ``next_at`` to the first slot after ``t`` (and after ``last_slot``)."""
        if self.last_slot is not None and self.last_slot > t:
            t = self.last_slot
        self.next_at = None if self.finished() else self.recurrence.after(t)

    def to_wire(self) -> dict[str, Any]:
        wire = {"queue": self.queue, "name": self.name, **self.spec.to_wire()}
        wire.update(
            created_at=self.created_at,
            next_at=self.next_at,
            last_slot=self.last_slot,
            last_message_id=self.last_message_id,
            runs=self.runs,
            triggered=self.triggered,
            missed=self.missed,
            skipped=self.skipped,
        )
        return wire

    def state(self) -> list[Any]:
        """What is persisted besides the spec and creation time."""
        return [
            self.next_at,
            self.last_slot,
            self.last_message_id,
            self.runs,
            self.triggered,
            self.missed,
            self.skipped,
        ]

    @classmethod
    def restored(
        cls, queue: str, name: str, spec: ScheduleSpec, created_at: float, state: Any
    ) -> Schedule:
        schedule = cls(queue, name, spec, created_at)
        (
            schedule.next_at,
            schedule.last_slot,
            schedule.last_message_id,
            schedule.runs,
            schedule.triggered,
            schedule.missed,
            schedule.skipped,
        ) = state
        return schedule


# ------------------------------------------------------------- validation


def _cron(where: str, value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 200:
        raise BadRequest(f"{where}: cron must be a string like '30 2 * * *' or '@daily'")
    expression = ALIASES.get(value.strip().lower(), value.strip())
    if expression.startswith("@"):
        raise BadRequest(
            f"{where}: cron: unknown alias {shown(value)}; known: {', '.join(ALIASES)}"
        )
    if len(expression.split()) != 5:
        raise BadRequest(
            f"{where}: cron must have 5 fields (minute hour day-of-month month "
            f"day-of-week), got {shown(value)}"
        )
    return expression


def _check_cron(where: str, expression: str, zone: zoneinfo.ZoneInfo) -> None:
    try:
        CronSim(expression, datetime.now(zone))
    except CronSimError as error:  # names the field: "Bad minute", "Bad day-of-week"...
        raise BadRequest(f"{where}: cron {shown(expression)}: {str(error).lower()}") from None


def _zone(where: str, value: Any) -> zoneinfo.ZoneInfo:
    if not isinstance(value, str) or not 0 < len(value) <= 100:
        raise BadRequest(f"{where}: tz must be an IANA time zone name like 'Europe/Berlin'")
    try:
        return zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise BadRequest(
            f"{where}: tz: unknown time zone {shown(value)}; use an IANA name like "
            "'UTC', 'Europe/Berlin' or 'America/New_York'"
        ) from None


def _number(where: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequest(f"{where} must be a number, got {shown(value)}")
    if not low <= value <= high:
        raise BadRequest(f"{where} must be in [{low}, {high}] seconds, got {shown(value)}")
    return float(value)


def _optional_time(where: str, name: str, value: Any) -> float | None:
    if value is None:
        return None
    return _number(f"{where}: {name} (epoch seconds)", value, 0, MAX_TIME)


def _integer(where: str, name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(
            f"{where}: {name} must be an integer in [{low}, {high}], got {shown(value)}"
        )
    return value


def _optional_integer(where: str, name: str, value: Any) -> int | None:
    return None if value is None else _integer(where, name, value, 1, 2**31 - 1)


def _choice(where: str, name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise BadRequest(f"{where}: {name} must be one of {', '.join(allowed)}; got {shown(value)}")
    return str(value)


def iter_slots(recurrence: Recurrence, after: float) -> Iterator[float]:
    """Every slot after ``after``, in order (for tests and listings)."""
    slot = recurrence.after(after)
    while slot is not None:
        yield slot
        slot = recurrence.after(slot)
