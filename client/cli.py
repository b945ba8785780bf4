"""``sluice``: the admin command line for a Sluice broker (``python -m client.cli``).

Talks the wire protocol through ``Client``. Human tables by default, ``--json`` for
scripts. Exit status: 0 done; 1 the broker answered with an error or could not be reached;
2 the command line is wrong, or a destructive command was not confirmed. Every error is one
line on stderr, ``sluice: CODE: message`` for the broker's errors.

The parser and its help are in ``_cli_parser``, the commands in ``_cli_commands``, tables
and value parsing in ``_cli_text``, ``watch`` in ``_cli_watch``.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from collections.abc import Sequence

from protocol import SluiceError

from ._cli_commands import COMMANDS
from ._cli_parser import build_parser
from ._cli_text import UsageError
from ._cli_token import cmd_token
from ._common import cli_tls, parse_url
from ._sync import Client
from .errors import ConnectionClosed


def _client(args: argparse.Namespace) -> Client:
    url = args.url if "://" in args.url else f"sluice://{args.url}"
    try:
        parse_url(url)
    except ValueError as error:
        raise UsageError(f"bad --url: {error}") from None
    try:
        tls = cli_tls(args.tls_ca, args.tls_cert, args.tls_key)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return Client(
        url=url,
        timeout=args.timeout,
        client_name="sluice-cli",
        auth_token=args.auth_token,
        tls=tls,
    )


def _connect(client: Client) -> None:
    """Connect now, so that a broker that is not there reads as exactly that."""
    try:
        client.connect()
    except ConnectionClosed as error:
        cause = error.__context__  # the OSError behind it
        # A broker that wants a client certificate closes on a client without one.
        closed_on_tls = client.tls is not None and isinstance(cause, ConnectionClosed)
        if isinstance(cause, ssl.SSLError) or closed_on_tls:
            raise ConnectionClosed(
                f"TLS with {client.host}:{client.port} failed: {cause}; name the broker's CA "
                "with --tls-ca, and a client certificate with --tls-cert if it wants one"
            ) from None
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
        raise ConnectionClosed(
            f"cannot connect to {client.host}:{client.port} ({reason.lower()}): is the broker "
            "running? set --url or SLUICE_URL"
        ) from None


def run(args: argparse.Namespace) -> int:
    """Run the parsed command; raises ``UsageError`` or ``SluiceError``."""
    if args.command == "token":  # the one command that needs no broker
        return cmd_token(args)
    command = COMMANDS[args.command]
    if command.destructive and not args.yes and not sys.stdin.isatty():
        raise UsageError(
            f"{args.command} deletes messages for good: pass --yes to confirm "
            "(stdin is not a terminal, so there is no one to ask)"
        )
    client = _client(args)
    try:
        _connect(client)
        return command.run(client, args)
    finally:
        client.close()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sluice`` script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as error:
        print(f"sluice {args.command}: error: {_one_line(str(error))}", file=sys.stderr)
        return 2
    except SluiceError as error:
        print(f"sluice: {_one_line(str(error))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`sluice watch | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
