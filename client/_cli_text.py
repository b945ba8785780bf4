"""Text in and out for the admin CLI: tables, key/value listings, body previews, times,
JSON output, and the ``key=value`` arguments of ``sluice configure`` and ``--header``.

Nothing here talks to a broker; every function is pure apart from ``now`` arguments.
"""

from __future__ import annotations

import base64
import json
import math
import zoneinfo
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, tzinfo
from typing import Any, Final

PREVIEW_WIDTH: Final = 40  # characters of a body, reason or error shown in a table cell
ELLIPSIS: Final = "..."


class UsageError(Exception):
    """The command line asks for something impossible; the CLI exits 2 with this text."""


# ------------------------------------------------------------------------- tables


def cell(value: Any) -> str:
    """How one value reads in a table: None as ``-``, booleans as yes/no, whole floats
    without a fraction, other floats to six significant digits."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell, two spaces apart. A column whose cells are all
    numbers (or ``None``) is right-aligned. Ensures no trailing spaces on any line."""
    texts = [[cell(value) for value in row] for row in rows]
    widths = [len(header) for header in headers]
    for row in texts:
        widths = [max(width, len(text)) for width, text in zip(widths, row, strict=True)]
    numeric = [
        all(_is_number(row[i]) or row[i] is None for row in rows) and bool(rows)
        for i in range(len(headers))
    ]

    def line(cells: Sequence[str]) -> str:
        padded = [
            text.rjust(width) if right else text.ljust(width)
            for text, width, right in zip(cells, widths, numeric, strict=True)
        ]
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), *(line(row) for row in texts)])


def fields(pairs: Iterable[tuple[str, Any]]) -> str:
    """``key  value`` lines with the values lined up."""
    items = [(key, cell(value)) for key, value in pairs]
    width = max((len(key) for key, _ in items), default=0)
    return "\n".join(f"{key.ljust(width)}  {value}".rstrip() for key, value in items)


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested maps as dotted keys (``backoff.type``), the form ``configure`` accepts."""
    flat: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        if isinstance(value, Mapping) and value:
            flat.extend(flatten(value, f"{prefix}{key}."))
        else:
            flat.append((f"{prefix}{key}", value))
    return flat


def shorten(text: str, width: int = PREVIEW_WIDTH) -> str:
    """``text`` on one line, cut to ``width`` characters (ending in ``...`` when cut)."""
    text = text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= width else text[: width - len(ELLIPSIS)] + ELLIPSIS


def body_preview(body: bytes, width: int = PREVIEW_WIDTH) -> str:
    """Printable UTF-8 text as is (newlines and tabs escaped, cut to ``width``); anything
    else as ``hex:`` and the first bytes in hex; an empty body as ``(empty)``."""
    if not body:
        return "(empty)"
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(char.isprintable() or char in "\r\n\t" for char in text):
        return shorten(text, width)
    shown_bytes = (width - len("hex:") - len(ELLIPSIS)) // 2
    preview = "hex:" + body[:shown_bytes].hex()
    return preview + ELLIPSIS if len(body) > shown_bytes else preview


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


# -------------------------------------------------------------------------- times


def _span(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def relative(timestamp: float | None, now: float) -> str:
    """An epoch time as ``in 12s`` or ``3m ago`` seen from ``now``; None as ``-``."""
    if timestamp is None:
        return "-"
    delta = timestamp - now
    return f"in {_span(delta)}" if delta >= 0 else f"{_span(-delta)} ago"


def absolute(timestamp: float | None, now: float) -> str:
    """An epoch time in UTC with its distance from ``now``: ``2025-01-02 12:00:03Z (3m ago)``."""
    if timestamp is None:
        return "-"
    return f"{utc_time(timestamp)} ({relative(timestamp, now)})"


def utc_time(timestamp: float | None) -> str:
    """An epoch time in UTC, to the second: ``2025-01-02 12:00:03Z``; None as ``-``."""
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _zone(name: str) -> tzinfo | None:
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return None


def zoned_time(timestamp: float | None, zone_name: str) -> str:
    """An epoch time as the wall clock of the IANA zone ``zone_name`` reads it, with the
    zone's abbreviation: ``2025-03-30 03:00:00 CEST``. A zone this machine does not know
    gives the UTC time; None gives ``-``."""
    if timestamp is None:
        return "-"
    zone = _zone(zone_name)
    if zone is None:
        return utc_time(timestamp)
    return datetime.fromtimestamp(timestamp, zone).strftime("%Y-%m-%d %H:%M:%S %Z")


def parse_time(text: str, zone_name: str) -> float:
    """A time typed on the command line, as epoch seconds: a number is epoch seconds; else
    an ISO 8601 date or date and time (``2030-01-15``, ``2030-01-15T09:00``,
    ``2030-01-15T09:00+01:00``, ``...Z``). One without an offset is read in the IANA zone
    ``zone_name``. Raises ``UsageError``."""
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise UsageError(f"{text!r} is not a time")
        return seconds
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"{text!r} is neither epoch seconds nor an ISO 8601 time like "
            "2030-01-15T09:00 or 2030-01-15T09:00+01:00"
        ) from None
    if moment.tzinfo is None:
        zone = _zone(zone_name)
        if zone is None:
            raise UsageError(
                f"{text!r} has no UTC offset and the time zone {zone_name!r} to read it in "
                "is unknown here: add an offset (+01:00) or Z"
            )
        moment = moment.replace(tzinfo=zone)
    return moment.timestamp()


# --------------------------------------------------------------------------- JSON


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    raise TypeError(f"cannot show {type(value).__name__} as JSON")


def to_json(value: Any, *, indent: int | None = 2) -> str:
    """JSON text; bytes (message bodies) become base64 strings."""
    return json.dumps(value, indent=indent, default=_json_default)


# ------------------------------------------------------------------ key=value input


def parse_value(text: str) -> Any:
    """A setting value typed on the command line: ``none``/``null`` -> None,
    ``true``/``false`` -> bool, an integer, a float, JSON when it starts with ``{``, ``[``
    or ``"``, else the text itself."""
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    if text[:1] in ("{", "[", '"'):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise UsageError(f"{text!r} is not valid JSON: {error}") from None
    return text


def _split_pair(pair: str) -> tuple[str, str]:
    key, sep, text = pair.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"expected key=value, got {pair!r}")
    return key.strip(), text


def parse_settings(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` arguments as a settings map. A dotted key builds a nested map:
    ``backoff.type=fixed backoff.delay=2`` -> ``{"backoff": {"type": "fixed", "delay": 2}}``.
    Raises ``UsageError`` on a malformed pair or a key given twice."""
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, text = _split_pair(pair)
        path = key.split(".")
        if not all(path):
            raise UsageError(f"{key!r} is not a setting name (empty part between dots)")
        target = settings
        for part in path[:-1]:
            node = target.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"{key!r} conflicts with {part}={text!r} given before it")
            target = node
        if path[-1] in target:
            raise UsageError(f"{key!r} is given twice")
        target[path[-1]] = parse_value(text)
    return settings


def parse_headers(pairs: Sequence[str]) -> dict[str, str]:
    """``--header k=v`` arguments as a map of strings (values are never converted)."""
    headers: dict[str, str] = {}
    for pair in pairs:
        key, text = _split_pair(pair)
        if key in headers:
            raise UsageError(f"header {key!r} is given twice")
        headers[key] = text
    return headers
