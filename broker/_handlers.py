"""One small handler per op: read the arguments, call the core, shape the result.

Handlers see no sockets. Each returns the reply's result, or ``PENDING`` when a reserve
long-polls (its reply then comes from the core's completions). ``hello`` is not here: it
changes connection state and lives with the connection.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Final, Protocol, cast

from protocol import MAX_WAIT, BadRequest, TooLarge, UnknownOp

from ._args import MAX_BATCH, MAX_WAITS_PER_CONNECTION, Args, put_spec
from ._channels import Channels, Sink
from ._core import Core
from ._events import EVENT_PREFIX
from ._feed import EventFeed
from ._lifecycle import State
from ._message import Message, PutSpec
from ._schedules import FIELDS as SCHEDULE_FIELDS
from ._schedules import fire_spec
from ._settings import DEFAULT_SETTINGS, MIN_LEASE
from ._subjects import require_channel, require_pattern

PEEKABLE: Final = (State.READY, State.DELAYED, State.RESERVED, State.DEAD)


class _Pending:
    def __repr__(self) -> str:
        return "PENDING"


PENDING: Final = _Pending()
# Ops whose replies promise nothing durable: they go out without waiting for a commit.
# (A reserve's reply waits only for the puts of what it delivers; see the server.)
READ_ONLY_OPS: Final = frozenset(
    {"ping", "status", "queues", "stats", "dead_letters", "peek", "reserve", "schedules"}
    | {"publish", "subscribe", "unsubscribe", "bindings"}  # (a publish that puts: see Call)
)
MAX_NOTE: Final = 200  # characters of a progress note


@dataclass(slots=True)
class Call:
    """What a handler may use: the core, the time of the request, a key that names this
    request if it has to wait, how many more waits its connection may hold, and the
    store's room checks for new data (puts, ack results). A reserve leaves the messages
    it handed out in ``delivered``. ``channels`` are the live subscriptions; ``sink`` is
    where a subscription made by this request sends its frames (None: this view cannot
    subscribe); ``feed`` replays job events to one. A read-only op that stored something
    after all (a publish that reached a bound queue) sets ``stored``: its reply then
    waits for the commit."""

    core: Core
    now: float
    waiter_key: Hashable
    waits_left: int = MAX_WAITS_PER_CONNECTION
    space: Space | None = None  # the store's room for new data; None in memory
    delivered: list[Message] | None = None
    channels: Channels | None = None
    sink: Sink | None = None
    stored: bool = False
    feed: EventFeed | None = None  # job events (None: this view has none)


class Space(Protocol):
    """Room checks for new data; each raises ``StorageFull`` (counting nothing) if there
    is none."""

    def admit_put(self, specs: list[PutSpec]) -> None: ...

    def admit_results(self, size: int, count: int) -> None: ...


Handler = Callable[[Call, Args], Any]


def _ping(call: Call, args: Args) -> Any:
    return {"time": call.now}


def _put(call: Call, args: Args) -> Any:
    queue, specs = args.queue(), args.put_specs()
    if call.space is not None:
        call.space.admit_put(specs)
    ids = call.core.put(call.now, queue, specs)
    if ids.duplicates:
        return {"ids": ids, "duplicates": ids.duplicates}
    return {"ids": ids}


def _check_wait(call: Call, wait: float) -> None:
    if wait > 0 and call.waits_left <= 0:
        raise BadRequest(
            f"this connection already has {MAX_WAITS_PER_CONNECTION} long-polls (waiting "
            "reserves and results); wait for their replies, or use more connections"
        )


def _put_and_wait(call: Call, args: Args) -> Any:
    timeout = args.seconds("timeout", high=MAX_WAIT, low_open=True)
    _check_wait(call, timeout)
    queue = args.queue()
    message = args.mapping("message")
    specs = [put_spec(message)]
    if specs[0].delay:
        raise BadRequest("put_and_wait: a message cannot be delayed; use put and result")
    if call.space is not None:
        call.space.admit_put(specs)
    (message_id,) = call.core.put(call.now, queue, specs)
    dedup_key = (queue, specs[0].key) if specs[0].key is not None else None
    return _outcome_or_pending(call, message_id, timeout, dedup_key)


def _result(call: Call, args: Args) -> Any:
    wait = args.seconds("wait", 0.0, high=MAX_WAIT)
    _check_wait(call, wait)
    return _outcome_or_pending(call, args.message_id(), wait)


def _outcome_or_pending(
    call: Call, message_id: int, wait: float, dedup_key: tuple[str, str] | None = None
) -> Any:
    outcome = call.core.wait_result(call.now, message_id, wait, call.waiter_key, dedup_key)
    return PENDING if outcome is None else outcome


def _reserve(call: Call, args: Args) -> Any:
    wait = args.seconds("wait", 0.0, high=MAX_WAIT)
    _check_wait(call, wait)
    messages = call.core.reserve(
        call.now,
        args.queues(),
        args.integer("max", 1, low=1, high=MAX_BATCH),
        visibility_timeout=args.seconds("visibility_timeout", None, low=MIN_LEASE),
        wait=wait,
        waiter_key=call.waiter_key,
    )
    if not messages and wait > 0:
        return PENDING
    call.delivered = messages
    return deliveries(messages)


def deliveries(messages: list[Any]) -> dict[str, Any]:
    return {"messages": [message.delivery() for message in messages]}


def _ack(call: Call, args: Args) -> Any:
    deliveries, results, result_bytes = args.deliveries_with_results()
    if results is not None and call.space is not None:
        call.space.admit_results(result_bytes, len(results))
    return {"acked": call.core.ack(call.now, deliveries, results)}


def _nack(call: Call, args: Args) -> Any:
    count = call.core.nack(
        call.now,
        args.deliveries(),
        delay=args.seconds("delay", None),
        error=args.text("error", None),
    )
    return {"nacked": count}


def _touch(call: Call, args: Args) -> Any:
    deadline = call.core.touch(
        call.now,
        args.message_id(),
        args.integer("lease", low=1, high=2**63 - 1),
        args.seconds("seconds", None, low=MIN_LEASE),
    )
    return {"lease_deadline": deadline}


def _progress(call: Call, args: Args) -> Any:
    percent = args.number("percent", low=0, high=100)
    note = args.text("note", "")[:MAX_NOTE]
    call.core.progress(
        call.now, args.message_id(), args.integer("lease", low=1, high=2**63 - 1), percent, note
    )
    return {}


def _bury(call: Call, args: Args) -> Any:
    call.core.bury(
        call.now,
        args.message_id(),
        args.integer("lease", low=1, high=2**63 - 1),
        args.text("reason", "buried"),
    )
    return {"buried": 1}


def _cancel(call: Call, args: Args) -> Any:
    return {"cancelled": call.core.cancel(call.now, args.message_id())}


def _status(call: Call, args: Args) -> Any:
    return call.core.status(call.now, args.message_id())


def _queues(call: Call, args: Args) -> Any:
    return {"queues": call.core.list_queues(call.now)}


def _stats(call: Call, args: Args) -> Any:
    return call.core.stats(call.now, args.queue())


def _configure(call: Call, args: Args) -> Any:
    return {"settings": call.core.configure(call.now, args.queue(), args.mapping("settings"))}


def _pause(call: Call, args: Args) -> Any:
    return {"settings": call.core.configure(call.now, args.queue(), {"paused": True})}


def _resume(call: Call, args: Args) -> Any:
    return {"settings": call.core.configure(call.now, args.queue(), {"paused": False})}


def _purge(call: Call, args: Args) -> Any:
    return {"purged": call.core.purge(call.now, args.queue())}


def _delete_queue(call: Call, args: Args) -> Any:
    return call.core.delete_queue(call.now, args.queue(), args.flag("force"))


def _dead_letters(call: Call, args: Args) -> Any:
    limit = args.integer("limit", 100, low=1, high=MAX_BATCH)
    after = args.integer("after", None, low=0, high=2**63 - 1)
    page = call.core.dead_letters(call.now, args.queue(), limit + 1, after)
    more = len(page) > limit
    page = page[:limit]
    return {
        "items": [message.status() for message in page],
        "next": page[-1].id if more else None,
    }


PEEK_STATES: Final = {state.value: state for state in PEEKABLE}


def _peek(call: Call, args: Args) -> Any:
    name = args.text("state", "ready")
    state = PEEK_STATES.get(name)
    if state is None:
        raise BadRequest(f"peek: state must be one of {sorted(PEEK_STATES)}, got {name!r}")
    limit = args.integer("limit", 10, low=1, high=MAX_BATCH)
    after = args.integer("after", None, low=1, high=2**63 - 1)
    page = call.core.peek(call.now, args.queue(), state, limit + 1, after)
    more = len(page) > limit
    page = page[:limit]
    return {
        "items": [message.status() | {"body": message.body} for message in page],
        "next": page[-1].id if more else None,
    }


def _replay(call: Call, args: Args) -> Any:
    return {"replayed": call.core.replay(call.now, args.queue(), args.ids("ids", None))}


def _purge_dead(call: Call, args: Args) -> Any:
    return {"purged": call.core.purge_dead(call.now, args.queue())}


def _schedule(call: Call, args: Args) -> Any:
    name = args.schedule_name()
    spec = args.schedule_spec()
    if call.space is not None:  # its record holds the body
        call.space.admit_put([PutSpec(body=spec.body, headers=spec.headers)])
    return {"schedule": call.core.set_schedule(call.now, args.queue(), name, spec)}


def _unschedule(call: Call, args: Args) -> Any:
    return {"removed": call.core.unschedule(call.now, args.queue(), args.schedule_name())}


def _schedules(call: Call, args: Args) -> Any:
    queue = args.queue() if args.given("queue") else None
    return {"schedules": call.core.list_schedules(call.now, queue)}


def _trigger(call: Call, args: Args) -> Any:
    queue, name = args.queue(), args.schedule_name()
    schedule = call.core.schedules.get((queue, name))
    if schedule is not None and call.space is not None:  # a put like any other
        call.space.admit_put([fire_spec(schedule.spec, name, call.now)])
    return {"id": call.core.trigger(call.now, queue, name)}


PUBLISH_PUT_FIELDS: Final = ("priority", "delay", "max_attempts", "headers", "key")


def _publish(call: Call, args: Args) -> Any:
    channel = require_channel(args.raw("channel"), "publish")
    if channel.partition(".")[0] == EVENT_PREFIX:
        raise BadRequest(
            f"publish: channels {EVENT_PREFIX}.* carry the broker's job events; "
            "publish on another channel"
        )
    data = args.binary("data")
    given = {name: args.raw(name) for name in PUBLISH_PUT_FIELDS if args.given(name)}
    spec = put_spec({**given, "body": data}, "publish") if given else PutSpec(body=data)
    queues = call.core.bindings.queues_for(channel)
    if queues:
        _check_body(call.core, queues, len(data))  # all copies or none
        call.core.make_room(queues)
        if call.space is not None:
            call.space.admit_put([spec] * len(queues))
        for queue in queues:  # one turn, so one commit however many queues
            call.core.put(call.now, queue, [spec])
        call.stored = True
    reached = 0 if call.channels is None else call.channels.publish(channel, data)
    return {"subscribers": reached, "queues": len(queues)}


def _check_body(core: Core, queues: list[str], size: int) -> None:
    for name in queues:
        queue = core.queues.get(name)
        limit = (queue.settings if queue is not None else DEFAULT_SETTINGS).max_body
        if size > limit:
            raise TooLarge(f"publish: data of {size} bytes is over {name}'s max_body of {limit}")


def _bind(call: Call, args: Args) -> Any:
    pattern = require_pattern(args.raw("pattern"), "bind")
    return {"bound": call.core.bind(call.now, pattern, args.queue())}


def _unbind(call: Call, args: Args) -> Any:
    pattern = require_pattern(args.raw("pattern"), "unbind")
    return {"unbound": call.core.unbind(call.now, pattern, args.queue())}


def _bindings(call: Call, args: Args) -> Any:
    listed = call.core.bindings.listed()
    return {"bindings": [{"pattern": pattern, "queue": queue} for pattern, queue in listed]}


def _subscribe(call: Call, args: Args) -> Any:
    if call.channels is None or call.sink is None:
        raise BadRequest("subscribe needs a connection of the wire protocol")
    owner, request_id = cast(tuple[int, int], call.waiter_key)  # (connection, request)
    from_seq = None
    if args.given("from_seq") and args.raw("from_seq") is not None:
        if call.feed is None:
            raise BadRequest("subscribe: this view keeps no job events to replay")
        from_seq = call.feed.check_from_seq(args.raw("from_seq"))
    subscription = call.channels.subscribe(owner, request_id, args.raw("patterns"), call.sink)
    if subscription.events and call.feed is not None:
        call.feed.watched()
    if from_seq is not None:
        assert call.feed is not None
        call.feed.start(subscription, from_seq)
    reply: dict[str, Any] = {"subscription": request_id, "patterns": list(subscription.patterns)}
    if call.feed is not None:
        reply["next_seq"] = call.feed.published + 1
    return reply


def _unsubscribe(call: Call, args: Args) -> Any:
    subscription = args.integer("subscription", low=0, high=2**64 - 1)
    if call.channels is None or call.sink is None:
        return {"unsubscribed": False}
    owner = cast(tuple[int, int], call.waiter_key)[0]
    return {"unsubscribed": call.channels.unsubscribe(owner, subscription)}


def _table(
    *rows: tuple[str, Handler, tuple[str, ...]],
) -> dict[str, tuple[frozenset[str], Handler]]:
    return {op: (frozenset(allowed), handler) for op, handler, allowed in rows}


HANDLERS: Final = _table(
    ("ping", _ping, ()),
    ("put", _put, ("queue", "messages")),
    ("put_and_wait", _put_and_wait, ("queue", "message", "timeout")),
    ("result", _result, ("id", "wait")),
    ("progress", _progress, ("id", "lease", "percent", "note")),
    ("reserve", _reserve, ("queues", "max", "wait", "visibility_timeout")),
    ("ack", _ack, ("items",)),
    ("nack", _nack, ("items", "delay", "error")),
    ("touch", _touch, ("id", "lease", "seconds")),
    ("bury", _bury, ("id", "lease", "reason")),
    ("cancel", _cancel, ("id",)),
    ("status", _status, ("id",)),
    ("queues", _queues, ()),
    ("stats", _stats, ("queue",)),
    ("configure", _configure, ("queue", "settings")),
    ("pause", _pause, ("queue",)),
    ("resume", _resume, ("queue",)),
    ("purge", _purge, ("queue",)),
    ("dead_letters", _dead_letters, ("queue", "limit", "after")),
    ("peek", _peek, ("queue", "state", "limit", "after")),
    ("replay", _replay, ("queue", "ids")),
    ("purge_dead", _purge_dead, ("queue",)),
    ("delete_queue", _delete_queue, ("queue", "force")),
    ("schedule", _schedule, ("queue", "name", *sorted(SCHEDULE_FIELDS))),
    ("unschedule", _unschedule, ("queue", "name")),
    ("schedules", _schedules, ("queue",)),
    ("trigger", _trigger, ("queue", "name")),
    ("publish", _publish, ("channel", "data", *PUBLISH_PUT_FIELDS)),
    ("bind", _bind, ("pattern", "queue")),
    ("unbind", _unbind, ("pattern", "queue")),
    ("bindings", _bindings, ()),
    ("subscribe", _subscribe, ("patterns", "from_seq")),
    ("unsubscribe", _unsubscribe, ("subscription",)),
)


def handle(call: Call, op: str, raw_args: dict[str, Any]) -> Any:
    """Run ``op``; raises ``UnknownOp`` or the handler's ``SluiceError``."""
    entry = HANDLERS.get(op)
    if entry is None:
        raise UnknownOp(f"unknown op {op!r}; known ops: {', '.join(sorted(HANDLERS))}, hello")
    allowed, handler = entry
    return handler(call, Args(op, raw_args, allowed))
