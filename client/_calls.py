"""Every client operation, defined once: how to build its request and read its result.

Each function returns a ``Call``; ``Client`` runs it over a blocking socket and
``AsyncClient`` over an asyncio connection, so both expose the same methods with the same
signatures and docs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Generic, NamedTuple, TypeVar

from protocol import MAX_WAIT, PRIORITY_RANGE, BadRequest, SluiceError, require_queue_name, shown

from ._message import Message
from .errors import JobFailed, Timeout

T = TypeVar("T")
UNKNOWN: Final[Any] = object()  # Call.known of a call only the broker can answer
Body = bytes | bytearray | memoryview | str
Delivery = Message | tuple[int, int]


class Call(NamedTuple, Generic[T]):
    """One request to send and how to read its result. (A named tuple: built on every
    call, several times faster than a frozen dataclass.)"""

    op: str
    args: dict[str, Any]
    parse: Callable[[Any], T]
    wait: float = 0.0  # extra seconds the broker may legitimately hold the reply
    known: Any = UNKNOWN  # the result, where it is known without asking (an empty batch)
    split: Split | None = None  # how to send a list argument longer than one frame takes


class Split(NamedTuple):
    """How a call whose list argument ``key`` is longer than the broker's ``max_batch``
    goes as several frames: ``merge`` joins their parsed results in order; ``failed``
    makes the error to raise from the errors of the frames that failed (the first is
    raised, told of the others) and the parsed results of those that did not (they did
    what they did: nothing is undone)."""

    key: str
    merge: Callable[[list[Any]], Any]
    failed: Callable[[list[SluiceError], list[Any]], SluiceError]


def split_call(call: Call[T], max_batch: int) -> list[Call[T]] | None:
    """The calls to send instead of ``call``, one frame each, when its list argument does
    not fit in one; None when it does."""
    if call.split is None:
        return None
    items = call.args[call.split.key]
    if len(items) <= max_batch:
        return None
    return [
        call._replace(args={**call.args, call.split.key: items[start : start + max_batch]})
        for start in range(0, len(items), max_batch)
    ]


def merge_answers(call: Call[T], parts: list[Call[T]], answers: list[tuple[bool, Any]]) -> T:
    """The result of a call sent as ``parts``, from their ``(ok, value)`` answers in order;
    if any failed, the first failure's error, told what the other frames did."""
    assert call.split is not None
    done = [part.parse(value) for part, (ok, value) in zip(parts, answers, strict=True) if ok]
    errors = [value for ok, value in answers if not ok]
    if errors:
        raise call.split.failed(errors, done)
    return call.split.merge(done)  # type: ignore[no-any-return]


def _ids_stored(errors: list[SluiceError], stored: list[list[MessageId]]) -> SluiceError:
    """A put frame is all or nothing: the ids stored are those of the frames that
    succeeded."""
    ids = _all_ids(stored)
    note = f"{len(ids)} messages of the others were stored: their ids are in details['ids']"
    return _told(errors, {"stored": len(ids), "ids": ids}, note)


def _settled(errors: list[SluiceError], counts: list[int]) -> SluiceError:
    """An ack or nack frame that fails may have settled some of its items (``done``) and
    names the rest (``failed``): summed and joined over every frame."""
    done = sum(counts) + sum(int(error.details.get("done", 0)) for error in errors)
    failed = [item for error in errors for item in error.details.get("failed", ())]
    return _told(errors, {"done": done, "failed": failed}, f"{done} items were settled")


def _told(errors: list[SluiceError], details: dict[str, Any], note: str) -> SluiceError:
    """The first frame's error, with ``details`` and a note on what the frames did."""
    error = errors[0]
    error.details = {**error.details, **details}
    error.message += f" ({len(errors)} of the frames this call was cut into failed; {note})"
    error.args = (error.message,)
    return error


def _all_ids(parts: list[list[MessageId]]) -> list[MessageId]:
    return [message_id for part in parts for message_id in part]


PUT_SPLIT: Final = Split("messages", _all_ids, _ids_stored)
SETTLE_SPLIT: Final = Split("items", sum, _settled)
# A named tuple's own `__new__` is a Python function: the builders called once per job
# (put, put_many, reserve, ack; and the asyncio client's pending entry) make the same
# tuple in C, every field given in order (a test checks each against the constructor).
new_tuple: Final = tuple.__new__


def _queue(name: str) -> str:
    return require_queue_name(name, "client")


def _seconds(where: str, value: float, *, low_open: bool = False) -> float:
    """A number of seconds a long-poll may wait: 0 (or above, if ``low_open``) to the
    protocol's MAX_WAIT. Refused here, before sending, as the broker would refuse it."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= MAX_WAIT
        or (low_open and value == 0)
    ):
        low = "more than 0" if low_open else "0"
        raise BadRequest(f"{where} must be {low} to {MAX_WAIT:g} seconds, got {shown(value)}")
    return float(value)


def _priority(value: int) -> int:
    low, high = PRIORITY_RANGE
    if type(value) is not int or not low <= value <= high:
        raise BadRequest(f"priority must be an integer in [{low}, {high}], got {shown(value)}")
    return value


def _body(body: Body) -> bytes:
    if type(body) is bytes:
        return body
    if isinstance(body, str):
        return body.encode()
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body)
    raise BadRequest(f"body must be bytes or str, got {type(body).__name__}")


def _spec(
    body: Body,
    priority: int,
    delay: float,
    max_attempts: int | None,
    visibility_timeout: float | None,
    headers: Mapping[str, str | int] | None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"body": _body(body)}
    if priority:
        spec["priority"] = _priority(priority)
    if delay:
        spec["delay"] = delay
    if max_attempts is not None:
        spec["max_attempts"] = max_attempts
    if visibility_timeout is not None:
        spec["visibility_timeout"] = visibility_timeout
    if headers:
        spec["headers"] = dict(headers)
    return spec


def _pairs(deliveries: Delivery | Iterable[Delivery]) -> list[list[int]]:
    if isinstance(deliveries, Message) or (
        isinstance(deliveries, tuple) and len(deliveries) == 2 and isinstance(deliveries[0], int)
    ):
        deliveries = [deliveries]
    pairs = []
    for item in deliveries:
        if isinstance(item, Message):
            pairs.append([item.id, item.lease])
        else:
            message_id, lease = item
            pairs.append([message_id, lease])
    return pairs


def _field(name: str) -> Callable[[Any], Any]:
    return lambda result: result[name]


_acked: Final = _field("acked")  # (made once: an ack's reader is the same every time)


class MessageId(int):
    """A message id (an ``int``) that also says whether the put that returned it found a
    live message with the same dedup ``key`` and so added nothing (``duplicate``)."""

    duplicate: bool = False  # a class default: most ids are built by int's own __new__

    def __new__(cls, value: int, duplicate: bool = False) -> MessageId:
        message_id = super().__new__(cls, value)
        if duplicate:
            message_id.duplicate = True
        return message_id


def _first_id(result: Any) -> MessageId:
    return _ids(result)[0]


def _messages(result: Any) -> list[Message]:
    return [Message.from_wire(wire) for wire in result["messages"]]


def _ids(result: Any) -> list[MessageId]:
    duplicates = result.get("duplicates")
    if not duplicates:
        return [int.__new__(MessageId, i) for i in result["ids"]]
    taken = set(duplicates)
    return [MessageId(i, index in taken) for index, i in enumerate(result["ids"])]


def _outcome(result: Any) -> Any:
    """The result of a finished job; raises ``JobFailed`` if it was dead-lettered or
    removed, ``Timeout`` if it is still pending."""
    state = result["state"]
    if state == "done":
        return result.get("result")
    if state in ("dead", "gone"):
        raise JobFailed(result)
    raise Timeout(f"job {result['id']} has no result yet (it is {state}); it stays queued")


def ping() -> Call[float]:
    """Round trip to the broker; returns the broker's clock (epoch seconds)."""
    return Call("ping", {}, _field("time"))


def put(
    queue: str,
    body: Body,
    *,
    priority: int = 0,
    delay: float = 0,
    max_attempts: int | None = None,
    visibility_timeout: float | None = None,
    headers: Mapping[str, str | int] | None = None,
    key: str | None = None,
) -> Call[MessageId]:
    """Enqueue one message; returns its id once the broker has stored it.

    ``priority``: higher is delivered first. ``delay``: seconds before it can be reserved.
    ``max_attempts`` / ``visibility_timeout``: override the queue's settings for this
    message. ``headers``: a small map of str to str or int. A str body is sent as UTF-8.
    ``key``: a dedup key. While a message with this key is live in the queue, and for the
    queue's ``dedup_window`` after it is acked, dead-lettered or cancelled, the put adds
    nothing and returns that message's id with ``.duplicate`` True."""
    spec = _spec(body, priority, delay, max_attempts, visibility_timeout, headers)
    if key is not None:
        spec["key"] = key
    args = {"queue": _queue(queue), "messages": [spec]}
    return new_tuple(Call, ("put", args, _first_id, 0.0, UNKNOWN, None))


def put_many(
    queue: str,
    bodies: Iterable[Body],
    *,
    priority: int = 0,
    delay: float = 0,
    max_attempts: int | None = None,
    visibility_timeout: float | None = None,
    headers: Mapping[str, str | int] | None = None,
) -> Call[list[MessageId]]:
    """Enqueue many messages; returns their ids in order. The keyword options apply to
    every message. Up to the broker's ``max_batch`` (1,000) go in one frame, all or
    nothing; more are cut into frames of that size, sent pipelined, each all or nothing:
    if one fails, its error says how many of the others were stored and carries their
    ids (``details["stored"]``, ``details["ids"]``), so a retry with dedup keys stores
    nothing twice. An empty list returns at once."""
    specs = [_spec(b, priority, delay, max_attempts, visibility_timeout, headers) for b in bodies]
    known = [] if not specs else UNKNOWN  # nothing to put: no round trip
    args = {"queue": _queue(queue), "messages": specs}
    return new_tuple(Call, ("put", args, _ids, 0.0, known, PUT_SPLIT))


def put_and_wait(
    queue: str,
    body: Body,
    *,
    timeout: float,
    priority: int = 0,
    max_attempts: int | None = None,
    visibility_timeout: float | None = None,
    headers: Mapping[str, str | int] | None = None,
    key: str | None = None,
) -> Call[Any]:
    """Put one message and wait up to ``timeout`` seconds for a worker to ack it; returns
    the result the worker acked it with (None if it sent none). Request/response over
    the queue. Raises ``JobFailed`` (with ``reason`` and ``last_error``) if the job is
    dead-lettered, ``Timeout`` if no result came in time (the job stays queued)."""
    spec = _spec(body, priority, 0, max_attempts, visibility_timeout, headers)
    if key is not None:
        spec["key"] = key
    timeout = _seconds("put_and_wait: timeout", timeout, low_open=True)
    args = {"queue": _queue(queue), "message": spec, "timeout": timeout}
    return Call("put_and_wait", args, _outcome, wait=timeout)


def result(message_id: int, *, wait: float = 0) -> Call[Any]:
    """The result a worker acked message ``message_id`` with, waiting up to ``wait``
    seconds for it. Raises ``JobFailed`` if the message was dead-lettered, ``Timeout`` if
    it is still pending, ``NotFound`` if the broker has no record (unknown id, or acked
    without a result, or the result outlived the queue's ``result_ttl``)."""
    args: dict[str, Any] = {"id": message_id}
    if _seconds("result: wait", wait):
        args["wait"] = wait
    return Call("result", args, _outcome, wait=float(wait))


def reserve(
    queue_or_queues: str | Sequence[str],
    *,
    max_messages: int = 1,
    wait: float = 0,
    visibility_timeout: float | None = None,
) -> Call[list[Message]]:
    """Lease up to ``max_messages`` messages, best first across the named queues.

    With ``wait`` > 0, long-polls up to that many seconds for a first message; an empty
    list means nothing arrived in time. Each message must then be acked, nacked, buried or
    touched before its ``lease_deadline``, or it is delivered again."""
    names = [queue_or_queues] if isinstance(queue_or_queues, str) else list(queue_or_queues)
    args: dict[str, Any] = {"queues": [_queue(n) for n in names], "max": max_messages}
    if wait and _seconds("reserve: wait", wait):
        args["wait"] = wait
    if visibility_timeout is not None:
        args["visibility_timeout"] = visibility_timeout
    return new_tuple(Call, ("reserve", args, _messages, float(wait), UNKNOWN, None))


class _NoResult:
    def __repr__(self) -> str:
        return "<no result>"


_NO_RESULT: Any = _NoResult()  # ack without a result (None is a result)


def ack(deliveries: Delivery | Iterable[Delivery], *, result: Any = _NO_RESULT) -> Call[int]:
    """Finish one message or many (``Message`` objects or ``(id, lease)`` pairs). Raises
    ``LeaseLost`` if any lease is not current; ``details["failed"]`` lists those ids, and
    the others were acked.

    ``result`` (bytes or anything msgpack can carry) is kept with each acked message for
    its queue's ``result_ttl``, for ``result()``, ``status()`` and ``put_and_wait``."""
    items: list[list[Any]] = _pairs(deliveries)
    if result is not _NO_RESULT:
        items = [[*item, result] for item in items]
    known = 0 if not items else UNKNOWN
    return new_tuple(Call, ("ack", {"items": items}, _acked, 0.0, known, SETTLE_SPLIT))


def nack(
    deliveries: Delivery | Iterable[Delivery],
    *,
    delay: float | None = None,
    error: str | None = None,
) -> Call[int]:
    """Give messages back for a retry after ``delay`` seconds (None: the queue's backoff).
    ``error`` is kept as the message's last error. A message whose attempts are used up is
    dead-lettered instead. Lease failures as for ``ack``."""
    args: dict[str, Any] = {"items": _pairs(deliveries)}
    if delay is not None:
        args["delay"] = delay
    if error is not None:
        args["error"] = error
    known = 0 if not args["items"] else UNKNOWN
    return Call("nack", args, _field("nacked"), 0.0, known, SETTLE_SPLIT)


def touch(message: Message, *, seconds: float | None = None) -> Call[float]:
    """Extend the lease to now + ``seconds`` (default: its visibility timeout). Returns the
    new deadline and updates ``message.lease_deadline``."""
    args: dict[str, Any] = {"id": message.id, "lease": message.lease}
    if seconds is not None:
        args["seconds"] = seconds

    def parse(result: Any) -> float:
        message.lease_deadline = result["lease_deadline"]
        return message.lease_deadline

    return Call("touch", args, parse)


def progress(message: Message, percent: float, note: str = "") -> Call[None]:
    """Report how far the handler of a reserved message has got (0-100, and a short
    note); ``status(id)`` shows it. Raises ``LeaseLost`` if the lease is not current."""
    args = {"id": message.id, "lease": message.lease, "percent": percent, "note": note}
    return Call("progress", args, lambda r: None)


def bury(message: Message, *, reason: str) -> Call[int]:
    """Dead-letter a reserved message now, with ``reason``; returns 1 (the messages
    buried, as ``ack`` and ``nack`` return theirs). Raises ``LeaseLost`` if the lease is
    not current."""
    args = {"id": message.id, "lease": message.lease, "reason": reason}
    return Call("bury", args, lambda result: int(result.get("buried", 1)))


def cancel(message_id: int) -> Call[bool]:
    """Remove a ready or delayed message. False if it is reserved, dead or already gone."""
    return Call("cancel", {"id": message_id}, _field("cancelled"))


def status(message_id: int) -> Call[dict[str, Any]]:
    """State, attempts, queue, priority, due time, last error... of a live message; once
    acked with a kept result, ``{"state": "done", "result", "done_at"}`` for the queue's
    ``result_ttl``. Raises ``NotFound`` once it is acked without one, cancelled or purged."""
    return Call("status", {"id": message_id}, dict)


def stats(queue: str) -> Call[dict[str, Any]]:
    """Counts by state (ready, delayed, reserved, dead), waiting consumers, and totals
    (put, delivered, acked, nacked, expired, dead_lettered) of one queue."""
    return Call("stats", {"queue": _queue(queue)}, dict)


def queues() -> Call[list[dict[str, Any]]]:
    """Every queue with its counts by state, sorted by name."""
    return Call("queues", {}, _field("queues"))


def configure(queue: str, **settings: Any) -> Call[dict[str, Any]]:
    """Change queue settings (visibility_timeout, max_attempts, backoff, paused, max_body,
    dead_letter_ttl, result_ttl, dedup_window, rate_limit, max_in_flight); returns all of
    the queue's settings. ``rate_limit={"rate": 10, "per": 1, "burst": 10}`` caps
    deliveries across every consumer with a token bucket; ``max_in_flight=N`` caps the
    messages reserved at once; None turns either off."""
    return Call("configure", {"queue": _queue(queue), "settings": settings}, _field("settings"))


def pause(queue: str) -> Call[dict[str, Any]]:
    """Stop deliveries from ``queue``; puts are still accepted."""
    return Call("pause", {"queue": _queue(queue)}, _field("settings"))


def resume(queue: str) -> Call[dict[str, Any]]:
    """Start delivering from a paused queue again."""
    return Call("resume", {"queue": _queue(queue)}, _field("settings"))


def purge(queue: str) -> Call[int]:
    """Delete every ready and delayed message of ``queue``; returns how many."""
    return Call("purge", {"queue": _queue(queue)}, _field("purged"))


def dead_letters(
    queue: str, *, limit: int = 100, after: int | None = None
) -> Call[list[dict[str, Any]]]:
    """Dead letters of ``queue`` in id order (status maps, with reason and last error);
    pass the last id seen as ``after`` for the next page."""
    args: dict[str, Any] = {"queue": _queue(queue), "limit": limit}
    if after is not None:
        args["after"] = after
    return Call("dead_letters", args, _field("items"))


def peek(queue: str, state: str = "ready", *, limit: int = 10) -> Call[list[dict[str, Any]]]:
    """Look at up to ``limit`` messages of ``queue`` in ``state`` (ready, delayed,
    reserved or dead) without changing them: status maps plus ``body``. Ready ones come
    in delivery order, delayed by due time, reserved by lease deadline, dead by id."""
    args = {"queue": _queue(queue), "state": state, "limit": limit}
    return Call("peek", args, _field("items"))


def replay(queue: str, ids: Iterable[int] | None = None) -> Call[int]:
    """Move dead letters (all, or the given ids) back to ready with attempts reset to 0;
    returns how many moved."""
    args: dict[str, Any] = {"queue": _queue(queue)}
    if ids is not None:
        args["ids"] = list(ids)
    return Call("replay", args, _field("replayed"))


def purge_dead(queue: str) -> Call[int]:
    """Delete every dead letter of ``queue``; returns how many."""
    return Call("purge_dead", {"queue": _queue(queue)}, _field("purged"))


def delete_queue(queue: str, *, force: bool = False) -> Call[dict[str, Any]]:
    """Remove ``queue``: its settings and the bindings into it; long-polls on it get
    nothing. A queue holding messages (of any state) or schedules is refused with
    ``BadRequest`` unless ``force``, which deletes them too (a leased message's ack then
    raises ``LeaseLost``). Returns ``{deleted, messages, schedules, bindings}``: what
    went with it. ``NotFound`` if there is no such queue."""
    args: dict[str, Any] = {"queue": _queue(queue)}
    if force:
        args["force"] = True
    return Call("delete_queue", args, dict)


def schedule(
    queue: str,
    name: str,
    body: Body,
    *,
    cron: str | None = None,
    every: float | None = None,
    tz: str = "UTC",
    priority: int = 0,
    headers: Mapping[str, str | int] | None = None,
    max_attempts: int | None = None,
    start_at: float | None = None,
    end_at: float | None = None,
    limit: int | None = None,
    catchup: str = "latest",
    overlap: str = "allow",
) -> Call[dict[str, Any]]:
    """Create or replace the recurring schedule ``name`` of ``queue``: the broker puts
    ``body`` on each slot of ``cron`` (5 fields or ``@hourly``, ``@daily``, ``@weekly``,
    ``@monthly``, ``@yearly``, in the IANA time zone ``tz``) or ``every`` seconds (at least
    0.1), exactly one of the two. Each message has the dedup key
    ``schedule:<name>:<slot>`` and headers ``schedule`` and ``scheduled_for``, so a slot
    never fires twice. ``start_at``/``end_at`` (epoch seconds) bound the slots, ``limit``
    the number of fires. ``catchup`` after downtime: ``latest`` (fire the newest missed
    slot once), ``skip`` or ``all`` (each, at most 1,000). ``overlap="skip"``: no fire
    while the previous fire's message is still ready, delayed or reserved. Returns the
    schedule with its ``next_at``."""
    args: dict[str, Any] = {
        "queue": _queue(queue),
        "name": require_queue_name(name, "client", "schedule"),
        "body": _body(body),
        "tz": tz,
        "priority": _priority(priority),
        "catchup": catchup,
        "overlap": overlap,
    }
    optional = {
        "cron": cron,
        "every": every,
        "headers": dict(headers) if headers else None,
        "max_attempts": max_attempts,
        "start_at": start_at,
        "end_at": end_at,
        "limit": limit,
    }
    args.update({key: value for key, value in optional.items() if value is not None})
    return Call("schedule", args, _field("schedule"))


def unschedule(queue: str, name: str) -> Call[bool]:
    """Remove a schedule (the messages it put stay); False if there was none."""
    args = {"queue": _queue(queue), "name": require_queue_name(name, "client", "schedule")}
    return Call("unschedule", args, _field("removed"))


def schedules(queue: str | None = None) -> Call[list[dict[str, Any]]]:
    """Every schedule (of ``queue``, if given), by queue and name, each with its
    ``next_at``, ``last_slot``, ``runs``, ``last_message_id``, ``missed`` and ``skipped``."""
    args = {} if queue is None else {"queue": _queue(queue)}
    return Call("schedules", args, _field("schedules"))


def trigger(queue: str, name: str) -> Call[int]:
    """Fire a schedule now, outside its slots; returns the id of the message it put."""
    args = {"queue": _queue(queue), "name": require_queue_name(name, "client", "schedule")}
    return Call("trigger", args, _field("id"))


class Published(int):
    """What a publish reached: the live subscriptions (the int itself, and
    ``subscribers``) and the bound queues it put a copy into (``queues``)."""

    queues: int = 0

    @property
    def subscribers(self) -> int:
        return int(self)


def _published(result: Any) -> Published:
    published = Published(result["subscribers"])
    published.queues = result.get("queues", 0)
    return published


def publish(
    channel: str,
    data: Body,
    *,
    priority: int | None = None,
    delay: float | None = None,
    max_attempts: int | None = None,
    headers: Mapping[str, str | int] | None = None,
    key: str | None = None,
) -> Call[Published]:
    """Send ``data`` on ``channel``: to the live subscriptions of every pattern matching
    it (at most once, only those present now: nothing is stored for them), and as a
    message into every queue bound to a matching pattern (``bind``), with the message
    options given here, as ``put`` takes them. Returns the subscriptions reached (an int)
    with ``.queues``; when it reached a queue, once the copies are stored."""
    args: dict[str, Any] = {"channel": channel, "data": _body(data)}
    options = {"priority": priority, "delay": delay, "max_attempts": max_attempts, "key": key}
    args.update((name, value) for name, value in options.items() if value is not None)
    if headers is not None:
        args["headers"] = dict(headers)
    return Call("publish", args, _published)


def bind(pattern: str, queue: str) -> Call[bool]:
    """Make every publish on a channel ``pattern`` matches put a copy into ``queue``
    (persisted); False if that binding existed."""
    return Call("bind", {"pattern": pattern, "queue": _queue(queue)}, _field("bound"))


def unbind(pattern: str, queue: str) -> Call[bool]:
    """Remove a binding; False if there was none."""
    return Call("unbind", {"pattern": pattern, "queue": _queue(queue)}, _field("unbound"))


def bindings() -> Call[list[tuple[str, str]]]:
    """Every binding, as ``(pattern, queue)`` pairs, sorted."""
    return Call(
        "bindings", {}, lambda result: [(b["pattern"], b["queue"]) for b in result["bindings"]]
    )


def unsubscribe(subscription: int) -> Call[bool]:
    """End a subscription by its id; False if it had ended already."""
    return Call("unsubscribe", {"subscription": subscription}, _field("unsubscribed"))
