"""Typed reading of request arguments. Every failure is a ``BadRequest`` that names the
op, the argument and what would have been accepted."""

from __future__ import annotations

from typing import Any, Final

import msgpack

from protocol import (
    PRIORITY_RANGE,
    BadRequest,
    require_queue_name,
    require_string_keys,
    shown,
)

from ._message import Headers, PutSpec, plain_spec
from ._outcomes import NO_RESULT
from ._schedules import FIELDS as SCHEDULE_FIELDS
from ._schedules import FIRE_HEADERS, ScheduleSpec, parse_spec
from ._settings import MAX_DURATION, MIN_LEASE, integer_in_range, number_in_range

MAX_BATCH: Final = 1000
MAX_WAITS_PER_CONNECTION: Final = 1000  # long-poll reserves one connection may have waiting
MAX_HEADERS: Final = 64
MAX_HEADER_KEY: Final = 256
MAX_HEADER_VALUE: Final = 4096
MAX_TEXT: Final = 64 * 1024  # error texts and bury reasons are cut to this many chars
MAX_KEY: Final = 256  # dedup key length
MAX_RESULT: Final = 1024 * 1024  # encoded size of one job result
INT64_RANGE: Final = (-(2**63), 2**63 - 1)
_MISSING: Final = object()


class Args:
    """One request's argument map, read once with type checks."""

    __slots__ = ("_args", "op")

    def __init__(self, op: str, args: dict[str, Any], allowed: frozenset[str]) -> None:
        if not allowed.issuperset(args):
            require_string_keys(args)  # the request frame's keys were not checked yet
            _refuse_unknown(op, args, allowed)
        self.op = op
        self._args = args

    def _get(self, name: str, default: Any) -> Any:
        value = self._args.get(name, default)
        if value is _MISSING:
            raise BadRequest(f"{self.op}: argument {name!r} is required")
        return value

    def queue(self, name: str = "queue") -> str:
        value = self._get(name, _MISSING)
        return require_queue_name(value, self.op)

    def schedule_name(self) -> str:
        return require_queue_name(self._get("name", _MISSING), self.op, "schedule")

    def given(self, name: str) -> bool:
        """True if the request has ``name`` and it is not nil."""
        return self._args.get(name) is not None

    def queues(self, name: str = "queues") -> list[str]:
        value = self._get(name, _MISSING)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or len(value) > 100:
            raise BadRequest(f"{self.op}: {name} must be a list of 1-100 queue names")
        return [require_queue_name(item, self.op) for item in value]

    def integer(self, name: str, default: Any = _MISSING, *, low: int, high: int) -> Any:
        value = self._args.get(name, default)
        if value is None and default is None:
            return None
        if value is _MISSING:
            raise BadRequest(f"{self.op}: argument {name!r} is required")
        return integer_in_range(name, value, low=low, high=high, op=self.op)

    def seconds(
        self,
        name: str,
        default: Any = _MISSING,
        *,
        low: float = 0,
        low_open: bool = False,
        high: float = MAX_DURATION,
    ) -> Any:
        value = self._args.get(name, default)
        if value is None and default is None:
            return None
        if value is _MISSING:
            raise BadRequest(f"{self.op}: argument {name!r} is required")
        return number_in_range(name, value, low=low, high=high, low_open=low_open, op=self.op)

    def number(self, name: str, default: Any = _MISSING, *, low: float, high: float) -> Any:
        value = self._get(name, default)
        if value is None and default is None:
            return None
        return number_in_range(name, value, low=low, high=high, op=self.op)

    def text(self, name: str, default: Any = _MISSING) -> Any:
        value = self._get(name, default)
        if value is None and default is None:
            return None
        if not isinstance(value, str):
            raise BadRequest(f"{self.op}: {name} must be a string, got {type(value).__name__}")
        return value[:MAX_TEXT]

    def flag(self, name: str, default: bool = False) -> bool:
        """A true/false argument (nil: ``default``); anything else is ``BadRequest``."""
        value = self._args.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise BadRequest(f"{self.op}: {name} must be true or false, got {shown(value)}")
        return value

    def binary(self, name: str) -> bytes:
        value = self._get(name, _MISSING)
        if not isinstance(value, bytes):
            raise BadRequest(f"{self.op}: {name} must be bytes, got {type(value).__name__}")
        return value

    def raw(self, name: str) -> Any:
        """The argument as sent, for a reader that checks it itself."""
        return self._get(name, _MISSING)

    def message_id(self, name: str = "id") -> int:
        return self.integer(name, low=1, high=INT64_RANGE[1])  # type: ignore[no-any-return]

    def ids(self, name: str, default: Any = _MISSING) -> Any:
        value = self._get(name, default)
        if value is None and default is None:
            return None
        if not isinstance(value, list) or len(value) > MAX_BATCH * 100:
            raise BadRequest(f"{self.op}: {name} must be a list of at most {MAX_BATCH * 100} ids")
        high = INT64_RANGE[1]
        return [integer_in_range(f"{name}[]", v, low=1, high=high, op=self.op) for v in value]

    def deliveries(self, name: str = "items") -> list[tuple[int, int]]:
        """A list of ``[id, lease]`` pairs, 1..MAX_BATCH of them."""
        items, _ = self._items(name, with_results=False)
        return [(item[0], item[1]) for item in items]

    def deliveries_with_results(
        self, name: str = "items"
    ) -> tuple[list[tuple[int, int]], list[Any] | None, int]:
        """Like ``deliveries``, where each item may also be ``[id, lease, result]``. Returns
        the pairs, a parallel list of results (``NO_RESULT`` where none; None when no item
        has a result), and the results' encoded size in all."""
        items, result_bytes = self._items(name, with_results=True)
        pairs = [(item[0], item[1]) for item in items]
        if all(len(item) == 2 for item in items):
            return pairs, None, 0
        results = [item[2] if len(item) == 3 else NO_RESULT for item in items]
        return pairs, results, result_bytes

    def _items(self, name: str, *, with_results: bool) -> tuple[list[list[Any]], int]:
        """The checked items, and the encoded size of their results."""
        value = self._get(name, _MISSING)
        shape = "[id, lease] or [id, lease, result]" if with_results else "[id, lease]"
        result_bytes = 0
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_BATCH:
            raise BadRequest(f"{self.op}: {name} must be a list of 1-{MAX_BATCH} {shape} items")
        longest = 3 if with_results else 2
        for item in value:
            if not (
                isinstance(item, list)
                and 2 <= len(item) <= longest
                and type(item[0]) is int
                and item[0] > 0
                and type(item[1]) is int
                and item[1] > 0
            ):
                raise BadRequest(f"{self.op}: each of {name} must be {shape}, got {shown(item)}")
            if len(item) == 3:
                size = len(msgpack.packb(item[2]))
                if size > MAX_RESULT:
                    raise BadRequest(f"{self.op}: a result is over {MAX_RESULT} bytes")
                result_bytes += size
        return value, result_bytes

    def mapping(self, name: str) -> dict[str, Any]:
        value = self._get(name, _MISSING)
        if not isinstance(value, dict):
            raise BadRequest(f"{self.op}: {name} must be a map")
        return value

    def schedule_spec(self) -> ScheduleSpec:
        """The schedule fields of this request (``body`` required, bytes)."""
        fields = {name: self._args[name] for name in SCHEDULE_FIELDS if name in self._args}
        fields = {name: value for name, value in fields.items() if value is not None}
        if type(fields.get("body")) is not bytes:
            raise BadRequest(f"{self.op}: body (bytes, msgpack bin) is required")
        if "headers" in fields:
            fields["headers"] = _headers(self.op, fields["headers"])
            if fields["headers"] and len(fields["headers"]) > MAX_HEADERS - len(FIRE_HEADERS):
                raise BadRequest(
                    f"{self.op}: headers: at most {MAX_HEADERS - len(FIRE_HEADERS)} entries "
                    f"(each fire adds {', '.join(FIRE_HEADERS)})"
                )
        return parse_spec(fields, self.op)

    def put_specs(self, name: str = "messages") -> list[PutSpec]:
        value = self._get(name, _MISSING)
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_BATCH:
            raise BadRequest(f"{self.op}: {name} must be a list of 1-{MAX_BATCH} messages")
        return [put_spec(item, index) for index, item in enumerate(value)]


_PUT_FIELDS: Final = frozenset(
    {"body", "priority", "delay", "max_attempts", "visibility_timeout", "headers", "key"}
)


def put_spec(item: Any, index: int | str | None = None) -> PutSpec:
    """One message map of a put; errors name it as "put: message <index>" (or, without an
    index, as put_and_wait's message). The accepting path reads each field once."""
    if not isinstance(item, dict):
        raise BadRequest(f"{_message_name(index)} must be a map with at least 'body'")
    if not _PUT_FIELDS.issuperset(item):
        _refuse_unknown(_message_name(index), item, _PUT_FIELDS)
    body = item.get("body", _MISSING)
    if type(body) is not bytes:
        if body is _MISSING:
            raise BadRequest(f"{_message_name(index)}: argument 'body' is required")
        raise BadRequest(f"{_message_name(index)}: body must be bytes (msgpack bin)")
    if len(item) == 1:  # the common case: a body and every option left to the queue
        return plain_spec(body)
    args = Args(_message_name(index), item, _PUT_FIELDS)
    return PutSpec(
        body=body,
        priority=args.integer("priority", 0, low=PRIORITY_RANGE[0], high=PRIORITY_RANGE[1]),
        delay=args.seconds("delay", 0.0),
        max_attempts=args.integer("max_attempts", None, low=1, high=2**31 - 1),
        visibility_timeout=args.seconds("visibility_timeout", None, low=MIN_LEASE),
        headers=_headers(args.op, item.get("headers")),
        key=_key(args.op, item.get("key")),
    )


def _refuse_unknown(op: str, args: dict[Any, Any], allowed: frozenset[str]) -> None:
    unknown = args.keys() - allowed
    names = shown(sorted(unknown, key=repr))
    raise BadRequest(f"{op}: unknown argument(s) {names}; allowed: {sorted(allowed)}")


def _message_name(index: int | str | None) -> str:
    """How errors name a message: by its index in a put, else by ``index`` itself."""
    if isinstance(index, str):
        return index
    return "put_and_wait: message" if index is None else f"put: message {index}"


def _key(where: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_KEY:
        raise BadRequest(f"{where}: key must be a string of 1-{MAX_KEY} chars")
    return value


def _headers(message: str, value: Any) -> Headers | None:
    if value is None:
        return None
    where = f"{message}: headers"
    if not isinstance(value, dict) or len(value) > MAX_HEADERS:
        raise BadRequest(f"{where} must be a map of at most {MAX_HEADERS} entries")
    for key, item in value.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_HEADER_KEY:
            raise BadRequest(f"{where}: keys must be strings of 1-{MAX_HEADER_KEY} chars")
        if isinstance(item, str):
            if len(item) > MAX_HEADER_VALUE:
                raise BadRequest(f"{where}: {shown(key)} is over {MAX_HEADER_VALUE} chars")
        elif isinstance(item, bool) or not isinstance(item, int):
            raise BadRequest(f"{where}: {shown(key)} must be a string or an integer")
        elif not INT64_RANGE[0] <= item <= INT64_RANGE[1]:
            raise BadRequest(f"{where}: {shown(key)} is outside the 64-bit integer range")
    return value or None
