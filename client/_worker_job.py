"""What a worker's handler sees, and how the way it ends becomes an ack, a nack or a bury.

Shared by ``Worker`` (threads) and ``AsyncWorker`` (asyncio): the job handed to the
handler, the ``Retry`` and ``Fail`` exceptions a handler raises to steer its message, and the
rules that turn a return value or an exception into an ``Outcome``. No I/O here.
"""

from __future__ import annotations

import inspect
import math
import os
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgpack

from ._message import Message

MAX_ERROR_TEXT: Final = 4096  # characters of nack error text (headline plus traceback summary)
TRACEBACK_FRAMES: Final = 4  # innermost frames kept in the traceback summary
MAX_NOTE: Final = 200  # characters of a progress note

ProgressReport = Callable[[Message, float, str], bool]
AsyncProgressReport = Callable[[Message, float, str], Awaitable[bool]]


class Retry(Exception):
    """Raise from a handler to give its message back for another attempt.

    ``delay``: seconds until the retry; None lets the queue's backoff decide. The attempt
    still counts, so once ``max_attempts`` are used up the broker dead-letters the message.
    ``reason`` is kept as the message's last error."""

    def __init__(self, delay: float | None = None, reason: str = "") -> None:
        if delay is not None and not (math.isfinite(delay) and delay >= 0):
            raise ValueError(f"Retry delay must be None or seconds >= 0, got {delay!r}")
        super().__init__(reason)
        self.delay = delay
        self.reason = reason


class Fail(Exception):
    """Raise from a handler to dead-letter its message at once with ``reason``, whatever
    attempts it has left (``replay`` brings it back)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _JobView:
    """The delivery fields a handler reads; ``message`` is the full ``Message``."""

    __slots__ = ("message",)

    def __init__(self, message: Message) -> None:
        self.message = message

    @property
    def body(self) -> bytes:
        return self.message.body

    @property
    def id(self) -> int:
        return self.message.id

    @property
    def queue(self) -> str:
        return self.message.queue

    @property
    def attempts(self) -> int:
        """Deliveries so far, this one included (1 on the first try)."""
        return self.message.attempts

    @property
    def headers(self) -> dict[str, str | int]:
        return self.message.headers

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(id={self.id}, queue={self.queue!r}, attempts={self.attempts})"
        )


class Job(_JobView):
    """One delivery as a ``Worker`` handler sees it: ``body``, ``id``, ``queue``,
    ``attempts``, ``headers``, the ``message`` itself, and ``progress()``."""

    __slots__ = ("_report",)

    def __init__(self, message: Message, report: ProgressReport) -> None:
        super().__init__(message)
        self._report = report

    def progress(self, percent: float, note: str = "") -> bool:
        """Report how far the handler got (``percent`` 0-100, a short ``note``) for
        ``status(id)`` to show. Returns False, and does nothing, when the broker does not
        record progress or the report could not be delivered; never raises for that."""
        return self._report(self.message, checked_percent(percent), checked_note(note))


class AsyncJob(_JobView):
    """One delivery as an ``AsyncWorker`` handler sees it; as ``Job``, with
    ``await job.progress(percent, note)``."""

    __slots__ = ("_report",)

    def __init__(self, message: Message, report: AsyncProgressReport) -> None:
        super().__init__(message)
        self._report = report

    async def progress(self, percent: float, note: str = "") -> bool:
        """As ``Job.progress``."""
        return await self._report(self.message, checked_percent(percent), checked_note(note))


def is_async(handler: Callable[..., Any]) -> bool:
    """Whether ``handler`` is an ``async def`` (or an object with an async ``__call__``)."""
    call = getattr(handler, "__call__", None)  # noqa: B004 - looking for an async __call__
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)


def checked_percent(percent: float) -> float:
    if isinstance(percent, bool) or not isinstance(percent, int | float):
        raise TypeError(f"progress percent must be a number, got {type(percent).__name__}")
    if not 0 <= percent <= 100:
        raise ValueError(f"progress percent must be 0-100, got {percent!r}")
    return float(percent)


def checked_note(note: str) -> str:
    if not isinstance(note, str):
        raise TypeError(f"progress note must be a str, got {type(note).__name__}")
    return note[:MAX_NOTE]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What to tell the broker about one delivery.

    ``ack``: done, with ``result`` (None: no result). ``nack``: retry after ``delay`` seconds
    (None: the queue's backoff), keeping ``text`` as the last error. ``bury``: dead-letter
    now with ``text`` as the reason. ``failure``: the handler failed (raised something
    other than ``Retry`` or ``Fail``, or ran past its timeout), for the circuit breaker."""

    action: Literal["ack", "nack", "bury"]
    result: Any = None
    delay: float | None = None
    text: str | None = None
    failure: bool = False


def returned(value: Any) -> Outcome:
    """The handler returned ``value``: ack, with it as the result."""
    return Outcome("ack", result=value)


def raised(error: BaseException) -> Outcome:
    """The handler raised ``error``: bury for ``Fail``, nack for anything else (with
    ``Retry``'s delay, or the queue's backoff)."""
    if isinstance(error, Fail):
        return Outcome("bury", text=error.reason or "Fail")
    if isinstance(error, Retry):
        return Outcome("nack", delay=error.delay, text=f"Retry: {error.reason or 'requested'}")
    return Outcome("nack", text=error_text(error), failure=True)


def timed_out(limit: float) -> Outcome:
    """The handler ran past its ``limit`` seconds: nack (the queue's backoff applies)."""
    return Outcome("nack", text=f"timeout after {limit:g}s", failure=True)


def error_text(error: BaseException, limit: int = MAX_ERROR_TEXT) -> str:
    """``"{ExceptionType}: {message}"`` then the innermost few frames of its traceback
    (``file:line in function: source``), at most ``limit`` characters in all."""
    message = str(error)
    headline = f"{type(error).__name__}: {message}" if message else type(error).__name__
    frames = traceback.extract_tb(error.__traceback__)[-TRACEBACK_FRAMES:]
    lines = [
        f"  {os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}: "
        f"{(frame.line or '').strip()[:200]}"
        for frame in frames
    ]
    summary = "\n".join(lines)
    room = limit - len(summary) - 1
    if room < limit // 2:  # a long traceback must not crowd out the message itself
        summary, room = summary[: limit // 2], limit - limit // 2 - 1
    if len(headline) > room:
        headline = headline[: max(room - 3, 0)] + "..."
    return f"{headline}\n{summary}" if summary else headline[:limit]


def encodable_result(value: Any) -> tuple[bool, Any]:
    """``(True, value)`` when ``value`` can be sent as an ack result: bytes-like (sent as
    bytes) or anything msgpack encodes; ``(False, None)`` for None or anything else."""
    if value is None:
        return False, None
    if isinstance(value, bytes | bytearray | memoryview):
        return True, bytes(value)
    try:
        msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return False, None
    return True, value
