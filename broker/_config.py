"""Command-line flags for the daemon. Every flag can also come from an environment variable
``SLUICE_<FLAG>`` (``--log-level`` from ``SLUICE_LOG_LEVEL``); a flag on the command line wins."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from protocol import DEFAULT_MAX_FRAME

from ._events import EVENT_BUFFER, EVENT_LINGER, MIN_EVENT_BUFFER
from ._gate import DEFAULT_HELLO_TIMEOUT, DEFAULT_MAX_CONNECTIONS

DEFAULT_MAX_QUEUES: Final = 100_000

DESCRIPTION = """\
Sluice: a durable message broker and job queue.

Listens for the Sluice wire protocol (length-prefixed msgpack over TCP) and prints
"sluice listening on HOST:PORT" once it accepts connections. SIGTERM or SIGINT stops it
gracefully: it stops accepting, answers what is in flight, and exits 0.

Every change is appended to a write-ahead log in --data-dir before the client hears
"done"; checkpoints move it into an LMDB store there, and a restart recovers everything
from the two. --in-memory keeps nothing on disk.
"""

EPILOG = """\
every flag may also be set from the environment: --port 7800 is SLUICE_PORT=7800.

examples:
  python -m broker                          # 127.0.0.1:7700, data in ./sluice-data
  python -m broker --port 0                 # any free port; read it from the first line
  python -m broker --data-dir /var/lib/sluice --fsync interval
  python -m broker --in-memory              # nothing on disk: for tests and benchmarks
  python -m broker --http-port 0 --log-format json   # no HTTP server, JSON log lines
  SLUICE_HOST=0.0.0.0 python -m broker      # listen on every interface

HTTP (metrics, health, admin API, dashboard):
  --http-port N serves /metrics, /healthz, /api/v1 and the dashboard at / on --host.
  It defaults to 7701, or to a free port when --port is 0 (read it from the "listening"
  log line); 0 turns the HTTP server off. --metrics-port is the same flag's old name.

fsync modes:
  always    every commit reaches the disk before replies go out: survives power loss
  interval  commits reach the OS at once and the disk every --fsync-interval-ms: survives
            the broker being killed, may lose the last interval on power loss
  never     like interval, but the OS decides when to write to disk

background sync (--fsync always, Linux):
  auto      the disk syncs on a kernel worker while the broker goes on serving, when 4 or
            more replies wait for the commit (many busy connections); with fewer (one
            producer and its workers) the broker waits in the sync, which comes back sooner
  on        every sync in the background      off  every sync on the broker's thread
  Where the kernel has no native AIO, every sync is on the broker's thread.
"""

DEFAULT_HTTP_PORT = 7701
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


class HttpUnavailable(Exception):
    """The HTTP port cannot be bound; the message says what to do. (Here, not in
    ``_http``: a broker with HTTP off never imports aiohttp.)"""


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    host: str
    port: int
    data_dir: str | None  # None: in memory
    fsync: str
    fsync_interval: float  # seconds
    background_sync: str = "auto"  # "auto", "on" or "off": see the epilog
    max_storage: int | None
    log_level: str
    max_frame: int
    auth_token: str | None
    http_port: int | None = None  # None: no HTTP server; 0: any free port
    metrics_top_queues: int = 100  # queues given their own series in /metrics
    log_format: str = "text"
    auth_file: str | None = None  # principals and grants (TOML); SIGHUP reloads it
    jwt_key: str | None = None  # a PEM public key: hello tokens may be JWTs it signed
    jwt_audience: str | None = None  # the aud those JWTs must name
    tls_cert: str | None = None  # PEM certificate chain: TLS on the broker and HTTP ports
    tls_key: str | None = None  # its private key (if not in the cert file)
    tls_client_ca: str | None = None  # require client certificates signed by this CA
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_queues: int = DEFAULT_MAX_QUEUES
    event_buffer: int = EVENT_BUFFER  # job events kept for subscribers' from_seq
    event_linger: float = EVENT_LINGER  # seconds they are kept after the last subscriber
    hello_timeout: float = DEFAULT_HELLO_TIMEOUT  # seconds
    audit_log: str | None = None  # audit events as JSON lines, appended; SIGHUP reopens it
    initial_map_size: int = 64 << 20  # the LMDB map's first size; it doubles as needed

    def summary(self) -> dict[str, Any]:
        """Every setting, safe to log: of the auth token, only whether there is one."""
        settings = dataclasses.asdict(self)
        settings["auth_token"] = "set" if self.auth_token else None
        return settings


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(f"SLUICE_{name.upper()}", default)


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {port}")
    return port


def _http_port(config_port: int, flag: Any) -> int | None:
    """The HTTP port from --http-port (None: not given): 0 turns HTTP off; unset, it is
    7701, or any free port (0 here) when the wire port is 0 too."""
    if flag is None:
        return 0 if config_port == 0 else DEFAULT_HTTP_PORT
    return None if int(flag) == 0 else int(flag)


def _top_queues(text: str) -> int:
    count = int(text)
    if not 1 <= count <= 1_000_000:
        raise argparse.ArgumentTypeError(f"must be 1-1000000 queues, got {count}")
    return count


def _size(text: str) -> int:
    """Bytes, with an optional binary suffix: 512M, 2G, 1T (or K, and with a trailing B)."""
    cleaned = text.strip().lower().removesuffix("b").removesuffix("i")
    number, unit = cleaned, ""
    if cleaned and cleaned[-1] in "kmgt":
        number, unit = cleaned[:-1], cleaned[-1]
    try:
        size = int(float(number) * _SIZE_UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 512M or 2G, got {text!r}") from None
    if size < 1024**2:
        raise argparse.ArgumentTypeError(f"a store needs at least 1M, got {text!r}")
    return size


def _interval_ms(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 60_000:
        raise argparse.ArgumentTypeError(f"fsync interval must be 1-60000 ms, got {value}")
    return value


def _frame_size(text: str) -> int:
    size = int(text)
    if not 1024 <= size <= 1024**3:
        raise argparse.ArgumentTypeError(f"max frame must be 1 KiB to 1 GiB, got {size}")
    return size


def _positive_int(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 10_000_000:
        raise argparse.ArgumentTypeError(f"must be 1-10000000, got {value}")
    return value


def _linger(text: str) -> float:
    if text == "always":
        return math.inf
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be seconds or 'always', got {text!r}") from None
    if not 0 <= value <= 86_400:  # (NaN is refused here too)
        raise argparse.ArgumentTypeError(f"must be 0-86400 seconds or 'always', got {text}")
    return value


def _event_buffer(text: str) -> int:
    value = int(text)
    if not MIN_EVENT_BUFFER <= value <= 10_000_000:
        raise argparse.ArgumentTypeError(f"must be {MIN_EVENT_BUFFER}-10000000, got {value}")
    return value


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(
            f"must be more than 0 and at most 3600 seconds, got {text}"
        )
    return value


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
        default=_env("data_dir", "sluice-data"),
        help="directory of the write-ahead store; created if missing, and locked: one "
        "broker per directory (default %(default)s)",
    )
    add(
        "--in-memory",
        action="store_true",
        default=_env("in_memory", "") not in ("", "0", "false", "no"),
        help="keep everything in memory and nothing on disk: a restart loses every message",
    )
    add(
        "--fsync",
        default=_env("fsync", "always"),
        choices=["always", "interval", "never"],
        help="when commits reach the disk; see 'fsync modes' below (default %(default)s)",
    )
    add(
        "--fsync-interval-ms",
        type=_interval_ms,
        default=_env("fsync_interval_ms", "100"),
        help="milliseconds between syncs with --fsync interval (default %(default)s)",
    )
    add(
        "--background-sync",
        default=_env("background_sync", "auto"),
        choices=["auto", "on", "off"],
        help="with --fsync always, sync the log on a kernel worker while serving on; see "
        "'background sync' below (default %(default)s)",
    )
    add(
        "--max-storage",
        type=_size,
        default=_env("max_storage", None),
        help="largest size of the store, e.g. 512M or 20G; puts fail with STORAGE_FULL "
        "near it while acks keep working (default: what the disk has free)",
    )
    add(
        "--initial-map-size",
        type=_size,
        default=_env("initial_map_size", "64M"),
        help="the store's first LMDB map size (at least its file's); it doubles when a "
        "checkpoint needs more, up to --max-storage (default %(default)s)",
    )
    add(
        "--log-level",
        default=_env("log_level", "info"),
        choices=["debug", "info", "warning", "error"],
        help="log verbosity on stderr (default %(default)s)",
    )
    add(
        "--log-format",
        default=_env("log_format", "text"),
        choices=["text", "json"],
        help="log lines on stderr as human text, or one JSON object per line with the "
        "event name and its fields (default %(default)s)",
    )
    add(
        "--http-port",
        "--metrics-port",
        dest="http_port",
        type=_port,
        default=_env("http_port", _env("metrics_port", None)),
        help="HTTP port (on --host) serving /metrics, /healthz, the admin API /api/v1 and "
        "the dashboard /; 0 turns HTTP off (default 7701, or a free port with --port 0; "
        "--metrics-port and SLUICE_METRICS_PORT are old names of this flag)",
    )
    add(
        "--metrics-top-queues",
        type=_top_queues,
        default=_env("metrics_top_queues", "100"),
        help="/metrics has per-queue series for this many queues, the deepest, plus "
        "totals over every queue (default %(default)s)",
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
    add(
        "--auth-file",
        default=_env("auth_file", None),
        help="TOML file of principals (tokens as SHA-256 digests) and their grants per "
        "queue glob; SIGHUP reloads it. --auth-token still has every right",
    )
    add(
        "--jwt-key",
        default=_env("jwt_key", None),
        metavar="PATH",
        help="PEM public key (Ed25519, RSA or P-256): a client may send a JWT signed by its "
        "private key as its token; sub names it, the 'sluice' claim holds its grants",
    )
    add(
        "--jwt-audience",
        default=_env("jwt_audience", None),
        help="with --jwt-key: the aud a JWT must name",
    )
    add(
        "--tls-cert",
        default=_env("tls_cert", None),
        help="PEM certificate (chain) to serve TLS with, on the broker port and the HTTP "
        "port (TLS 1.2 or later); clients then use sluices:// and https://",
    )
    add("--tls-key", default=_env("tls_key", None), help="PEM private key of --tls-cert")
    add(
        "--max-connections",
        type=_positive_int,
        default=_env("max_connections", str(DEFAULT_MAX_CONNECTIONS)),
        help="connections open at once; the next one gets a QUOTA error and a close "
        "(default %(default)s)",
    )
    add(
        "--max-queues",
        type=_positive_int,
        default=_env("max_queues", str(DEFAULT_MAX_QUEUES)),
        help="queues the broker may hold; an op that would create one more gets a QUOTA "
        "error and changes nothing (default %(default)s)",
    )
    add(
        "--event-buffer",
        type=_event_buffer,
        default=_env("event_buffer", str(EVENT_BUFFER)),
        help="job events kept in memory (about 200 bytes each) for subscribers that ask "
        "for older ones with from_seq; older ones are gone, and such a subscriber is told "
        "(default %(default)s)",
    )
    add(
        "--event-linger",
        type=_linger,
        default=_env("event_linger", str(EVENT_LINGER)),
        metavar="SECONDS",
        help="job events are kept while someone subscribes to them and for this long after "
        "the last such subscription ends, so a subscriber that reconnects within it misses "
        "nothing; otherwise they are only numbered, which costs next to nothing "
        "(default %(default)s; 'always' keeps them always)",
    )
    add(
        "--hello-timeout",
        type=_positive_seconds,
        default=_env("hello_timeout", str(DEFAULT_HELLO_TIMEOUT)),
        help="seconds a new connection has to send hello before it is closed (default %(default)s)",
    )
    add(
        "--tls-client-ca",
        default=_env("tls_client_ca", None),
        help="PEM CA certificate(s): clients must present a certificate signed by one (mutual TLS)",
    )
    add(
        "--audit-log",
        default=_env("audit_log", None),
        help="append every audit event (admin ops, FORBIDDEN refusals) to this file as "
        "JSON lines, besides the log; SIGHUP reopens it (for rotation)",
    )
    return parser


def _refuse_bad_choices(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A flag with choices that took its value from the environment: argparse checks
    only command-line values against the choices, so check every one here."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.choices is not None and value not in action.choices:
            flag = action.option_strings[-1]
            variable = f"SLUICE_{flag.removeprefix('--').replace('-', '_').upper()}"
            choices = ", ".join(repr(choice) for choice in action.choices)
            parser.error(f"{variable}: invalid choice: {value!r} (choose from {choices})")


def parse_config(argv: Sequence[str] | None = None) -> Config:
    parser = build_parser()
    args = parser.parse_args(argv)
    _refuse_bad_choices(parser, args)
    return Config(
        host=args.host,
        port=int(args.port),
        data_dir=None if args.in_memory else args.data_dir,
        fsync=args.fsync,
        fsync_interval=int(args.fsync_interval_ms) / 1000,
        background_sync=args.background_sync,
        max_storage=args.max_storage if args.max_storage is None else int(args.max_storage),
        log_level=args.log_level,
        max_frame=int(args.max_frame),
        auth_token=args.auth_token or None,
        http_port=_http_port(int(args.port), args.http_port),
        metrics_top_queues=int(args.metrics_top_queues),
        log_format=args.log_format,
        auth_file=args.auth_file or None,
        jwt_key=args.jwt_key or None,
        jwt_audience=args.jwt_audience or None,
        tls_cert=args.tls_cert or None,
        tls_key=args.tls_key or None,
        tls_client_ca=args.tls_client_ca or None,
        max_connections=int(args.max_connections),
        max_queues=int(args.max_queues),
        event_buffer=int(args.event_buffer),
        event_linger=float(args.event_linger),
        hello_timeout=float(args.hello_timeout),
        audit_log=args.audit_log or None,
        initial_map_size=int(args.initial_map_size),
    )
