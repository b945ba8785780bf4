"""Command-line flags for the daemon. Every flag can also come from an environment variable
``SLUICE_<FLAG>`` (``--log-level`` from ``SLUICE_LOG_LEVEL``); a flag on the command line wins."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass

from protocol import DEFAULT_MAX_FRAME

DESCRIPTION = """\
Sluice: a durable message broker and job queue.

Listens for the Sluice wire protocol (length-prefixed msgpack over TCP) and prints
"sluice listening on HOST:PORT" once it accepts connections. SIGTERM or SIGINT stops it
gracefully: it stops accepting, answers what is in flight, and exits 0.
"""

EPILOG = """\
every flag may also be set from the environment: --port 7800 is SLUICE_PORT=7800.

examples:
  python -m broker                          # 127.0.0.1:7700
  python -m broker --port 0                 # any free port; read it from the first line
  SLUICE_HOST=0.0.0.0 python -m broker      # listen on every interface
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    host: str
    port: int
    data_dir: str | None
    log_level: str
    max_frame: int
    auth_token: str | None


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(f"SLUICE_{name.upper()}", default)


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {port}")
    return port


def _frame_size(text: str) -> int:
    size = int(text)
    if not 1024 <= size <= 1024**3:
        raise argparse.ArgumentTypeError(f"max frame must be 1 KiB to 1 GiB, got {size}")
    return size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sluice-broker",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--host",
        default=_env("host", "127.0.0.1"),
        help="address to listen on (default %(default)s)",
    )
    add(
        "--port",
        type=_port,
        default=_env("port", "7700"),
        help="TCP port; 0 picks a free one (default %(default)s)",
    )
    add(
        "--data-dir",
        default=_env("data_dir", None),
        help="directory for the broker's data; created if missing. This version keeps all "
        "state in memory: the directory is reserved for the write-ahead store",
    )
    add(
        "--log-level",
        default=_env("log_level", "info"),
        choices=["debug", "info", "warning", "error"],
        help="log verbosity on stderr (default %(default)s)",
    )
    add(
        "--max-frame",
        type=_frame_size,
        default=_env("max_frame", str(DEFAULT_MAX_FRAME)),
        help="largest frame accepted, in bytes; bigger ones are refused before they are "
        "read (default %(default)s)",
    )
    add(
        "--auth-token",
        default=_env("auth_token", None),
        help="if set, clients must send this token in hello (prefer SLUICE_AUTH_TOKEN: "
        "flags show up in process listings)",
    )
    return parser


def parse_config(argv: Sequence[str] | None = None) -> Config:
    args = build_parser().parse_args(argv)
    return Config(
        host=args.host,
        port=int(args.port),
        data_dir=args.data_dir,
        log_level=args.log_level,
        max_frame=int(args.max_frame),
        auth_token=args.auth_token or None,
    )
