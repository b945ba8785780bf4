"""``sluice token``: a new random token, and the auth-file entry that grants it.

Needs no broker: the token is printed once (give it to the client) and the broker's file
gets only its SHA-256 digest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import secrets
from typing import Final

from protocol import VERBS

TOKEN_BYTES: Final = 32  # 256 bits of randomness, 43 URL-safe characters
_GLOB: Final = re.compile(r"[A-Za-z0-9._:*?\[\]!-]{1,200}")


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def principal_entry(token: str, name: str, queues: str, allow: list[str]) -> str:
    """The ``[[principal]]`` table to paste into the broker's ``--auth-file``."""
    return (
        "[[principal]]\n"
        f"name = {json.dumps(name)}\n"
        f'token_sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n'
        f"grants = [{{ queues = {json.dumps(queues)}, allow = {json.dumps(allow)} }}]\n"
    )


def verbs(text: str) -> list[str]:
    chosen = [verb.strip() for verb in text.split(",") if verb.strip()]
    unknown = sorted(set(chosen) - set(VERBS))
    if not chosen or unknown:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(VERBS)}, got {text!r}"
        )
    return list(dict.fromkeys(chosen))


def queue_glob(text: str) -> str:
    if not _GLOB.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"a queue glob is queue-name characters and * ? [ ] (got {text!r})"
        )
    return text


def add_token_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--name", default="client", help="the principal's name (default %(default)s)")
    add("--queues", type=queue_glob, default="*", help="queue glob of its grant (default *)")
    add(
        "--allow",
        type=verbs,
        default=["produce", "consume", "read"],
        help=f"comma-separated verbs of {', '.join(VERBS)} (default produce,consume,read)",
    )


def cmd_token(args: argparse.Namespace) -> int:
    token = new_token()
    print(token)
    print()
    print("# paste into the broker's --auth-file, then send it SIGHUP:")
    print(principal_entry(token, args.name, args.queues, args.allow), end="")
    return 0
