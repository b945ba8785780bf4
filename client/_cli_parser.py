"""The ``sluice`` argument parser: every command, its arguments, and the help users read
(``sluice --help``, ``sluice COMMAND --help``, each with examples)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any, Final

from ._cli_commands import COMMANDS
from ._common import DEFAULT_URL

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
    add(
        "--header",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=_assignment,
        help="a header (string value); repeat for more",
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


def _configure_arguments(parser: argparse.ArgumentParser) -> None:
    _queue_argument(parser)
    parser.add_argument(
        "settings",
        metavar="KEY=VALUE",
        type=_assignment,
        nargs="*",
        help="settings to change (none: show them)",
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


Arguments = Callable[[argparse.ArgumentParser], None]

# name -> (one-line summary, what it does and examples, its arguments)
HELP: Final[dict[str, tuple[str, str, Arguments]]] = {
    "stats": (
        "counts and totals of every queue, or all stats of one",
        """\
Without QUEUE: one row per queue (ready, delayed, reserved, dead, waiting consumers,
paused, and the totals put, delivered, acked, nacked, expired, dead_lettered), and a last
row "(all)" adding them up. With QUEUE: every field of its stats.

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
    "configure": (
        "change queue settings, or show them",
        """\
Settings: visibility_timeout, max_attempts, backoff, paused, max_body, dead_letter_ttl,
result_ttl, dedup_window (durations in seconds). Values: none/null, true/false, numbers,
JSON when they start with { [ or ", else text. A dotted key sets a field of a map: a
backoff given this way or as JSON replaces the whole backoff (fields left out take their
defaults). Prints every setting after the change, in the same dotted form. With no
KEY=VALUE, only shows the settings (NOT_FOUND for a queue that does not exist).

examples:
  sluice configure emails max_attempts=10 visibility_timeout=120
  sluice configure emails max_attempts=none dead_letter_ttl=none
  sluice configure emails backoff.type=fixed backoff.delay=5
  sluice configure emails 'backoff={"type": "exponential", "base": 2, "cap": 300}'
  sluice configure emails""",
        _configure_arguments,
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
    for name in COMMANDS:
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
