"""The daemon's log lines on stderr: human text, or one JSON object per line.

A log call names its event and fields through ``extra`` (``event()`` builds it):

    log.info("connection %d opened from %s", cid, peer,
             extra=event("connection_opened", connection_id=cid, peer=peer))

The text format shows only the message; the JSON format adds the event name and every
field, so a log pipeline can filter on ``event`` and read fields without parsing text.
A record logged without an event name gets ``"event": "log"``.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from ._message import Message

LOG_FORMATS: Final = ("text", "json")

# Attributes every LogRecord has; anything else on a record came in through ``extra``.
_RECORD_ATTRIBUTES: Final = frozenset(
    [*vars(logging.LogRecord("", 0, "", 0, "", (), None)), "message", "asctime", "taskName"]
)

_dead_letters = logging.getLogger("sluice.queue")


def event(name: str, **fields: Any) -> dict[str, Any]:
    """The ``extra`` of a log call: a short snake_case event name and its fields."""
    return {"event": name, **fields}


def timestamp(record: logging.LogRecord) -> str:
    """ISO 8601 in UTC with milliseconds: ``2026-01-31T09:15:02.123Z``."""
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    """``2026-01-31T09:15:02.123Z INFO sluice.server: connection 3 opened from ...``.
    Line breaks inside a message (say, in a client's name) are shown as ``\\n``, so each
    event stays on one line; a traceback follows on lines of its own."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().replace("\r", "\\r").replace("\n", "\\n")
        line = f"{timestamp(record)} {record.levelname} {record.name}: {message}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``event``, ``msg``, then
    the event's fields, and ``exc`` (the traceback) if an exception was logged."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", "log"),
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and key not in line:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_logging(level: str, log_format: str, stream: IO[str] = sys.stderr) -> None:
    """Send every log record at ``level`` or above to ``stream`` in ``log_format``."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {log_format!r}")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def correlation_id(message: Message) -> str | int | None:
    """The message's ``correlation_id`` (or ``correlation-id``) header, if it has one."""
    headers = message.headers
    if not headers:
        return None
    return headers.get("correlation_id", headers.get("correlation-id"))


def log_dead_letter(message: Message, reason: str) -> None:
    """The core's dead-letter hook: one info line per dead letter (they are exceptional,
    and operators want each one)."""
    correlation = correlation_id(message)
    fields = event(
        "dead_letter",
        queue=message.queue.name,
        id=message.id,
        reason=reason,
        attempts=message.attempts,
    )
    suffix = ""
    if correlation is not None:
        fields["correlation_id"] = correlation
        suffix = f" (correlation id {correlation})"
    _dead_letters.info(
        "dead letter: message %d of %s after %d attempts: %s%s",
        message.id,
        message.queue.name,
        message.attempts,
        reason,
        suffix,
        extra=fields,
    )
