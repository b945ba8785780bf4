"""The ``sluice`` argument parser: every command, its arguments, and the help users read
(``sluice --help``, ``sluice COMMAND --help``, each with examples)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any, Final

from ._cli_commands import COMMANDS
from ._cli_token import add_token_arguments
from ._common import DEFAULT_URL, add_tls_options

DEFAULT_TIMEOUT: Final = 10.0

DESCRIPTION = """\
sluice: look at and manage the queues of a running Sluice broker.
"""

EPILOG = """\
the broker is picked by --url or SLUICE_URL (default sluice://127.0.0.1:7700; host:port
also works), with --auth-token or SLUICE_AUTH_TOKEN if it wants one. Options may come
before or after the command: `sluice --json stats` is `sluice stats --json`.

exit status: 0 done; 1 the broker answered with an error or could not be reached; 2 the
command line is wrong, or purge/purge-dead was not confirmed. Errors are one line on stderr,
like "sluice: NOT_FOUND: no queue named 'emails'; ...". `sluice COMMAND --help` shows examples.

examples:
  sluice queues
  sluice stats emails --json
  sluice put emails 'welcome mail for user 42' --priority 5
  sluice dead emails && sluice replay emails
  sluice schedule reports nightly --cron '30 2 * * *' --tz Europe/Berlin 'build it'
  SLUICE_URL=sluice://queue-host:7700 sluice watch
"""


def _number(text: str, kind: type[int] | type[float], what: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _positive_int(text: str) -> int:
    value: int = _number(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _message_id(text: str) -> int:
    value: int = _number(text, int, "a message id (a whole number)")
    if value < 0:
        raise argparse.ArgumentTypeError(f"message ids are 0 or more, got {value}")
    return value


def _seconds(text: str) -> float:
    value: float = _number(text, float, "a number of seconds")
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"must be more than 0 and under a day, got {text}")
    return value


def _interval(text: str) -> float:
    """A number of seconds; its range is the broker's to check (it says what it allows)."""
    value: float = _number(text, float, "a number of seconds")
    return value


def _assignment(text: str) -> str:
    """A ``KEY=VALUE`` argument, checked for its form only (values are parsed later)."""
    key, sep, _ = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return text


def _add_connection_options(parser: argparse.ArgumentParser, *, with_defaults: bool) -> None:
    """The options every command takes. On the subcommands their default is SUPPRESS, so
    an option given before the command is not reset by the subcommand's parser."""

    def default(value: Any) -> Any:
        return value if with_defaults else argparse.SUPPRESS

    add = parser.add_argument
    add(
        "--url",
        default=default(os.environ.get("SLUICE_URL", DEFAULT_URL)),
        help=f"the broker, sluice://HOST:PORT or HOST:PORT (env SLUICE_URL; default {DEFAULT_URL})",
    )
    add(
        "--auth-token",
        metavar="TOKEN",
        default=default(os.environ.get("SLUICE_AUTH_TOKEN") or None),
        help="token the broker asks for in hello (prefer env SLUICE_AUTH_TOKEN: flags show "
        "up in process listings)",
    )
    add_tls_options(add, default)
    add(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        default=default(DEFAULT_TIMEOUT),
        help=f"seconds to wait for the broker (default {DEFAULT_TIMEOUT:g})",
    )
    add(
        "--json",
        action="store_true",
        default=default(False),
        help="print JSON for scripts instead of tables (message bodies as base64)",
    )


def _queue_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("queue", metavar="QUEUE", help="queue name")


def _yes_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--yes", "-y", action="store_true", help="do it without asking (needed without a terminal)"
    )


def _stats_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("queue", metavar="QUEUE", nargs="?", help="one queue (default: all)")


def _peek_arguments(parser: argparse.ArgumentParser) -> None:
    _queue_argument(parser)
    parser.add_argument(
        "--state",
        choices=["ready", "delayed", "reserved", "dead"],
        default="ready",
        help="which messages (default ready: in delivery order)",
    )
    parser.add_argument(
        "--limit", type=_positive_int, default=10, help="at most this many (default 10)"
    )


def _put_arguments(parser: argparse.ArgumentParser) -> None:
    _queue_argument(parser)
    parser.add_argument("body", metavar="BODY", help="message body (UTF-8), or - to read stdin")
    add = parser.add_argument
    add(
        "--priority", type=int, default=0, metavar="N", help="higher is delivered first (default 0)"
    )
    add(
        "--delay",
        type=float,
        default=0,
        metavar="SECONDS",
        help="seconds before it can be reserved (default 0)",
    )
    add("--max-attempts", type=_positive_int, metavar="N", help="override the queue's max_attempts")
    _header_option(parser, "a header (string value); repeat for more")


def _header_option(parser: argparse.ArgumentParser, text: str) -> None:
    """--header KEY=VALUE, repeatable, as put and schedule take it."""
    parser.add_argument(
        "--header", action="append", default=[], metavar="KEY=VALUE", type=_assignment, help=text
    )


def _dead_arguments(parser: argparse.ArgumentParser) -> None:
    _queue_argument(parser)
    add = parser.add_argument
    add("--limit", type=_positive_int, default=20, help="at most this many (default 20)")
    add("--after", type=_message_id, metavar="ID", help="start after this id (the next page)")


def _replay_arguments(parser: argparse.ArgumentParser) -> None:
    _queue_argument(parser)
    parser.add_argument(
        "ids",
        metavar="ID",
        type=_message_id,
        nargs="*",
        help="dead letters to replay (default all)",
    )


def _purge_arguments(parser: argparse.ArgumentParser) -> None:
    _queue_argument(parser)
    _yes_option(parser)


def _delete_queue_arguments(parser: argparse.ArgumentParser) -> None:
    _queue_argument(parser)
    parser.add_argument(
        "--force",
        action="store_true",
        help="also delete its messages (reserved ones too), dead letters and schedules",
    )


def _configure_arguments(parser: argparse.ArgumentParser) -> None:
    _queue_argument(parser)
    parser.add_argument(
        "settings",
        metavar="KEY=VALUE",
        type=_assignment,
        nargs="*",
        help="settings to change (none: show them)",
    )


def _schedule_name_arguments(parser: argparse.ArgumentParser) -> None:
    _queue_argument(parser)
    parser.add_argument(
        "name", metavar="NAME", help="schedule name (1-200 characters of A-Z a-z 0-9 . _ : -)"
    )


def _schedules_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("queue", metavar="QUEUE", nargs="?", help="one queue (default: all)")


def _schedule_arguments(parser: argparse.ArgumentParser) -> None:
    _schedule_name_arguments(parser)
    add = parser.add_argument
    add("body", metavar="BODY", help="body of each message it puts (UTF-8), or - to read stdin")
    when = parser.add_mutually_exclusive_group(required=True)
    when.add_argument(
        "--cron", metavar="EXPR", help="a 5-field cron expression or @hourly, @daily... (below)"
    )
    when.add_argument(
        "--every", type=_interval, metavar="SECONDS", help="a slot every SECONDS (0.1 or more)"
    )
    add(
        "--tz",
        default="UTC",
        metavar="TZ",
        help="IANA time zone --cron is read in, like Europe/Berlin (default UTC)",
    )
    add("--priority", type=int, default=0, metavar="N", help="of each message (default 0)")
    _header_option(parser, "a header of each message (string value); repeat for more")
    add("--max-attempts", type=_positive_int, metavar="N", help="of each message")
    add("--start-at", metavar="TIME", help="no slot before this time (epoch seconds or ISO 8601)")
    add("--end-at", metavar="TIME", help="no slot after this time (epoch seconds or ISO 8601)")
    add("--limit", type=_positive_int, metavar="N", help="fire at most N times")
    add(
        "--catchup",
        choices=["latest", "skip", "all"],
        default="latest",
        help="slots missed while the broker was down (default latest; below)",
    )
    add(
        "--overlap",
        choices=["allow", "skip"],
        default="allow",
        help="fire while the last fire's message is not done? (default allow; below)",
    )


def _status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", metavar="ID", type=_message_id, help="message id")


def _watch_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--interval",
        type=_seconds,
        default=1.0,
        metavar="SECONDS",
        help="seconds between refreshes (default 1)",
    )
    add("--count", type=_positive_int, metavar="N", help="stop after N refreshes")


def _tail_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "patterns",
        nargs="*",
        metavar="PATTERN",
        help="channel patterns ('*' one token, '>' the rest); default queue.> (every job event)",
    )
    add("--queue", action="append", metavar="NAME", help="every event of queue NAME (repeatable)")
    add(
        "--from-seq",
        type=_from_seq,
        metavar="SEQ",
        help="first the events the broker still holds from SEQ on, then live ones",
    )
    add("--count", type=_positive_int, metavar="N", help="stop after N lines")


def _from_seq(text: str) -> int:
    value: int = _number(text, int, "a seq (a whole number)")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


Arguments = Callable[[argparse.ArgumentParser], None]

# name -> (one-line summary, what it does and examples, its arguments)
HELP: Final[dict[str, tuple[str, str, Arguments]]] = {
    "stats": (
        "counts and totals of every queue, or all stats of one",
        """\
Without QUEUE: one row per queue (ready, delayed, reserved, dead, waiting consumers,
paused, and the totals put, delivered, acked, nacked, expired, dead_lettered), and a last
row "(all)" adding them up. With QUEUE: every field of its stats. A queue with a
rate_limit or max_in_flight (see `sluice configure --help`) also shows limits.tokens (in
its bucket now; - without a rate limit), limits.in_flight (reserved now),
limits.max_in_flight, limits.throttled_seconds (how long its ready messages were held
back by a limit) and limits.parked_by_limit (long-polls that had to wait for one).

examples:
  sluice stats
  sluice stats emails
  sluice stats --json | jq .all.ready""",
        _stats_arguments,
    ),
    "queues": (
        "list the queues with their counts",
        "examples:\n  sluice queues\n  sluice queues --json | jq -r '.[].name'",
        lambda parser: None,
    ),
    "peek": (
        "look at messages without reserving them",
        """\
Shows id, priority, attempts, the time that matters for the state (enqueued, due, lease
end, dead since), size and the body: printable UTF-8 as text (cut to 40 characters),
anything else as "hex:" and its first bytes. --json gives whole bodies in base64.

examples:
  sluice peek emails
  sluice peek emails --state delayed --limit 50
  sluice peek emails --json | jq -r '.[0].body' | base64 -d""",
        _peek_arguments,
    ),
    "put": (
        "enqueue one message and print its id",
        """\
BODY is sent as UTF-8; - reads the body from stdin as raw bytes (to send a body that is
just "-", pipe it in).

examples:
  sluice put emails 'welcome mail for user 42'
  sluice put emails - < message.json
  sluice put emails digest --priority 5 --delay 60 --header tenant=acme""",
        _put_arguments,
    ),
    "dead": (
        "list a queue's dead letters",
        """\
Shows id, attempts, reason, last error and when each died, in id order, --limit at a time;
--after ID shows the next page. Replay them with `sluice replay`, delete them with
`sluice purge-dead`.

examples:
  sluice dead emails
  sluice dead emails --limit 100 --after 1200""",
        _dead_arguments,
    ),
    "replay": (
        "move dead letters back to ready (attempts reset to 0)",
        """\
With no ID, replays every dead letter of QUEUE. Ids that are not dead letters of QUEUE
are skipped; the count printed is how many moved.

examples:
  sluice replay emails
  sluice replay emails 17 42""",
        _replay_arguments,
    ),
    "pause": (
        "stop deliveries from a queue (puts are still accepted)",
        "examples:\n  sluice pause emails",
        _queue_argument,
    ),
    "resume": (
        "deliver from a paused queue again",
        "examples:\n  sluice resume emails",
        _queue_argument,
    ),
    "purge": (
        "delete every ready and delayed message of a queue",
        """\
Asks first, on the terminal; without one (a script, a pipe) it refuses unless --yes is
given, and exits 2. Reserved messages and dead letters are kept.

examples:
  sluice purge emails
  sluice purge emails --yes""",
        _purge_arguments,
    ),
    "purge-dead": (
        "delete every dead letter of a queue",
        """\
Asks first, on the terminal; without one it refuses unless --yes is given, and exits 2.

examples:
  sluice purge-dead emails
  sluice purge-dead emails --yes""",
        _purge_arguments,
    ),
    "delete-queue": (
        "delete a queue, its settings and the bindings into it",
        """\
A queue that still holds messages (ready, delayed, reserved or dead) or schedules is
refused (exit 1) unless --force is given, which deletes those too: workers holding its
messages get LeaseLost when they ack. Long-polls on it get nothing.

examples:
  sluice delete-queue emails
  sluice delete-queue emails --force""",
        _delete_queue_arguments,
    ),
    "configure": (
        "change queue settings, or show them",
        """\
Settings: visibility_timeout, max_attempts, backoff, paused, max_body, dead_letter_ttl,
result_ttl, dedup_window (durations in seconds), rate_limit, max_in_flight. Values:
none/null, true/false, numbers, JSON when they start with { [ or ", else text. A dotted
key sets a field of a map: a backoff or rate_limit given this way or as JSON replaces the
whole map (fields left out take their defaults). Prints every setting after the change,
in the same dotted form. With no KEY=VALUE, only shows the settings (NOT_FOUND for a
queue that does not exist).

Limits hold across every consumer of the queue, enforced by the broker at reserve:
rate_limit.rate messages per rate_limit.per seconds (default 1), at most
rate_limit.burst at once (default: the rate rounded up): a token bucket, which starts
full when the broker starts. max_in_flight: at most N of the queue's messages reserved at
once. A long-poll held back by either waits, served first come first served. none turns
either off (the default). `sluice stats QUEUE` shows them at work.

examples:
  sluice configure emails max_attempts=10 visibility_timeout=120
  sluice configure emails max_attempts=none dead_letter_ttl=none
  sluice configure emails backoff.type=fixed backoff.delay=5
  sluice configure emails 'backoff={"type": "exponential", "base": 2, "cap": 300}'
  sluice configure webhooks rate_limit.rate=10 rate_limit.per=1 max_in_flight=5
  sluice configure webhooks rate_limit=none max_in_flight=none
  sluice configure emails""",
        _configure_arguments,
    ),
    "schedules": (
        "list recurring schedules with their next fire times",
        """\
One row per schedule (of QUEUE, or of every queue), by queue and name: its cron
expression (aliases shown expanded) or interval; its time zone; the next fire time on
the wall clock of that zone (local) and in UTC ("-": no slot left, its --limit or
--end-at is reached); the last slot fired (UTC); runs (slots fired); missed (slots that
came due while the broker was down); skipped (slots not fired, by --catchup or
--overlap); and the id of the last message it put. --json gives every field, times as
epoch seconds, and triggered (fires by `sluice trigger`, not counted in runs).

examples:
  sluice schedules
  sluice schedules reports
  sluice schedules --json | jq '.[] | {name, next_at}'""",
        _schedules_arguments,
    ),
    "schedule": (
        "create or replace a recurring schedule and show its next fire time",
        """\
The broker keeps the schedule and fires it from its own clock, with or without anyone
connected: one authority, so no two schedulers race and a restart fires no slot twice.
Each fire puts BODY with the dedup key schedule:NAME:SLOT (SLOT: the due time in UTC, to
the millisecond) and the headers schedule=NAME and scheduled_for=SLOT. The same QUEUE and
NAME again replaces the schedule; it keeps its counts and last slot, so no slot it fired
fires again. A paused queue still gets its fires (they wait until it is resumed).

--cron EXPR: minute hour day-of-month month day-of-week (0-59, 0-23, 1-31, 1-12 or
  jan-dec, 0-7 or sun-sat with 0 and 7 Sunday), each *, N, a range N-M, a list N,M or a
  step */N or N-M/N; when both day fields are restricted, either may match. Aliases:
  @hourly, @daily (@midnight), @weekly, @monthly, @yearly (@annually). Read in --tz.
--every SECONDS: at least 0.1; the slots are --start-at (or the moment it is created)
  plus whole intervals.
DST, for --cron in a zone that changes its clocks: a fixed local time that does not
  exist (spring forward) fires at the first valid minute after it (02:30 fires at 03:00
  that day); one that happens twice (fall back) fires once, the first time. An
  expression whose minute or hour field starts with * (@hourly, */15 * * * *) follows the
  clock instead: it fires in each hour that happens, so not in the skipped hour and
  twice in the repeated one.
--catchup, for slots that came due while the broker was down (or stalled over 1 s):
  latest (the default) fires once, for the newest of them; skip fires none and goes on
  from now; all fires each of them, oldest first (at most the newest 1,000). They count
  as missed, those not fired as skipped.
--overlap: allow (the default) fires on every slot; skip fires nothing while the
  message of the last fire is still ready, delayed or reserved (counted as skipped).
--start-at, --end-at: epoch seconds or ISO 8601 (2030-01-15, 2030-01-15T09:00,
  2030-01-15T09:00+01:00, ...Z), read in --tz when there is no offset; no slot before the
  start or after the end. --limit N: at most N fires, then it stays listed, finished.

examples:
  sluice schedule reports nightly --cron '30 2 * * *' --tz Europe/Berlin 'build the report'
  sluice schedule reports hourly --cron @hourly --overlap skip - < job.json
  sluice schedule health ping --every 30 --limit 100 --header source=cli ping
  sluice schedule billing close --cron '0 0 1 * *' --start-at 2030-01-01 --catchup all x""",
        _schedule_arguments,
    ),
    "unschedule": (
        "remove a schedule (the messages it put stay)",
        """\
No more fires; messages it already put are not touched. Exits 1 (NOT_FOUND) when QUEUE
has no schedule NAME.

examples:
  sluice unschedule reports nightly""",
        _schedule_name_arguments,
    ),
    "trigger": (
        "fire a schedule now and print the id of the message it put",
        """\
Puts the schedule's message now, outside its slots and whatever its --overlap and
--limit; its scheduled_for header and dedup key carry the current time. Counted as
triggered, not in runs; the next slot stays as it was. NOT_FOUND if there is no such
schedule.

examples:
  sluice trigger reports nightly
  sluice trigger reports nightly --json""",
        _schedule_name_arguments,
    ),
    "status": (
        "state, attempts, times and errors of one message",
        "Times are UTC.\n\nexamples:\n  sluice status 42\n  sluice status 42 --json",
        _status_arguments,
    ),
    "watch": (
        "a live table of every queue with put and ack rates",
        """\
Every --interval seconds, redraws ready, delayed, reserved, dead and waiting consumers of
each queue, and put/s and acked/s since the last refresh ("-" on the first). On a terminal
the screen is redrawn (Enter refreshes at once; Ctrl-C quits). Otherwise each refresh is
printed after the last, ended by a blank line, and a line on stdin refreshes at once; with
--json each refresh is one line of JSON.

examples:
  sluice watch
  sluice watch --interval 5
  sluice watch --count 3 --interval 0.5 > snapshot.txt""",
        _watch_arguments,
    ),
    "tail": (
        "job events as they happen, one line each",
        """\
Subscribes to job events: the broker publishes every change of every message on channel
queue.<queue>.<event> (put, ready, reserved, acked, nacked, expired, dead, replayed,
cancelled, purged, removed, deleted, released, progress) and queue.<queue>.admin
(paused, resumed, configured, queue_deleted). Each line: time (UTC), #seq, queue, event,
id, attempts and the event's small fields. Patterns of other channels print their
published messages too. With
--from-seq, the events the broker still holds from that seq come first (a "gap" line
says which are gone). Runs until Ctrl-C (or --count lines). Exit status 1 if it falls
behind: the message says which --from-seq goes on.

examples:
  sluice tail
  sluice tail --queue emails
  sluice tail 'queue.*.dead' 'queue.*.expired'
  sluice tail --from-seq 0 --count 100 --json""",
        _tail_arguments,
    ),
    "token": (
        "print a new random token and the auth-file entry that grants it",
        """The token is printed once, on the first line: give it to the client (as
SLUICE_AUTH_TOKEN). The broker's --auth-file gets only its SHA-256, in the [[principal]]
entry printed below it; send the broker SIGHUP to load the file again. Needs no broker.

examples:
  sluice token --name billing --queues 'billing.*' --allow produce,consume
  sluice token --name ops --allow read,admin""",
        add_token_arguments,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``sluice`` parser with one subcommand per entry of ``COMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="sluice",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_connection_options(parser, with_defaults=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in [*COMMANDS, "token"]:
        summary, details, arguments = HELP[name]
        sub = commands.add_parser(
            name,
            help=summary,
            description=f"{summary[0].upper()}{summary[1:]}.",
            epilog=details,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        arguments(sub)
        _add_connection_options(sub, with_defaults=False)
    return parser
