"""The admin CLI's commands: one function per command, and the ``COMMANDS`` table that
maps each command name to its function. Each function gets a connected ``Client`` and the
parsed arguments, prints its result (JSON with ``--json``) and returns the exit status."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from ._cli_tail import tail
from ._cli_text import (
    UsageError,
    absolute,
    body_preview,
    cell,
    fields,
    flatten,
    parse_headers,
    parse_settings,
    parse_time,
    plural,
    relative,
    shorten,
    table,
    to_json,
    utc_time,
    zoned_time,
)
from ._cli_watch import WatchOptions, all_queue_stats, stats_table, sum_stats, watch
from ._sync import Client
from .errors import NotFound

PEEK_TIME_COLUMN: Final = {
    "ready": ("enqueued", "enqueued_at"),
    "delayed": ("due", "due_at"),
    "reserved": ("lease ends", "lease_deadline"),
    "dead": ("dead since", "dead_at"),
}
TIME_FIELDS: Final = ("enqueued_at", "due_at", "lease_deadline", "dead_at", "done_at")
NO_QUEUES: Final = "no queues yet (a put, reserve or configure creates one)"
NEW_SCHEDULE: Final = "sluice schedule QUEUE NAME --cron '0 * * * *' BODY creates one"
SCHEDULE_COLUMNS: Final = (
    "queue",
    "name",
    "cron or every",
    "tz",
    "next (local)",
    "next (UTC)",
    "last slot (UTC)",
    "runs",
    "missed",
    "skipped",
    "last id",
)

Args = argparse.Namespace


def _show(args: Args, data: Any, human: Callable[[], str]) -> int:
    """Print ``data`` as JSON with ``--json``, else the text ``human()`` makes."""
    print(to_json(data) if args.json else human())
    return 0


# ------------------------------------------------------------------------ commands


def cmd_stats(client: Client, args: Args) -> int:
    if args.queue is not None:
        stats = client.stats(args.queue)
        return _show(args, stats, lambda: fields(flatten(stats)))
    every = all_queue_stats(client)
    data = {"queues": every, "all": sum_stats(every)}
    return _show(args, data, lambda: stats_table(every) if every else NO_QUEUES)


def cmd_queues(client: Client, args: Args) -> int:
    summaries = client.queues()
    headers = ["queue", "ready", "delayed", "reserved", "dead", "paused"]
    rows = [[s["name"], *(s[h] for h in headers[1:])] for s in summaries]
    return _show(args, summaries, lambda: table(headers, rows) if rows else NO_QUEUES)


def _peek_row(message: dict[str, Any], when_field: str, now: float) -> list[Any]:
    when = relative(message[when_field], now)
    preview = body_preview(message["body"])
    return [
        message["id"],
        message["priority"],
        message["attempts"],
        when,
        message["body_size"],
        preview,
    ]


def _dead_row(message: dict[str, Any], now: float) -> list[Any]:
    reason = shorten(message["dead_reason"] or "-")
    error = shorten(message["last_error"] or "-")
    return [message["id"], message["attempts"], reason, error, relative(message["dead_at"], now)]


def cmd_peek(client: Client, args: Args) -> int:
    items = client.peek(args.queue, args.state, limit=args.limit)
    when_header, when_field = PEEK_TIME_COLUMN[args.state]
    now = time.time()
    headers = ["id", "priority", "attempts", when_header, "bytes", "body"]
    rows = [_peek_row(message, when_field, now) for message in items]
    empty = f"no {args.state} messages in {args.queue!r}"
    return _show(args, items, lambda: table(headers, rows) if rows else empty)


def cmd_put(client: Client, args: Args) -> int:
    body = sys.stdin.buffer.read() if args.body == "-" else args.body.encode()
    message_id = client.put(
        args.queue,
        body,
        priority=args.priority,
        delay=args.delay,
        max_attempts=args.max_attempts,
        headers=parse_headers(args.header),
    )
    return _show(args, {"id": message_id}, lambda: str(message_id))


def cmd_dead(client: Client, args: Args) -> int:
    items = client.dead_letters(args.queue, limit=args.limit, after=args.after)
    now = time.time()
    headers = ["id", "attempts", "reason", "last error", "dead since"]
    rows = [_dead_row(message, now) for message in items]

    def human() -> str:
        if not rows:
            return f"no dead letters in {args.queue!r}"
        if len(rows) < args.limit:
            return table(headers, rows)
        next_page = f"sluice dead {args.queue} --after {items[-1]['id']}"
        return f"{table(headers, rows)}\n(more may follow: {next_page})"

    return _show(args, items, human)


def cmd_replay(client: Client, args: Args) -> int:
    replayed = client.replay(args.queue, args.ids or None)
    text = f"replayed {plural(replayed, 'dead letter')} of {args.queue!r}: ready, attempts 0"
    return _show(args, {"replayed": replayed}, lambda: text)


def cmd_pause(client: Client, args: Args) -> int:
    settings = client.pause(args.queue)
    text = f"paused {args.queue!r}: puts are accepted, nothing is delivered until resumed"
    return _show(args, settings, lambda: text)


def cmd_resume(client: Client, args: Args) -> int:
    settings = client.resume(args.queue)
    return _show(args, settings, lambda: f"resumed {args.queue!r}: delivering again")


def cmd_purge(client: Client, args: Args) -> int:
    def question() -> str:
        stats = client.stats(args.queue)
        count = stats["ready"] + stats["delayed"]
        return f"delete {plural(count, 'ready or delayed message')} of {args.queue!r} for good?"

    if not _confirmed(args, question):
        return 1
    purged = client.purge(args.queue)
    text = f"purged {plural(purged, 'ready or delayed message')} of {args.queue!r}"
    return _show(args, {"purged": purged}, lambda: text)


def cmd_purge_dead(client: Client, args: Args) -> int:
    def question() -> str:
        count = client.stats(args.queue)["dead"]
        return f"delete {plural(count, 'dead letter')} of {args.queue!r} for good?"

    if not _confirmed(args, question):
        return 1
    purged = client.purge_dead(args.queue)
    text = f"purged {plural(purged, 'dead letter')} of {args.queue!r}"
    return _show(args, {"purged": purged}, lambda: text)


def cmd_delete_queue(client: Client, args: Args) -> int:
    deleted = client.delete_queue(args.queue, force=args.force)
    went = [
        plural(deleted[key], noun)
        for key, noun in (
            ("messages", "message"),
            ("schedules", "schedule"),
            ("bindings", "binding"),
        )
        if deleted[key]
    ]
    text = f"deleted {args.queue!r}" + (f" with {', '.join(went)}" if went else "")
    return _show(args, deleted, lambda: text)


def cmd_configure(client: Client, args: Args) -> int:
    changes = parse_settings(args.settings)
    if not changes:
        client.stats(args.queue)  # NOT_FOUND for a missing queue: only show, never create
    settings = client.configure(args.queue, **changes)
    return _show(args, settings, lambda: fields(flatten(settings)))


def _recurrence(schedule: dict[str, Any]) -> str:
    if schedule["cron"] is not None:
        return str(schedule["cron"])
    return f"every {cell(schedule['every'])}s"


def _schedule_row(schedule: dict[str, Any]) -> list[Any]:
    next_at, zone = schedule["next_at"], schedule["tz"]
    return [
        schedule["queue"],
        schedule["name"],
        _recurrence(schedule),
        zone,
        zoned_time(next_at, zone),
        utc_time(next_at),
        utc_time(schedule["last_slot"]),
        schedule["runs"],
        schedule["missed"],
        schedule["skipped"],
        schedule["last_message_id"],
    ]


def _schedule_fields(schedule: dict[str, Any], now: float) -> list[tuple[str, Any]]:
    """A schedule for people: when it fires next (its zone's wall clock and UTC), what it
    puts, and how it has gone so far."""
    next_at, zone = schedule["next_at"], schedule["tz"]
    headers = schedule["headers"] or {}
    upcoming = zoned_time(next_at, zone) if next_at is not None else "- (no slot left)"
    return [
        ("queue", schedule["queue"]),
        ("name", schedule["name"]),
        ("cron" if schedule["cron"] is not None else "every", _recurrence(schedule)),
        ("tz", zone),
        ("next (local)", upcoming),
        ("next (UTC)", absolute(next_at, now)),
        ("start_at", absolute(schedule["start_at"], now)),
        ("end_at", absolute(schedule["end_at"], now)),
        ("limit", schedule["limit"]),
        ("catchup", schedule["catchup"]),
        ("overlap", schedule["overlap"]),
        ("body", body_preview(schedule["body"])),
        ("priority", schedule["priority"]),
        ("headers", ", ".join(f"{k}={v}" for k, v in headers.items()) or "-"),
        ("max_attempts", schedule["max_attempts"]),
        ("runs", schedule["runs"]),
        ("triggered", schedule["triggered"]),
        ("missed", schedule["missed"]),
        ("skipped", schedule["skipped"]),
        ("last slot", absolute(schedule["last_slot"], now)),
        ("last message id", schedule["last_message_id"]),
    ]


def _time_option(option: str, text: str | None, zone: str) -> float | None:
    if text is None:
        return None
    try:
        return parse_time(text, zone)
    except UsageError as error:
        raise UsageError(f"{option}: {error}") from None


def cmd_schedules(client: Client, args: Args) -> int:
    items = client.schedules(args.queue)
    rows = [_schedule_row(schedule) for schedule in items]
    where = "yet" if args.queue is None else f"on {args.queue!r}"
    empty = f"no schedules {where} ({NEW_SCHEDULE})"
    return _show(args, items, lambda: table(SCHEDULE_COLUMNS, rows) if rows else empty)


def cmd_schedule(client: Client, args: Args) -> int:
    start_at = _time_option("--start-at", args.start_at, args.tz)
    end_at = _time_option("--end-at", args.end_at, args.tz)
    headers = parse_headers(args.header)
    body = sys.stdin.buffer.read() if args.body == "-" else args.body.encode()
    schedule = client.schedule(
        args.queue,
        args.name,
        body,
        cron=args.cron,
        every=args.every,
        tz=args.tz,
        priority=args.priority,
        headers=headers or None,
        max_attempts=args.max_attempts,
        start_at=start_at,
        end_at=end_at,
        limit=args.limit,
        catchup=args.catchup,
        overlap=args.overlap,
    )
    now = time.time()

    def human() -> str:
        title = f"scheduled {args.name!r} on {args.queue!r}: {_recurrence(schedule)}"
        return f"{title}\n{fields(_schedule_fields(schedule, now))}"

    return _show(args, schedule, human)


def cmd_unschedule(client: Client, args: Args) -> int:
    if not client.unschedule(args.queue, args.name):
        raise NotFound(
            f"no schedule {args.name!r} on queue {args.queue!r}: nothing removed "
            f"(`sluice schedules {args.queue}` lists its schedules)"
        )
    text = f"removed schedule {args.name!r} of {args.queue!r}: no more fires (its messages stay)"
    return _show(args, {"removed": True}, lambda: text)


def cmd_trigger(client: Client, args: Args) -> int:
    message_id = client.trigger(args.queue, args.name)
    return _show(args, {"id": message_id}, lambda: str(message_id))


def cmd_status(client: Client, args: Args) -> int:
    status = client.status(args.id)
    now = time.time()

    def shown(key: str, value: Any) -> Any:
        if key in TIME_FIELDS:
            return absolute(value, now)
        if key == "headers":
            return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        if key == "result":
            return readable_result(value)
        if key == "eta_s":
            return f"about {value:.0f} s"
        return value

    return _show(args, status, lambda: fields((k, shown(k, v)) for k, v in status.items()))


def cmd_watch(client: Client, args: Args) -> int:
    options = WatchOptions(
        url=f"sluice://{client.host}:{client.port}",
        interval=args.interval,
        count=args.count,
        as_json=args.json,
    )
    return watch(client, options, sys.stdout, sys.stdin)


def cmd_tail(client: Client, args: Args) -> int:
    return tail(client, args, sys.stdout, sys.stderr)


def _confirmed(args: Args, question: Callable[[], str]) -> bool:
    """True with ``--yes``; else asks on the terminal (``main`` has made sure stdin is one).
    Anything but y/yes is a no."""
    if args.yes:
        return True
    print(f"{question()} [y/N] ", end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip().lower() in ("y", "yes"):
        return True
    print("sluice: nothing deleted", file=sys.stderr)
    return False


# ------------------------------------------------------------------------ dispatch


@dataclass(frozen=True, slots=True)
class Command:
    run: Callable[[Client, Args], int]
    destructive: bool = False  # asks for confirmation unless --yes


COMMANDS: Final = {
    "stats": Command(cmd_stats),
    "queues": Command(cmd_queues),
    "peek": Command(cmd_peek),
    "put": Command(cmd_put),
    "dead": Command(cmd_dead),
    "replay": Command(cmd_replay),
    "pause": Command(cmd_pause),
    "resume": Command(cmd_resume),
    "purge": Command(cmd_purge, destructive=True),
    "purge-dead": Command(cmd_purge_dead, destructive=True),
    "delete-queue": Command(cmd_delete_queue),  # (--force is the consent to lose messages)
    "configure": Command(cmd_configure),
    "schedules": Command(cmd_schedules),
    "schedule": Command(cmd_schedule),
    "unschedule": Command(cmd_unschedule),
    "trigger": Command(cmd_trigger),
    "status": Command(cmd_status),
    "watch": Command(cmd_watch),
    "tail": Command(cmd_tail),
}


def readable_result(value: Any) -> str:
    """A job's result for a person: UTF-8 text as itself, other bytes as hex, anything
    else (maps, lists, numbers) as JSON."""
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return f"{len(value)} bytes: {value.hex()}"
    try:
        return json.dumps(value, default=repr)
    except (TypeError, ValueError):
        return repr(value)
