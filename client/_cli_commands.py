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

from ._cli_text import (
    absolute,
    body_preview,
    fields,
    flatten,
    parse_headers,
    parse_settings,
    plural,
    relative,
    shorten,
    table,
    to_json,
)
from ._cli_watch import WatchOptions, all_queue_stats, stats_table, sum_stats, watch
from ._sync import Client

PEEK_TIME_COLUMN: Final = {
    "ready": ("enqueued", "enqueued_at"),
    "delayed": ("due", "due_at"),
    "reserved": ("lease ends", "lease_deadline"),
    "dead": ("dead since", "dead_at"),
}
TIME_FIELDS: Final = ("enqueued_at", "due_at", "lease_deadline", "dead_at", "done_at")
NO_QUEUES: Final = "no queues yet (a put, reserve or configure creates one)"

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


def cmd_configure(client: Client, args: Args) -> int:
    changes = parse_settings(args.settings)
    if not changes:
        client.stats(args.queue)  # NOT_FOUND for a missing queue: only show, never create
    settings = client.configure(args.queue, **changes)
    return _show(args, settings, lambda: fields(flatten(settings)))


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
    "configure": Command(cmd_configure),
    "status": Command(cmd_status),
    "watch": Command(cmd_watch),
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
