"""What both worker forms share: settings, lease-keeping arithmetic, outage backoff and
logging, counts. Pure bookkeeping; the I/O lives in ``_worker_sync`` and ``_worker_async``.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Final

from protocol import LeaseLost, ShuttingDown, require_queue_name

from . import _calls
from ._common import DEFAULT_URL, parse_url
from ._message import Message
from ._worker_job import Outcome

MAX_BATCH: Final = 1000  # the broker's limit on reserve max and nack items
TOUCH_FRACTION: Final = 1 / 3  # touch when this share of the lease has passed
MIN_TOUCH_INTERVAL: Final = 0.01  # seconds; guards against a lease that looks already over
BACKOFF_FIRST: Final = 0.1  # seconds before the first retry in a broker outage
BACKOFF_CAP: Final = 5.0  # longest wait between retries in an outage
HAND_BACK_TRIES: Final = 3  # attempts to nack unfinished messages at shutdown
HANDED_BACK_ERROR: Final = "interrupted: the worker shut down before the handler finished"
# What this client can send, whatever the broker offers: an ack result, a progress report.
CLIENT_SENDS_RESULTS: Final = "result" in inspect.signature(_calls.ack).parameters
CLIENT_REPORTS_PROGRESS: Final = hasattr(_calls, "progress")
# Failures that mean "the broker is away for now": the connection broke or timed out
# (ConnectionClosed and Timeout are OSErrors), or the broker is shutting down.
OUTAGE_ERRORS: Final = (OSError, ShuttingDown)

log = logging.getLogger("sluice.worker")


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSettings:
    """A worker's options, checked once. See ``Worker`` for what each means."""

    queues: tuple[str, ...]
    concurrency: int = 1
    url: str = DEFAULT_URL
    auth_token: str | None = None
    timeout: float | None = None
    grace: float = 30.0
    visibility_timeout: float | None = None
    poll_wait: float = 1.0
    host: str = field(init=False)
    port: int = field(init=False)

    def __post_init__(self) -> None:
        if not self.queues:
            raise ValueError("a worker needs at least one queue to reserve from")
        for name in self.queues:
            require_queue_name(name, "worker")
        if isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int):
            raise TypeError(f"concurrency must be an int, got {self.concurrency!r}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.timeout is not None:
            _check_seconds("timeout", self.timeout, allow_zero=False)
        _check_seconds("grace", self.grace, allow_zero=True)
        if self.visibility_timeout is not None:
            _check_seconds("visibility_timeout", self.visibility_timeout, allow_zero=False)
        _check_seconds("poll_wait", self.poll_wait, allow_zero=False)
        host, port = parse_url(self.url)
        object.__setattr__(self, "host", host)
        object.__setattr__(self, "port", port)


def queue_names(queues: str | Sequence[str]) -> tuple[str, ...]:
    """One queue name or several, as a tuple."""
    return (queues,) if isinstance(queues, str) else tuple(queues)


def _check_seconds(name: str, value: float, *, allow_zero: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} seconds, got {value}")


class Backoff:
    """Waits between retries while the broker is away: ``first`` seconds, doubling up to
    ``cap``, each with ±20% jitter so many workers do not reconnect in step."""

    def __init__(self, first: float = BACKOFF_FIRST, cap: float = BACKOFF_CAP) -> None:
        self.first, self.cap = first, cap
        self._next = first

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(delay * 2, self.cap)
        return min(delay * random.uniform(0.8, 1.2), self.cap)

    def reset(self) -> None:
        self._next = self.first


class Outage:
    """Logs a broker outage once when it starts and once when it ends, however many calls
    fail in between. Thread-safe; ``now`` is a monotonic clock reading."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._since: float | None = None
        self._lock = threading.Lock()

    def failed(self, error: BaseException, now: float) -> None:
        with self._lock:
            if self._since is not None:
                return
            self._since = now
        log.warning(
            "broker %s unreachable (%s); retrying with backoff up to %gs",
            self.url,
            error,
            BACKOFF_CAP,
        )

    def recovered(self, now: float) -> None:
        if self._since is None:  # the common case, without taking the lock
            return
        with self._lock:
            since, self._since = self._since, None
        if since is not None:
            log.warning("broker %s reachable again after %.1fs", self.url, now - since)


@dataclass(slots=True)
class LeaseClock:
    """When to touch one lease, in local monotonic seconds.

    The broker's deadlines are wall-clock times on its own clock, so the lease is turned
    into a duration once, when the reserve's reply arrives (``lease_deadline`` minus the
    broker's estimated time then), and everything after is measured on the local monotonic
    clock. A touch renews the lease by that duration from when the broker handles it, which
    is after it was sent, so ``expires`` (sent time plus duration) never lies later than
    the real deadline, up to the error of that one estimate."""

    duration: float  # the lease length granted (a touch renews it by as much)
    expires: float  # local time the lease is known to run to, at least
    next_touch: float

    @classmethod
    def at_reserve(cls, lease_deadline: float, broker_now: float, received_at: float) -> LeaseClock:
        duration = max(lease_deadline - broker_now, 3 * MIN_TOUCH_INTERVAL)
        return cls(duration, received_at + duration, received_at + duration * TOUCH_FRACTION)

    def touched(self, sent_at: float) -> None:
        """A touch sent at ``sent_at`` succeeded: the lease runs ``duration`` from then."""
        self.expires = sent_at + self.duration
        self.next_touch = sent_at + max(self.duration * TOUCH_FRACTION, MIN_TOUCH_INTERVAL)

    def touch_failed(self, now: float) -> None:
        """Try again soon: after half the usual interval, and before the lease runs out."""
        interval = max(self.duration * TOUCH_FRACTION / 2, MIN_TOUCH_INTERVAL)
        self.next_touch = now + interval

    def stop(self) -> None:
        self.next_touch = math.inf


@dataclass(slots=True, eq=False)
class Delivery:
    """One reserved message inside a worker, from reserve until it is settled.

    ``owner`` says who settles it, set once: ``"handler"`` (it ended), ``"timeout"`` (it ran
    too long) or ``"shutdown"`` (it did not finish within the grace period). ``lease_lost``
    means a touch found the lease gone, so the outcome must not be sent."""

    message: Message
    lease: LeaseClock
    deadline: float = math.inf  # local monotonic time the handler must finish by
    owner: str | None = None
    lease_lost: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return (self.message.id, self.message.lease)


@dataclass(slots=True)
class WorkerCounts:
    """What a worker did with the messages it reserved."""

    acked: int = 0  # the handler returned
    nacked: int = 0  # it raised (or asked to Retry); the broker dead-letters used-up ones
    buried: int = 0  # it raised Fail
    timed_out: int = 0  # it ran past the timeout (also counted in nacked)
    lease_lost: int = 0  # the lease was gone when the outcome was due; nothing was sent
    handed_back: int = 0  # unfinished at shutdown, nacked for immediate redelivery
    unsettled: int = 0  # the broker could not be told in time; the lease will run out
    breaker_opened: int = 0  # times the circuit breaker stopped reserving

    def summary(self) -> str:
        return ", ".join(
            f"{getattr(self, f.name)} {f.name.replace('_', ' ')}" for f in fields(self)
        )


def supports(server_info: Mapping[str, Any], feature: str) -> bool:
    """Whether the broker's hello reply lists ``feature`` (an op or capability name)."""
    features = server_info.get("features")
    return isinstance(features, list | tuple) and feature in features


def can_send_result(server_info: Mapping[str, Any]) -> bool:
    """Whether an ack may carry a result: this client can send one and the broker keeps it."""
    return CLIENT_SENDS_RESULTS and supports(server_info, "result")


def can_report_progress(server_info: Mapping[str, Any]) -> bool:
    """Whether ``Job.progress`` reaches the broker: this client has the call and the broker
    records it."""
    return CLIENT_REPORTS_PROGRESS and supports(server_info, "progress")


def batches(deliveries: Sequence[Delivery]) -> list[list[Delivery]]:
    """``deliveries`` in slices the broker takes in one nack."""
    return [list(deliveries[i : i + MAX_BATCH]) for i in range(0, len(deliveries), MAX_BATCH)]


COUNT_OF_ACTION: Final = {"ack": "acked", "nack": "nacked", "bury": "buried"}


@dataclass(slots=True)
class SettleAttempts:
    """How a worker keeps trying to tell the broker one delivery's outcome, whichever form
    it takes: it logs what went wrong and names the count to bump through ``count``.

    ``patient``: through an outage, keep trying while the lease lasts (not for callers that
    must not block, like the thread that touches leases)."""

    delivery: Delivery
    action: str
    outage: Outage
    count: Callable[[str], None]
    patient: bool
    backoff: Backoff = field(default_factory=Backoff)

    def lease_already_lost(self) -> bool:
        """True (logged and counted) if a touch found the lease gone: send nothing."""
        if not self.delivery.lease_lost:
            return False
        self.count("lease_lost")
        log.warning(
            "message %d: its lease was lost while the handler ran; %s not sent",
            self.delivery.message.id,
            self.action,
        )
        return True

    def succeeded(self) -> None:
        self.outage.recovered(time.monotonic())
        self.count(COUNT_OF_ACTION[self.action])

    def after_failure(self, error: BaseException, *, hurried: bool) -> float | None:
        """Seconds to wait before trying again, or None to give up (after logging why)."""
        message_id, action = self.delivery.message.id, self.action
        if isinstance(error, LeaseLost):
            self.count("lease_lost")
            log.warning(
                "message %d: lease lost before the %s (it ran out, or a retried call already "
                "got through); the broker delivers it again if need be",
                message_id,
                action,
            )
            return None
        if not isinstance(error, OUTAGE_ERRORS):
            self.count("unsettled")
            log.error("message %d: the broker refused the %s: %s", message_id, action, error)
            return None
        now = time.monotonic()
        self.outage.failed(error, now)
        expires = self.delivery.lease.expires
        if self.patient and not hurried and now < expires:
            return min(self.backoff.next_delay(), expires - now)
        self.count("unsettled")
        log.warning(
            "message %d: could not %s it while the broker is unreachable; it is delivered "
            "again once its lease runs out",
            message_id,
            action,
        )
        return None


def touch_failed(error: BaseException, delivery: Delivery, outage: Outage) -> None:
    """A touch failed, not for a lost lease: note it, and plan another try soon."""
    if isinstance(error, OUTAGE_ERRORS):
        outage.failed(error, time.monotonic())
    else:
        log.warning("message %d: touch failed: %s", delivery.message.id, error)
    delivery.lease.touch_failed(time.monotonic())


def lease_lost_warning(delivery: Delivery) -> None:
    log.warning(
        "message %d: lease lost while its handler runs; its outcome will not be sent",
        delivery.message.id,
    )


def handed_back_despite(error: BaseException, tried: int, outage: Outage) -> int | None:
    """After handing back ``tried`` messages failed with ``error``: how many the broker
    took all the same, or None for an outage, where another try may get through."""
    if isinstance(error, LeaseLost):
        failed = error.details.get("failed")
        return tried - len(failed) if isinstance(failed, list) else 0
    if isinstance(error, OUTAGE_ERRORS):
        outage.failed(error, time.monotonic())
        return None
    log.error("handing back %d unfinished messages failed: %s", tried, error)
    return 0


def hand_back_gave_up(tried: int) -> None:
    log.warning(
        "could not hand back %d unfinished messages (broker unreachable); they are "
        "delivered again once their leases run out",
        tried,
    )


def dropped_result_warning(message: Message, value: object) -> None:
    log.warning(
        "message %d: the handler returned a %s, which is neither bytes nor msgpack-able; "
        "acking without a result",
        message.id,
        type(value).__name__,
    )


class Breaker:
    """A circuit breaker over handler outcomes, without I/O (the caller passes the time).

    Closed, it lets the worker reserve freely. After ``failures`` failures in a row (a
    handler raised something other than ``Retry`` or ``Fail``, or ran past its timeout)
    it opens: for ``cooldown`` seconds nothing is reserved, so no message spends an
    attempt on a handler that is failing. Then it is half-open: one job may be reserved;
    if it succeeds the breaker closes, if it fails it opens again. ``Retry`` and ``Fail``
    are the handler's own decisions and count as neither. Thread-safe."""

    def __init__(self, failures: int, cooldown: float) -> None:
        if isinstance(failures, bool) or not isinstance(failures, int) or failures < 1:
            raise ValueError(f"breaker failures must be an int of at least 1, got {failures!r}")
        _check_seconds("breaker cooldown", cooldown, allow_zero=False)
        self.failures, self.cooldown = failures, float(cooldown)
        self._lock = threading.Lock()
        self._in_a_row = 0
        self._opened_at: float | None = None  # None: closed
        self._trying = False  # half-open, and the one trial job is out

    def quota(self, now: float) -> tuple[int | None, float]:
        """How many jobs may be reserved now (None: any number), and when none may, how
        many seconds until that may change."""
        with self._lock:
            if self._opened_at is None:
                return None, 0.0
            left = self._opened_at + self.cooldown - now
            if left > 0:
                return 0, left
            if self._trying:
                return 0, self.cooldown  # the trial's outcome decides; it wakes the loop
            return 1, 0.0

    def trying(self) -> None:
        """The half-open trial job was reserved."""
        with self._lock:
            if self._opened_at is not None:
                self._trying = True

    def record(self, outcome: Outcome, now: float) -> str | None:
        """Note how a job ended; returns "opened" or "closed" when that changed the state."""
        with self._lock:
            if outcome.failure:
                self._in_a_row += 1
                if self._opened_at is not None or self._in_a_row >= self.failures:
                    self._opened_at, self._trying = now, False
                    return "opened"
            elif outcome.action == "ack":
                self._in_a_row = 0
                if self._opened_at is not None:
                    self._opened_at, self._trying = None, False
                    return "closed"
            return None

    @classmethod
    def of(cls, setting: tuple[int, float] | None) -> Breaker | None:
        """The breaker a worker's ``breaker=(failures, cooldown)`` asks for (None: off)."""
        if setting is None:
            return None
        if not isinstance(setting, tuple) or len(setting) != 2:
            raise ValueError(f"breaker must be (failures, cooldown seconds), got {setting!r}")
        return cls(*setting)


def breaker_changed(breaker: Breaker, change: str | None, counts: WorkerCounts) -> None:
    """Log (and count) the breaker opening or closing."""
    if change == "opened":
        counts.breaker_opened += 1
        log.warning(
            "circuit breaker open: %d handler failures in a row; not reserving for %gs",
            breaker.failures,
            breaker.cooldown,
        )
    elif change == "closed":
        log.info("circuit breaker closed: a trial job succeeded; reserving again")
