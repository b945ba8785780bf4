"""A hypothesis state machine that drives ``broker.Core`` with a fake clock against a simple
reference model: plain dicts and lists, linear scans and sorting, no heaps.

The model follows the contract in DESIGN.md and the core's docstrings:
- ready order is (-priority, order in which the message became ready), across queues too;
- every call first applies everything due by ``now`` in time order, each event at its own
  time; at one instant a due message goes before a lease expiry, and both before a long-poll
  timeout; equal times within one kind go in the order they were scheduled;
- a lease expiry is a nack with no delay applied at the lease deadline (backoff from the
  deadline, or a dead letter if attempts are used up), then waiters are served at ``now``;
- waiters are served first come first served, with messages leased at the call's ``now``;
- a rate limit is a token bucket (exact fractions here) that starts full and is new when the
  limit changes; a queue out of tokens, or at ``max_in_flight``, delivers nothing and a
  multi-queue reserve takes from the others; a token coming due serves waiters held back
  by it (at one instant after lease expiries, before long-poll timeouts); any lease
  ending serves waiters held back by the cap. Only queue ``a`` is ever limited, with
  token intervals that floats hold exactly;
- a schedule every N seconds fires on ``created + k * N`` (k >= 1), each slot once: its
  message is put as any other, in time order with the other events (after token wakes,
  before long-poll timeouts); when slots were missed (more than one due, or one due for
  over a second) its ``catchup`` picks which fire; ``overlap="skip"`` skips a slot
  while the last message is not done or dead; a replaced schedule keeps its counters
  and last slot; ``trigger`` fires now. The machine never triggers on a slot, so no two
  fires share a dedup key;
- a queue exists while it is in use: while it has a message, settings other than the
  defaults, a schedule, a binding or a waiter. Queue ``d`` starts with the defaults, so
  it comes and goes; when it goes, its totals start again from zero. ``delete_queue``
  refuses a queue holding a message or a schedule unless forced; forced, or on a queue
  holding neither, it drops all of that, the queue's settings and the bindings into it,
  and answers the waiters on it (in the order they came) with nothing.

Lease tokens are opaque: the model numbers its own and the test maps them to the core's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from broker import Core, PutSpec, State
from broker._events import EventRing
from broker._lazyheap import LazyHeap
from broker._ready import ReadyIndex
from broker._schedules import parse_spec, slot_text
from broker._subjects import matches
from protocol import BadRequest, LeaseLost, NotFound, TooLarge

QUEUES = ("a", "b", "c", "d")  # d: default settings, forgotten whenever unused
START = 1_000.0
UNKNOWN_ID = 10**9
UNKNOWN_TOKEN = -1
TOTALS = ("put", "delivered", "acked", "nacked", "expired", "dead_lettered")
DEFAULT_DEAD_TTL = 7 * 24 * 3600.0

# Three queues that between them take every retry path: exponential backoff with a few
# attempts, zero backoff (straight back to ready) with unlimited attempts, and a fixed
# backoff with two attempts; short leases; each kind of dead-letter retention.
INITIAL_SETTINGS: dict[str, dict[str, Any]] = {
    "a": {"visibility_timeout": 8.0, "max_attempts": 3, "dead_letter_ttl": None},
    "b": {
        "visibility_timeout": 5.0,
        "max_attempts": None,
        "backoff": {"type": "fixed", "delay": 0},
        "dead_letter_ttl": 20.0,
    },
    "c": {
        "visibility_timeout": 6.0,
        "max_attempts": 2,
        "backoff": {"type": "fixed", "delay": 2.5},
        "max_body": 8,
    },
}

CONFIG_CHANGES: list[dict[str, Any]] = [
    {"max_attempts": 1},
    {"max_attempts": 2},
    {"max_attempts": None},
    {"backoff": {"type": "fixed", "delay": 0}},
    {"backoff": {"type": "fixed", "delay": 1.5}},
    {"backoff": {"type": "exponential"}},
    {"dead_letter_ttl": None},
    {"dead_letter_ttl": 5.0},
    {"visibility_timeout": 2.0},
    {"visibility_timeout": 8.0},
]

# Limits for queue "a": token intervals of 0.5, 2 and 0.25 s (exact in floats, as are the
# machine's times), caps of one and two.
LIMIT_CHANGES: list[dict[str, Any]] = [
    {"rate_limit": {"rate": 2, "per": 1, "burst": 2}},
    {"rate_limit": {"rate": 1, "per": 2, "burst": 1}},
    {"rate_limit": {"rate": 4, "per": 1, "burst": 3}},
    {"rate_limit": None},
    {"max_in_flight": 1},
    {"max_in_flight": 2},
    {"max_in_flight": None},
    {"rate_limit": {"rate": 1, "per": 2, "burst": 1}, "max_in_flight": 1},
    {"rate_limit": None, "max_in_flight": None},
]


@dataclass
class ModelBucket:
    """A token bucket in exact fractions: full at the start, one token per interval. It is
    kept as the time it has been filling from (``base``): at ``t`` it holds
    ``min(burst, floor((t - base) / interval))`` tokens. So what it holds is a function of
    the time alone, and asking at a later time than an event being applied (a serve at
    the tick's end) cannot move the next token's time."""

    interval: Fraction
    burst: int
    base: Fraction

    def available(self, now: float) -> int:
        return min(self.burst, math.floor((Fraction(now) - self.base) / self.interval))

    def take(self, now: float) -> None:
        full_from = Fraction(now) - self.burst * self.interval
        self.base = max(self.base, full_from) + self.interval

    def next_token(self) -> float:
        """When it next holds a token (meaningful while it holds none)."""
        return float(self.base + self.interval)


# ---------------------------------------------------------------------- model


SETTING_FIELDS = (
    *("visibility_timeout", "max_attempts", "backoff", "dead_letter_ttl", "max_body"),
    *("paused", "rate_limit", "max_in_flight"),
)


@dataclass
class ModelQueue:
    visibility_timeout: float = 30.0
    max_attempts: int | None = 5
    backoff: tuple[str, float] = ("exponential", 1.0)  # or ("fixed", delay)
    dead_letter_ttl: float | None = DEFAULT_DEAD_TTL
    max_body: int = 1024 * 1024
    paused: bool = False
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOTALS, 0))
    rate_limit: tuple[float, float, int] | None = None
    max_in_flight: int | None = None
    bucket: ModelBucket | None = None

    def configure(self, changes: dict[str, Any], now: float) -> None:
        for name, value in changes.items():
            if name == "rate_limit":
                limit = None if value is None else (value["rate"], value["per"], value["burst"])
                if limit != self.rate_limit:
                    self.rate_limit = limit
                    self.bucket = None if limit is None else self.full_bucket(limit, now)
            elif name == "backoff" and value["type"] == "fixed":
                self.backoff = ("fixed", float(value["delay"]))
            elif name == "backoff":
                self.backoff = ("exponential", float(value.get("base", 1.0)))
            else:
                setattr(self, name, value)

    @staticmethod
    def full_bucket(limit: tuple[float, float, int], now: float) -> ModelBucket:
        rate, per, burst = limit
        interval = Fraction(per) / Fraction(rate)
        return ModelBucket(interval, burst, Fraction(now) - burst * interval)

    def configured(self) -> bool:
        """True if any setting differs from a new queue's."""
        fresh = ModelQueue()
        return any(getattr(self, name) != getattr(fresh, name) for name in SETTING_FIELDS)

    def backoff_delay(self, attempts: int) -> float:
        """With a jitter draw of 0.5 the jitter factor is exactly 1."""
        kind, base = self.backoff
        if kind == "fixed":
            return base
        return min(base * 2.0 ** (attempts - 1), 600.0)


@dataclass
class ModelMessage:
    id: int
    queue: str
    priority: int
    max_attempts: int | None
    visibility_timeout: float | None
    enqueued_at: float
    body_size: int
    state: str = "new"
    order: int = 0  # when it entered its current state's schedule (ready, delayed, lease)
    attempts: int = 0
    due_at: float | None = None
    token: int | None = None
    lease_deadline: float | None = None
    lease_duration: float = 0.0
    last_error: str | None = None
    dead_reason: str | None = None
    dead_at: float | None = None
    dead_expires_at: float | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    key: str | None = None


@dataclass
class ModelSchedule:
    queue: str
    name: str
    every: float
    catchup: str
    overlap: str
    limit: int | None
    created_at: float
    next_at: float | None = None
    last_slot: float | None = None
    last_message_id: int | None = None
    runs: int = 0
    triggered: int = 0
    missed: int = 0
    skipped: int = 0
    order: int = 0

    def plan_after(self, t: float) -> None:
        if self.last_slot is not None and self.last_slot > t:
            t = self.last_slot
        if self.limit is not None and self.runs >= self.limit:
            self.next_at = None
            return
        k = 1
        while self.created_at + k * self.every <= t:
            k += 1
        self.next_at = self.created_at + k * self.every

    def listed(self) -> tuple[Any, ...]:
        return (
            self.queue,
            self.name,
            self.next_at,
            self.last_slot,
            self.last_message_id,
            self.runs,
            self.triggered,
            self.missed,
            self.skipped,
        )


@dataclass
class ModelWaiter:
    key: int
    queues: list[str]
    max_messages: int
    visibility_timeout: float | None
    deadline: float
    order: int


class Model:
    def __init__(self) -> None:
        self.queues = {name: ModelQueue() for name in QUEUES}
        self.messages: dict[int, ModelMessage] = {}
        self.waiters: list[ModelWaiter] = []  # in the order they started waiting
        self.completions: list[tuple[int, list[tuple[int, int]]]] = []  # key, (id, token)
        self.next_id = 1
        self.next_token = 1
        self.counter = 0
        self.schedules: dict[tuple[str, str], ModelSchedule] = {}
        self.fire_keys: set[tuple[str, str]] = set()  # (queue, dedup key) of every fire
        self.bindings: set[tuple[str, str]] = set()  # (pattern, queue)

    def bound_queues(self, channel: str) -> list[str]:
        return sorted({queue for pattern, queue in self.bindings if matches(pattern, channel)})

    def _next_order(self) -> int:
        self.counter += 1
        return self.counter

    # ------------------------------------------------------------ time

    def tick(self, now: float) -> None:
        while (event := self._earliest_event(now)) is not None:
            time, kind, _, subject = event
            if kind == 0:
                self._make_ready(subject)
                self._serve([subject.queue], now)
            elif kind == 1:
                self._clear_lease(subject)
                self.queues[subject.queue].totals["expired"] += 1
                self._retry(subject, time, None, "lease expired")
                self._serve([subject.queue], now)
            elif kind == 2:  # a token came due: it serves a waiter (else it is due for ever)
                waiting = len(self.waiters)
                self._serve([subject], now)
                assert len(self.waiters) < waiting, "a token came due and served nobody"
            elif kind == 3:
                self._come_due(subject, now)
            else:
                self.waiters.remove(subject)
                self.completions.append((subject.key, []))
        for message in list(self.messages.values()):
            expires = message.dead_expires_at
            if message.state == "dead" and expires is not None and expires <= now:
                del self.messages[message.id]
        self.forget_unused()

    def in_use(self, name: str) -> bool:
        return (
            any(m.queue == name for m in self.messages.values())
            or self.queues[name].configured()
            or any(queue == name for queue, _ in self.schedules)
            or any(queue == name for _, queue in self.bindings)
            or any(name in w.queues for w in self.waiters)
        )

    def forget_unused(self) -> None:
        """Forget the queues not in use: their totals start from zero. (Done at the end
        of each tick, so before each op: a queue left unused by one op is untouched until
        the next one, and nothing due in a tick reaches a queue not in use.)"""
        for name in QUEUES:
            if not self.in_use(name):
                self.queues[name] = ModelQueue()

    def require(self, name: str) -> None:
        if not self.in_use(name):
            raise NotFound("no queue")

    def delete_queue(self, now: float, name: str, force: bool) -> dict[str, Any]:
        self.tick(now)
        self.require(name)
        held: dict[str, int] = {
            state: self.count(name, state) for state in ("ready", "delayed", "reserved", "dead")
        }
        schedules = [key for key in self.schedules if key[0] == name]
        if not force and (any(held.values()) or schedules):
            raise BadRequest("not empty", {**held, "schedules": len(schedules)})
        for waiter in [w for w in self.waiters if name in w.queues]:
            self.waiters.remove(waiter)
            self.completions.append((waiter.key, []))
        for key in schedules:
            del self.schedules[key]
        bound = {(pattern, queue) for pattern, queue in self.bindings if queue == name}
        self.bindings -= bound
        doomed = [m.id for m in self.messages.values() if m.queue == name]
        for message_id in doomed:
            del self.messages[message_id]
        self.queues[name] = ModelQueue()
        return {
            "deleted": True,
            "messages": len(doomed),
            "schedules": len(schedules),
            "bindings": len(bound),
        }

    def _earliest_event(self, now: float) -> tuple[float, int, int, Any] | None:
        events: list[tuple[float, int, int, Any]] = []
        for message in self.messages.values():
            if message.state == "delayed" and message.due_at is not None:
                events.append((message.due_at, 0, message.order, message))
            elif message.state == "reserved" and message.lease_deadline is not None:
                events.append((message.lease_deadline, 1, message.order, message))
        events += [(due, 2, 0, name) for name, due in self._token_times().items()]
        events += [
            (schedule.next_at, 3, schedule.order, schedule)
            for schedule in self.schedules.values()
            if schedule.next_at is not None
        ]
        events += [(waiter.deadline, 4, waiter.order, waiter) for waiter in self.waiters]
        due = [event for event in events if event[0] <= now]
        return min(due, key=lambda event: event[:3]) if due else None

    def _token_times(self) -> dict[str, float]:
        """When each queue whose waiters only its rate limit holds back gets a token."""
        times = {}
        for name, queue in self.queues.items():
            waited_on = any(name in w.queues for w in self.waiters)
            if queue.bucket is None or not waited_on or queue.paused:
                continue
            if self.count(name, "ready") == 0 or self._at_cap(name):
                continue
            times[name] = queue.bucket.next_token()
        return times

    def _at_cap(self, name: str) -> bool:
        cap = self.queues[name].max_in_flight
        return cap is not None and self.count(name, "reserved") >= cap

    def _quota(self, name: str, now: float) -> int:
        queue = self.queues[name]
        quota = 10**9
        if queue.max_in_flight is not None:
            quota = max(0, queue.max_in_flight - self.count(name, "reserved"))
        if queue.bucket is not None:
            quota = min(quota, queue.bucket.available(now))
        return quota

    def next_deadline(self) -> float | None:
        times = [w.deadline for w in self.waiters] + list(self._token_times().values())
        times += [s.next_at for s in self.schedules.values() if s.next_at is not None]
        for message in self.messages.values():
            times += [
                time
                for time in (message.due_at, message.lease_deadline, message.dead_expires_at)
                if time is not None
            ]
        return min(times) if times else None

    # ------------------------------------------------------- transitions

    def _make_ready(self, message: ModelMessage) -> None:
        message.state = "ready"
        message.due_at = None
        message.order = self._next_order()

    def _make_delayed(self, message: ModelMessage, due_at: float) -> None:
        message.state = "delayed"
        message.due_at = due_at
        message.order = self._next_order()

    def _clear_lease(self, message: ModelMessage) -> None:
        message.token = message.lease_deadline = None

    def _lease(self, message: ModelMessage, now: float, visibility: float | None) -> None:
        queue = self.queues[message.queue]
        message.state = "reserved"
        message.attempts += 1
        message.token = self.next_token
        self.next_token += 1
        message.lease_duration = (
            visibility or message.visibility_timeout or queue.visibility_timeout
        )
        message.lease_deadline = now + message.lease_duration
        message.order = self._next_order()
        queue.totals["delivered"] += 1

    def _retry(
        self, message: ModelMessage, now: float, delay: float | None, error: str | None
    ) -> None:
        queue = self.queues[message.queue]
        if error is not None:
            message.last_error = error
        limit = self.max_attempts(message)
        if limit is not None and message.attempts >= limit:
            self._kill(message, now, f"max_attempts ({limit}) used up")
            return
        if delay is None:
            delay = queue.backoff_delay(message.attempts)
        if delay > 0:
            self._make_delayed(message, now + delay)
        else:
            self._make_ready(message)

    def _kill(self, message: ModelMessage, now: float, reason: str) -> None:
        queue = self.queues[message.queue]
        message.state = "dead"
        message.dead_reason = reason
        message.dead_at = now
        message.due_at = None
        ttl = queue.dead_letter_ttl
        message.dead_expires_at = None if ttl is None else now + ttl
        queue.totals["dead_lettered"] += 1

    def has_leases(self) -> bool:
        return any(m.state == "reserved" for m in self.messages.values())

    def max_attempts(self, message: ModelMessage) -> int | None:
        if message.max_attempts is not None:
            return message.max_attempts
        return self.queues[message.queue].max_attempts

    def _deliverable(self, name: str, now: float) -> bool:
        if self.queues[name].paused or self._quota(name, now) == 0:
            return False
        return any(m.state == "ready" and m.queue == name for m in self.messages.values())

    def _take_best(
        self, names: list[str], limit: int, now: float, visibility: float | None
    ) -> list[tuple[int, int]]:
        ready = [
            m
            for m in self.messages.values()
            if m.state == "ready" and m.queue in names and not self.queues[m.queue].paused
        ]
        ready.sort(key=lambda m: (-m.priority, m.order))
        quotas = {name: self._quota(name, now) for name in names}
        taken = []
        for message in ready:
            if len(taken) == limit:
                break
            if quotas[message.queue] == 0:
                continue
            quotas[message.queue] -= 1
            bucket = self.queues[message.queue].bucket
            if bucket is not None:
                bucket.take(now)
            self._lease(message, now, visibility)
            assert message.token is not None
            taken.append((message.id, message.token))
        return taken

    def _serve(self, names: list[str], now: float) -> None:
        """Serve waiters on ``names`` in the order they started waiting."""
        while True:
            open_queues = {name for name in names if self._deliverable(name, now)}
            waiter = next((w for w in self.waiters if open_queues & set(w.queues)), None)
            if waiter is None:
                return
            self.waiters.remove(waiter)
            taken = self._take_best(
                waiter.queues, waiter.max_messages, now, waiter.visibility_timeout
            )
            self.completions.append((waiter.key, taken))

    def _leased(self, message_id: int, token: int) -> ModelMessage | None:
        message = self.messages.get(message_id)
        if message is None or message.state != "reserved" or message.token != token:
            return None
        return message

    # -------------------------------------------------------------- ops

    def put(self, now: float, name: str, specs: list[PutSpec]) -> list[int]:
        self.tick(now)
        queue = self.queues[name]
        if any(len(spec.body) > queue.max_body for spec in specs):
            raise TooLarge("too large")
        ids = []
        for spec in specs:
            message = ModelMessage(
                id=self.next_id,
                queue=name,
                priority=spec.priority,
                max_attempts=spec.max_attempts,
                visibility_timeout=spec.visibility_timeout,
                enqueued_at=now,
                body_size=len(spec.body),
            )
            self.next_id += 1
            self.messages[message.id] = message
            if spec.delay > 0:
                self._make_delayed(message, now + spec.delay)
            else:
                self._make_ready(message)
            ids.append(message.id)
        queue.totals["put"] += len(specs)
        self._serve([name], now)
        return ids

    def reserve(
        self,
        now: float,
        names: list[str],
        limit: int,
        visibility: float | None,
        wait: float,
        key: int | None,
    ) -> list[tuple[int, int]]:
        self.tick(now)
        names = list(dict.fromkeys(names))
        taken = self._take_best(names, limit, now, visibility)
        if not taken and wait > 0:
            assert key is not None
            waiter = ModelWaiter(key, names, limit, visibility, now + wait, self._next_order())
            self.waiters.append(waiter)
        return taken

    def cancel_wait(self, key: int) -> None:
        self.waiters = [w for w in self.waiters if w.key != key]

    def ack(self, now: float, deliveries: list[tuple[int, int]]) -> int:
        self.tick(now)
        done, failed, touched = 0, [], []
        for message_id, token in deliveries:
            message = self._leased(message_id, token)
            if message is None:
                failed.append(message_id)
                continue
            self.queues[message.queue].totals["acked"] += 1
            del self.messages[message_id]
            touched.append(message.queue)
            done += 1
        self._serve(touched, now)  # a lease ended: a capped queue may deliver again
        _raise_if_failed(failed, done)
        return done

    def nack(
        self,
        now: float,
        deliveries: list[tuple[int, int]],
        delay: float | None,
        error: str | None,
    ) -> int:
        self.tick(now)
        done, failed, touched = 0, [], []
        for message_id, token in deliveries:
            message = self._leased(message_id, token)
            if message is None:
                failed.append(message_id)
                continue
            self._clear_lease(message)
            self.queues[message.queue].totals["nacked"] += 1
            self._retry(message, now, delay, error)
            touched.append(message.queue)
            done += 1
        self._serve(touched, now)
        _raise_if_failed(failed, done)
        return done

    def touch(self, now: float, message_id: int, token: int, seconds: float | None) -> float:
        self.tick(now)
        message = self._require_lease(message_id, token)
        message.lease_deadline = now + (message.lease_duration if seconds is None else seconds)
        message.order = self._next_order()
        return message.lease_deadline

    def bury(self, now: float, message_id: int, token: int, reason: str) -> None:
        self.tick(now)
        message = self._require_lease(message_id, token)
        self._clear_lease(message)
        self._kill(message, now, reason)
        self._serve([message.queue], now)

    def _require_lease(self, message_id: int, token: int) -> ModelMessage:
        message = self._leased(message_id, token)
        if message is None:
            raise LeaseLost("lease lost", {"failed": [message_id], "done": 0})
        return message

    def cancel(self, now: float, message_id: int) -> bool:
        self.tick(now)
        message = self.messages.get(message_id)
        if message is None or message.state not in ("ready", "delayed"):
            return False
        del self.messages[message_id]
        return True

    def configure(self, now: float, name: str, changes: dict[str, Any]) -> None:
        self.tick(now)
        self.queues[name].configure(changes, now)
        self._serve([name], now)

    def purge(self, now: float, name: str) -> int:
        self.tick(now)
        self.require(name)
        doomed = [
            m.id
            for m in self.messages.values()
            if m.queue == name and m.state in ("ready", "delayed")
        ]
        for message_id in doomed:
            del self.messages[message_id]
        return len(doomed)

    def purge_dead(self, now: float, name: str) -> int:
        self.tick(now)
        self.require(name)
        doomed = [m.id for m in self.dead(name)]
        for message_id in doomed:
            del self.messages[message_id]
        return len(doomed)

    def replay(self, now: float, name: str, ids: list[int] | None) -> int:
        self.tick(now)
        self.require(name)
        chosen = [m for m in self.dead(name) if ids is None or m.id in ids]
        for message in chosen:  # id order
            message.attempts = 0
            message.dead_reason = message.dead_at = message.dead_expires_at = None
            self._make_ready(message)
        self._serve([name], now)
        return len(chosen)

    # -------------------------------------------------------- schedules

    def set_schedule(self, now: float, schedule: ModelSchedule) -> None:
        self.tick(now)
        old = self.schedules.get((schedule.queue, schedule.name))
        if old is not None:
            schedule.last_slot, schedule.last_message_id = old.last_slot, old.last_message_id
            schedule.runs, schedule.triggered = old.runs, old.triggered
            schedule.missed, schedule.skipped = old.missed, old.skipped
        self.schedules[(schedule.queue, schedule.name)] = schedule
        schedule.plan_after(now)
        schedule.order = self._next_order()

    def unschedule(self, now: float, queue: str, name: str) -> bool:
        self.tick(now)
        return self.schedules.pop((queue, name), None) is not None

    def trigger(self, now: float, queue: str, name: str) -> int:
        self.tick(now)
        schedule = self.schedules[(queue, name)]
        message_id = self._fire(schedule, now, now)
        schedule.triggered += 1
        return message_id

    def _come_due(self, schedule: ModelSchedule, now: float) -> None:
        first = schedule.next_at
        assert first is not None
        slots = []
        slot: float | None = first
        while slot is not None and slot <= now:
            slots.append(slot)
            slot = slot + schedule.every
        if len(slots) == 1 and now - first <= 1.0:
            chosen = slots  # on time
        else:
            schedule.missed += len(slots)
            chosen = {"skip": [], "latest": slots[-1:], "all": slots}[schedule.catchup]
        attempted = 0
        for slot in chosen:
            if schedule.limit is not None and schedule.runs >= schedule.limit:
                break
            last = self.messages.get(schedule.last_message_id or 0)
            if schedule.overlap == "skip" and last is not None and last.state != "dead":
                schedule.skipped += 1
            else:
                self._fire(schedule, slot, now)
                schedule.runs += 1
            attempted += 1
        schedule.skipped += len(slots) - attempted
        schedule.last_slot = slots[-1]
        schedule.plan_after(max(now, schedule.last_slot))
        schedule.order = self._next_order()

    def _fire(self, schedule: ModelSchedule, slot: float, now: float) -> int:
        when = slot_text(slot)
        message = ModelMessage(
            id=self.next_id,
            queue=schedule.queue,
            priority=0,
            max_attempts=None,
            visibility_timeout=None,
            enqueued_at=now,
            body_size=len(SCHEDULE_BODY),
            headers={"schedule": schedule.name, "scheduled_for": when},
            key=f"schedule:{schedule.name}:{when}",
        )
        self.next_id += 1
        self.messages[message.id] = message
        self.fire_keys.add((schedule.queue, f"schedule:{schedule.name}:{when}"))
        self._make_ready(message)
        self.queues[schedule.queue].totals["put"] += 1
        schedule.last_message_id = message.id
        self._serve([schedule.queue], now)
        return message.id

    # ------------------------------------------------------- inspecting

    def dead(self, name: str) -> list[ModelMessage]:
        return sorted(
            (m for m in self.messages.values() if m.queue == name and m.state == "dead"),
            key=lambda m: m.id,
        )

    def count(self, name: str, state: str) -> int:
        return sum(1 for m in self.messages.values() if m.queue == name and m.state == state)

    def summary(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "ready": self.count(name, "ready"),
            "delayed": self.count(name, "delayed"),
            "reserved": self.count(name, "reserved"),
            "dead": self.count(name, "dead"),
            "paused": self.queues[name].paused,
        }

    def stats(self, name: str, now: float) -> dict[str, Any]:
        summary = self.summary(name)
        del summary["name"]
        stats = {
            "queue": name,
            **summary,
            "waiting": sum(1 for w in self.waiters if name in w.queues),
            "totals": dict(self.queues[name].totals),
        }
        queue = self.queues[name]
        if queue.bucket is not None or queue.max_in_flight is not None:
            stats["limits"] = {
                "tokens": queue.bucket.available(now) if queue.bucket is not None else None,
                "in_flight": self.count(name, "reserved"),
                "max_in_flight": queue.max_in_flight,
            }
        return stats

    def status(self, message: ModelMessage) -> dict[str, Any]:
        status = self._status(message)
        if message.state == "ready":  # how many ready messages of its queue go first
            key = (-message.priority, message.order)
            status["position"] = sum(
                1
                for other in self.messages.values()
                if other.queue == message.queue
                and other.state == "ready"
                and (-other.priority, other.order) < key
            )
        return status

    def _status(self, message: ModelMessage) -> dict[str, Any]:
        return {
            "id": message.id,
            "queue": message.queue,
            "state": message.state,
            "priority": message.priority,
            "attempts": message.attempts,
            "max_attempts": self.max_attempts(message),
            "enqueued_at": message.enqueued_at,
            "due_at": message.due_at,
            "lease_deadline": message.lease_deadline,
            "last_error": message.last_error,
            "dead_reason": message.dead_reason,
            "dead_at": message.dead_at,
            "headers": message.headers,
            "body_size": message.body_size,
        } | ({"key": message.key} if message.key is not None else {})


def _raise_if_failed(failed: list[int], done: int) -> None:
    if failed:
        raise LeaseLost("lease lost", {"failed": failed, "done": done})


def outcome(call: Any) -> tuple[str, Any]:
    """What a call did: ("ok", result) or (error class name, error details)."""
    try:
        return "ok", call()
    except (LeaseLost, NotFound, TooLarge, BadRequest) as error:
        return type(error).__name__, error.details


SCHEDULE_FIELDS = (
    "queue",
    "name",
    "next_at",
    "last_slot",
    "last_message_id",
    "runs",
    "triggered",
    "missed",
    "skipped",
)


def core_stats(core: Core, now: float, name: str) -> dict[str, Any]:
    """A queue's stats, less the limit figures the model does not keep (the time
    throttled and the reserves parked: tested on their own)."""
    stats = core.stats(now, name)
    if "limits" in stats:
        del stats["limits"]["throttled_seconds"], stats["limits"]["parked_by_limit"]
    return stats


def heap_counts(heap: LazyHeap | ReadyIndex) -> tuple[int, int]:
    """(live entries as the heap counts them, live entries really there)."""
    if isinstance(heap, ReadyIndex):
        check_ready_index(heap)
        live = sum(1 for fifo in heap._fifos.values() for m in fifo if m.state is State.READY)
        return heap._slots - heap._stale, live
    counted = len(heap._entries) - heap._stale  # not len(): that raises when negative
    return counted, sum(1 for entry in heap._entries if heap._is_live(entry))


def check_ready_index(index: ReadyIndex) -> None:
    """Each FIFO in seq order under its own priority, one slot per message at most, and
    one priority in the heap per FIFO."""
    slots = [m for fifo in index._fifos.values() for m in fifo]
    assert len(slots) == index._slots
    assert len({id(m) for m in slots}) == len(slots), "a message holds two slots"
    for priority, fifo in index._fifos.items():
        assert all(m.priority == priority for m in fifo)
        seqs = [m.seq for m in fifo if m.state is State.READY]
        assert seqs == sorted(seqs)
    assert sorted(-p for p in index._priorities) == sorted(index._fifos)


# -------------------------------------------------------------------- machine

queue_names = st.sampled_from(QUEUES)
channel_names = st.sampled_from(["orders.eu", "orders.us", "stock.eu.1", "orders"])
binding_patterns = st.sampled_from(["orders.eu", "orders.*", "orders.>", "*.eu.>", ">", "x"])
queue_lists = st.lists(queue_names, min_size=1, max_size=3)
small_steps = st.sampled_from([0.0, 0.0, 0.0, 0.25, 1.0, 2.5])
put_specs = st.builds(
    PutSpec,
    body=st.sampled_from([b"", b"abc", b"123456789"]),  # 9 bytes is over c's max_body
    priority=st.integers(-1, 1),
    delay=st.sampled_from([0.0, 0.0, 0.5, 2.0, 3.5]),
    max_attempts=st.sampled_from([None, None, 1, 4]),
    visibility_timeout=st.sampled_from([None, None, 2.0]),
    # The model has no headers or dedup keys (those have tests of their own). Named, as
    # st.builds infers every field of a named tuple it is not given.
    headers=st.none(),
    key=st.none(),
)
visibility_overrides = st.sampled_from([None, None, 1.0, 2.5])
batch_sizes = st.sampled_from([1, 1, 1, 2, 3])
SCHEDULE_BODY = b"tick"
schedule_names = st.sampled_from(["s1", "s2"])


EVENTS_KEPT = 1_000_000  # more than any run makes
TOLD_STATE = {  # the state an event leaves its message in (put, nacked, expired: its delay)
    "ready": "ready",
    "reserved": "reserved",
    "released": "ready",
    "acked": "gone",
    "dead": "dead",
    "replayed": "ready",
    "cancelled": "gone",
    "purged": "gone",
    "removed": "gone",
    "deleted": "gone",
}


class CoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.core = self.new_core()
        self.model = Model()
        self.now = START
        self.tokens: dict[int, int] = {UNKNOWN_TOKEN: UNKNOWN_TOKEN}  # model -> core token
        self.handed_out: list[tuple[int, int]] = []  # every (id, model token) delivered
        self.waiter_keys = 0
        # What the job events alone say of each message: id -> (state, attempts).
        self.told: dict[int, tuple[str, int]] = {}
        self.events_read = self.core.events.next_seq  # the next seq to read
        for name, changes in INITIAL_SETTINGS.items():
            self.core.configure(self.now, name, changes)
            self.model.configure(self.now, name, changes)

    # ------------------------------------------------------------ helpers

    def new_core(self) -> Core:
        return Core(random=lambda: 0.5, events=EventRing(EVENTS_KEPT))

    def _later(self, step: float) -> float:
        self.now += step
        return self.now

    def _record(self, expected: list[tuple[int, int]], got: list[Any]) -> None:
        """Check deliveries (ids, in order) and learn the core's token for each."""
        assert [m.id for m in got] == [message_id for message_id, _ in expected]
        for (message_id, model_token), message in zip(expected, got, strict=True):
            assert message.lease_token not in self.tokens.values()  # never reused
            self.tokens[model_token] = message.lease_token
            self.handed_out.append((message_id, model_token))

    def _pick_delivery(self, data: st.DataObject) -> tuple[int, int]:
        """A delivery as the model names it: mostly a current lease, sometimes a stale one
        (expired, acked, nacked, buried or touched past) or a made-up one."""
        current = sorted(
            (m.id, m.token)
            for m in self.model.messages.values()
            if m.state == "reserved" and m.token is not None
        )
        stale = sorted(set(self.handed_out) - set(current))
        made_up = [(UNKNOWN_ID, UNKNOWN_TOKEN)]
        if self.model.messages:
            made_up.append((min(self.model.messages), UNKNOWN_TOKEN))
        pools = [current] * 8 + [stale] * 2 + [made_up]
        pool = data.draw(st.sampled_from([pool for pool in pools if pool]))
        return data.draw(st.sampled_from(pool))

    def _core_delivery(self, delivery: tuple[int, int]) -> tuple[int, int]:
        return delivery[0], self.tokens[delivery[1]]

    def _snapshot(self) -> dict[str, Any]:
        """Everything observable about the core at ``self.now`` (ticks there first)."""
        now = self.now
        self.core.tick(now)
        return {
            "queues": [self.core.stats(now, name) for name in sorted(self.core.queues)],
            "status": {mid: self.core.status(now, mid) for mid in sorted(self.core.messages)},
            "next_deadline": self.core.next_deadline(),
            "pending": [(key, [m.id for m in ms]) for key, ms in self.core._completions],
        }

    def _check(self, call: Any, expected: tuple[str, Any]) -> None:
        """Run ``call`` on the core and compare with the model's outcome; when nothing
        should change (a lease that is not current, nothing done), check that directly."""
        if expected[0] != "LeaseLost" or expected[1]["done"] > 0:
            assert outcome(call) == expected
            return
        before = self._snapshot()
        assert outcome(call) == expected
        assert self._snapshot() == before

    # -------------------------------------------------------------- rules

    @initialize(puts=st.lists(st.tuples(queue_names, put_specs), max_size=8))
    def fill(self, puts: list[tuple[str, PutSpec]]) -> None:
        for name, spec in puts:
            self.put(name, [spec], 0.0)

    @rule(name=queue_names, specs=st.lists(put_specs, min_size=1, max_size=4), step=small_steps)
    def put(self, name: str, specs: list[PutSpec], step: float) -> None:
        now = self._later(step)
        expected = outcome(lambda: self.model.put(now, name, specs))
        assert outcome(lambda: self.core.put(now, name, specs)) == expected

    @rule(
        names=queue_lists,
        limit=st.integers(1, 3),
        visibility=visibility_overrides,
        step=small_steps,
    )
    def reserve(self, names: list[str], limit: int, visibility: float | None, step: float) -> None:
        now = self._later(step)
        expected = self.model.reserve(now, names, limit, visibility, 0.0, None)
        got = self.core.reserve(now, names, limit, visibility_timeout=visibility)
        self._record(expected, got)

    @rule(names=st.permutations(QUEUES))
    def drain(self, names: list[str]) -> None:
        """One consumer takes everything deliverable, so that later reserves wait."""
        expected = self.model.reserve(self.now, names, 100, None, 0.0, None)
        self._record(expected, self.core.reserve(self.now, names, 100))

    @rule(
        polls=st.lists(
            st.tuples(
                queue_lists,
                st.integers(1, 3),
                visibility_overrides,
                st.sampled_from([0.5, 3.0, 10.0, 30.0]),
            ),
            min_size=1,
            max_size=3,
        ),
        step=small_steps,
    )
    def reserve_and_wait(
        self, polls: list[tuple[list[str], int, float | None, float]], step: float
    ) -> None:
        """One to three consumers long-poll, one after the other at the same instant."""
        now = self._later(step)
        for names, limit, visibility, wait in polls:
            self.waiter_keys += 1
            key = self.waiter_keys
            expected = self.model.reserve(now, names, limit, visibility, wait, key)
            got = self.core.reserve(
                now, names, limit, visibility_timeout=visibility, wait=wait, waiter_key=key
            )
            self._record(expected, got)

    @precondition(lambda self: self.waiter_keys > 0)
    @rule(data=st.data())
    def cancel_wait(self, data: st.DataObject) -> None:
        # A live waiter, the newest one (perhaps already answered) or one never used.
        keys = [w.key for w in self.model.waiters] + [self.waiter_keys, self.waiter_keys + 1]
        key = data.draw(st.sampled_from(keys))
        self.model.cancel_wait(key)
        self.core.cancel_wait(key)

    @precondition(lambda self: self.model.has_leases())
    @rule(data=st.data(), count=batch_sizes, step=small_steps)
    def ack(self, data: st.DataObject, count: int, step: float) -> None:
        deliveries = [self._pick_delivery(data) for _ in range(count)]
        now = self._later(step)
        expected = outcome(lambda: self.model.ack(now, deliveries))
        core_deliveries = [self._core_delivery(d) for d in deliveries]
        self._check(lambda: self.core.ack(now, core_deliveries), expected)

    @precondition(lambda self: self.model.has_leases())
    @rule(
        data=st.data(),
        count=batch_sizes,
        delay=st.sampled_from([None, None, 0.0, 0.5, 3.0]),
        error=st.sampled_from([None, "boom"]),
        step=small_steps,
    )
    def nack(
        self,
        data: st.DataObject,
        count: int,
        delay: float | None,
        error: str | None,
        step: float,
    ) -> None:
        deliveries = [self._pick_delivery(data) for _ in range(count)]
        now = self._later(step)
        expected = outcome(lambda: self.model.nack(now, deliveries, delay, error))
        core_deliveries = [self._core_delivery(d) for d in deliveries]
        self._check(
            lambda: self.core.nack(now, core_deliveries, delay=delay, error=error), expected
        )

    @precondition(lambda self: self.model.has_leases())
    @rule(data=st.data(), delay=st.sampled_from([None, 0.0]))
    def nack_every_lease(self, data: st.DataObject, delay: float | None) -> None:
        """Give every current lease back in one batch (a worker pool shutting down), in
        any order: batches that span queues and wake waiters on several of them."""
        current = [
            (m.id, m.token)
            for m in self.model.messages.values()
            if m.state == "reserved" and m.token is not None
        ]
        deliveries = data.draw(st.permutations(current))
        expected = outcome(lambda: self.model.nack(self.now, deliveries, delay, None))
        core_deliveries = [self._core_delivery(d) for d in deliveries]
        assert outcome(lambda: self.core.nack(self.now, core_deliveries, delay=delay)) == expected

    @precondition(lambda self: self.model.has_leases())
    @rule(data=st.data(), seconds=st.sampled_from([None, None, 0.5, 4.0]), step=small_steps)
    def touch(self, data: st.DataObject, seconds: float | None, step: float) -> None:
        delivery = self._pick_delivery(data)
        now = self._later(step)
        expected = outcome(lambda: self.model.touch(now, *delivery, seconds))
        core_id, core_token = self._core_delivery(delivery)
        self._check(lambda: self.core.touch(now, core_id, core_token, seconds), expected)

    @precondition(lambda self: self.model.has_leases())
    @rule(data=st.data(), step=small_steps)
    def bury(self, data: st.DataObject, step: float) -> None:
        delivery = self._pick_delivery(data)
        now = self._later(step)
        expected = outcome(lambda: self.model.bury(now, *delivery, "buried"))
        core_id, core_token = self._core_delivery(delivery)
        self._check(lambda: self.core.bury(now, core_id, core_token, "buried"), expected)

    @rule(data=st.data(), step=small_steps)
    def cancel(self, data: st.DataObject, step: float) -> None:
        message_id = data.draw(st.sampled_from([*range(1, self.model.next_id), UNKNOWN_ID]))
        now = self._later(step)
        assert self.core.cancel(now, message_id) == self.model.cancel(now, message_id)

    @rule(name=queue_names, paused=st.booleans())
    def pause_or_resume(self, name: str, paused: bool) -> None:
        self.model.configure(self.now, name, {"paused": paused})
        wire = self.core.configure(self.now, name, {"paused": paused})
        assert wire["paused"] is paused

    @rule(name=queue_names, changes=st.sampled_from(CONFIG_CHANGES))
    def configure(self, name: str, changes: dict[str, Any]) -> None:
        self.model.configure(self.now, name, changes)
        self.core.configure(self.now, name, changes)

    @rule(
        name=queue_names,
        schedule=schedule_names,
        every=st.sampled_from([1.0, 2.5]),
        catchup=st.sampled_from(["latest", "skip", "all"]),
        overlap=st.sampled_from(["allow", "skip"]),
        limit=st.sampled_from([None, None, 2]),
    )
    def set_schedule(
        self,
        name: str,
        schedule: str,
        every: float,
        catchup: str,
        overlap: str,
        limit: int | None,
    ) -> None:
        fields = {"every": every, "catchup": catchup, "overlap": overlap, "limit": limit}
        spec = parse_spec({"body": SCHEDULE_BODY, **{k: v for k, v in fields.items() if v}})
        self.core.set_schedule(self.now, name, schedule, spec)
        model = ModelSchedule(name, schedule, every, catchup, overlap, limit, self.now)
        self.model.set_schedule(self.now, model)

    @rule(name=queue_names, schedule=schedule_names)
    def unschedule(self, name: str, schedule: str) -> None:
        removed = self.core.unschedule(self.now, name, schedule)
        assert removed == self.model.unschedule(self.now, name, schedule)

    @precondition(lambda self: self.model.schedules)
    @rule(data=st.data(), step=small_steps)
    def trigger(self, data: st.DataObject, step: float) -> None:
        now = self._later(step)
        self.model.tick(now)  # (the slots due by now fire first, in both)
        key = data.draw(st.sampled_from(sorted(self.model.schedules)))
        schedule = self.model.schedules[key]
        offset = (now - schedule.created_at) / schedule.every
        fired_here = (key[0], f"schedule:{key[1]}:{slot_text(now)}") in self.model.fire_keys
        if offset == int(offset) or fired_here:
            return  # a slot of it, or a time it fired at: one dedup key for two fires
        assert self.core.trigger(now, *key) == self.model.trigger(now, *key)

    @rule(pattern=binding_patterns, name=queue_names, bound=st.booleans())
    def bind(self, pattern: str, name: str, bound: bool) -> None:
        self.model.tick(self.now)
        if bound:
            assert self.core.bind(self.now, pattern, name) == (
                (pattern, name) not in self.model.bindings
            )
            self.model.bindings.add((pattern, name))
        else:
            assert self.core.unbind(self.now, pattern, name) == (
                (pattern, name) in self.model.bindings
            )
            self.model.bindings.discard((pattern, name))
        self.model.forget_unused()

    @rule(channel=channel_names, spec=put_specs, step=small_steps)
    def publish(self, channel: str, spec: PutSpec, step: float) -> None:
        """As the publish handler does: one put into each bound queue."""
        now = self._later(step)
        queues = self.core.bindings.queues_for(channel)
        assert queues == self.model.bound_queues(channel)
        for name in queues:
            expected = outcome(lambda name=name: self.model.put(now, name, [spec]))
            assert outcome(lambda name=name: self.core.put(now, name, [spec])) == expected

    @rule(name=queue_names, force=st.sampled_from([False, False, True]), step=small_steps)
    def delete_queue(self, name: str, force: bool, step: float) -> None:
        now = self._later(step)
        expected = outcome(lambda: self.model.delete_queue(now, name, force))
        if expected[0] == "ok":
            assert outcome(lambda: self.core.delete_queue(now, name, force)) == expected
            return
        before = self._snapshot()  # refused: nothing changes
        assert outcome(lambda: self.core.delete_queue(now, name, force)) == expected
        assert self._snapshot() == before

    @rule(changes=st.sampled_from(LIMIT_CHANGES))
    def limit(self, changes: dict[str, Any]) -> None:
        self.model.configure(self.now, "a", changes)
        self.core.configure(self.now, "a", changes)

    @rule(name=queue_names, data=st.data())
    def replay(self, name: str, data: st.DataObject) -> None:
        known = [*range(1, self.model.next_id), UNKNOWN_ID]
        ids = data.draw(st.none() | st.lists(st.sampled_from(known), max_size=3))
        expected = outcome(lambda: self.model.replay(self.now, name, ids))
        assert outcome(lambda: self.core.replay(self.now, name, ids)) == expected

    @rule(name=queue_names, dead=st.booleans())
    def purge(self, name: str, dead: bool) -> None:
        if dead:
            expected = outcome(lambda: self.model.purge_dead(self.now, name))
            assert outcome(lambda: self.core.purge_dead(self.now, name)) == expected
        else:
            expected = outcome(lambda: self.model.purge(self.now, name))
            assert outcome(lambda: self.core.purge(self.now, name)) == expected

    @rule(
        how=st.sampled_from(["to next deadline", "just before it", "by a step"]),
        step=st.sampled_from([0.25, 0.5, 1.0, 2.5, 5.0, 13.0]),
    )
    def advance(self, how: str, step: float) -> None:
        deadline = self.model.next_deadline()
        assert self.core.next_deadline() == deadline
        if how == "to next deadline" and deadline is not None:
            self.now = max(self.now, deadline)
        elif how == "just before it" and deadline is not None and deadline - 0.25 > self.now:
            self.now = deadline - 0.25
        else:
            self.now += step
        self.core.tick(self.now)
        self.model.tick(self.now)

    # --------------------------------------------------------- invariants

    @invariant()
    def core_matches_model(self) -> None:
        now = self.now
        self.core.tick(now)
        self.model.tick(now)

        taken = self.core.take_completions()
        expected = self.model.completions
        self.model.completions = []
        assert [key for key, _ in taken] == [key for key, _ in expected]
        for (_, got), (_, want) in zip(taken, expected, strict=True):
            self._record(want, got)

        existing = [name for name in QUEUES if self.model.in_use(name)]
        assert self.core.list_queues(now) == [self.model.summary(name) for name in existing]
        for name in QUEUES:
            if name not in existing:
                assert outcome(lambda name=name: self.core.stats(now, name))[0] == "NotFound"
                continue
            assert core_stats(self.core, now, name) == self.model.stats(name, now)
            dead = [m.id for m in self.core.dead_letters(now, name, 1_000)]
            assert dead == [m.id for m in self.model.dead(name)]

        assert sorted(self.core.messages) == sorted(self.model.messages)
        for message in self.model.messages.values():
            status = self.core.status(now, message.id)
            eta = status.pop("eta_s", None)  # depends on when status was asked before
            assert eta is None or eta > 0
            assert status == self.model.status(message)
        newest = range(self.model.next_id - 1, 0, -1)
        gone = next((i for i in newest if i not in self.model.messages), None)
        if gone is not None:
            assert outcome(lambda: self.core.status(now, gone))[0] == "NotFound"

        assert self.core.next_deadline() == self.model.next_deadline()
        listed = [
            tuple(s[field] for field in SCHEDULE_FIELDS) for s in self.core.list_schedules(now)
        ]
        assert listed == [
            self.model.schedules[key].listed() for key in sorted(self.model.schedules)
        ]
        assert self.core.bindings.listed() == sorted(self.model.bindings)

    @invariant()
    def events_tell_every_change(self) -> None:
        """Following the job events alone, in seq order, gives every message's state and
        attempts as the model has them (and nothing more)."""
        self._read_events()
        live = {mid: state for mid, state in self.told.items() if state[0] != "gone"}
        assert live == {mid: (m.state, m.attempts) for mid, m in self.model.messages.items()}

    def _read_events(self) -> None:
        """Fold the events made since the last call into ``told``."""
        ring = self.core.events
        assert ring.first_seq <= self.events_read, "the ring is big enough for a run"
        new = list(ring.since(self.events_read, ring.next_seq - 1))
        assert [event[0] for event in new] == list(range(self.events_read, ring.next_seq))
        self.events_read = ring.next_seq
        for _, _, queue, kind, message_id, attempts, fields in new:
            if message_id is None:
                assert kind in ("paused", "resumed", "configured", "queue_deleted")
                assert queue in QUEUES
                continue
            if kind in ("put", "nacked", "expired"):  # (an exhausted one: "dead" follows)
                state = "delayed" if (fields or {}).get("delay", 0) > 0 else "ready"
            elif kind == "progress":
                state = self.told[message_id][0]
            else:
                state = TOLD_STATE[kind]
            self.told[message_id] = (state, attempts)

    @invariant()
    def heap_counts_are_exact(self) -> None:
        heaps = {
            "delayed": self.core._delayed,
            "leases": self.core._leases,
            "dead expiry": self.core._dead_expiry,
            "waiter deadlines": self.core._waiter_deadlines,
        }
        heaps.update({f"ready {name}": q.ready for name, q in self.core.queues.items()})
        for name, heap in heaps.items():
            counted, live = heap_counts(heap)
            assert counted == live, f"{name} heap counts {counted} live entries, has {live}"


CoreMachine.TestCase.settings = settings(max_examples=600, stateful_step_count=50)
test_core_machine = CoreMachine.TestCase


def test_a_serve_at_the_end_of_a_tick_does_not_move_a_rate_limited_queues_next_token() -> None:
    """Found by the store machine: a delayed message of queue c came due and was served,
    at the tick's end, to a waiter on a and c; reading a's bucket at that later time must
    leave a's own waiters served at its token's time, in the model as in the core."""
    machine = CoreMachine()

    def ack(delivery: tuple[int, int], step: float) -> None:
        now = machine._later(step)
        expected = outcome(lambda: machine.model.ack(now, [delivery]))
        machine._check(lambda: machine.core.ack(now, [machine._core_delivery(delivery)]), expected)
        machine.core_matches_model()

    machine.fill(
        [
            ("b", PutSpec(body=b"")),
            ("c", PutSpec(body=b"", priority=1, visibility_timeout=2.0)),
            ("a", PutSpec(body=b"", delay=0.5)),
            ("a", PutSpec(body=b"", delay=0.5, visibility_timeout=2.0)),
        ]
    )
    machine.configure("a", {"max_attempts": 1})
    machine.reserve_and_wait([(["a"], 1, None, 0.5)], 0.0)
    machine.limit({"rate_limit": {"rate": 1, "per": 2, "burst": 1}, "max_in_flight": 2})
    machine.reserve_and_wait([(["c"], 1, None, 0.5), (["a"], 1, None, 10.0)], 0.0)
    machine.reserve_and_wait([(["a", "b"], 1, None, 0.5)], 0.0)
    machine.reserve_and_wait([(["a"], 1, None, 3.0)], 2.5)
    machine.reserve_and_wait([(["a", "c"], 1, None, 3.0)], 0.0)
    machine.core_matches_model()
    ack(machine.handed_out[1], 0.0)
    ack(machine.handed_out[2], 2.5)
    machine.events_tell_every_change()
