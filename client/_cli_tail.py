"""``sluice tail``: job events (and channel messages) as they happen, one line each.

A line: the event's time (UTC, to the millisecond), its seq, queue, event, message id,
attempts, then its small fields as ``key=value``. A channel message matched by the
patterns prints as its channel and a preview of its data. ``--json`` prints each as one
JSON object instead. A gap (events gone before ``--from-seq`` could be served) is a line
saying which seqs are missing; a subscription that falls behind ends the command with
exit status 1 and the ``--from-seq`` to go on from.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any, Final, TextIO

from ._channels import ChannelMessage, Event, Gap, JobEvent
from ._cli_text import body_preview, shorten, to_json
from ._sync import Client
from .errors import Lagged

ALL_EVENTS: Final = "queue.>"
POLL: Final = 0.5  # seconds between checks for Ctrl-C while nothing arrives


def patterns_of(args: argparse.Namespace) -> list[str]:
    """The patterns given, with ``queue.NAME.*`` for each ``--queue`` (``*``, not ``>``:
    that would match queue ``NAME.more`` too); all job events if neither was given."""
    patterns = list(args.patterns) + [f"queue.{name}.*" for name in args.queue or ()]
    return patterns or [ALL_EVENTS]


def event_line(event: Event) -> str:
    if isinstance(event, JobEvent):
        when = datetime.fromtimestamp(event.ts, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        parts = [f"{when}Z", f"#{event.seq}", event.queue, event.event]
        if event.id is not None:
            parts += [f"id={event.id}", f"attempts={event.attempts}"]
        parts += [f"{key}={_shown(value)}" for key, value in sorted(event.fields.items())]
        return " ".join(parts)
    if isinstance(event, Gap):
        return (
            f"gap: events {event.from_seq}-{event.first_seq - 1} are gone (the broker keeps "
            f"its last --event-buffer, none from before a restart); going on from {event.first_seq}"
        )
    return f"{event.channel} {body_preview(event.data)}"


def event_json(event: Event) -> str:
    if isinstance(event, JobEvent):
        value: dict[str, Any] = {
            "seq": event.seq,
            "ts": event.ts,
            "queue": event.queue,
            "id": event.id,
            "event": event.event,
            "attempts": event.attempts,
            **event.fields,
        }
    elif isinstance(event, Gap):
        value = {"gap": {"from_seq": event.from_seq, "first_seq": event.first_seq}}
    else:
        assert isinstance(event, ChannelMessage)
        value = {"channel": event.channel, "data": event.data}
    return to_json(value, indent=None)


def tail(client: Client, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Print events until ``--count`` of them were printed (or Ctrl-C: status 0); status
    1, saying where to go on from, if the subscription fell behind."""
    subscription = client.subscribe(*patterns_of(args), from_seq=args.from_seq)
    shown = 0
    try:
        while args.count is None or shown < args.count:
            event = subscription.get(POLL)
            if event is None:
                continue
            out.write((event_json(event) if args.json else event_line(event)) + "\n")
            out.flush()
            shown += 1
    except KeyboardInterrupt:
        return 0
    except Lagged as lagged:
        where = "" if lagged.seq is None else f" at event {lagged.seq}"
        again = "run it again" if lagged.seq is None else f"go on with --from-seq {lagged.seq}"
        err.write(f"sluice tail: fell behind{where} after {shown} lines; {again}\n")
        return 1
    finally:
        subscription.unsubscribe()
    return 0


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return shorten(value, 80) if " " not in value else repr(shorten(value, 80))
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return str(value)
