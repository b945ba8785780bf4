"""``python -m broker``: run the daemon until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import signal
import ssl
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import uvloop

from . import __version__
from ._audit import AuditFile, AuditFileError
from ._auth import AuthFileError, Authority
from ._config import Config, HttpUnavailable, parse_config
from ._core import Core
from ._events import EventRing
from ._logging import configure_logging, event, log_dead_letter
from ._server import BrokerServer, ServerLimits
from ._store import Recovered, Store, StoreError
from ._tls import TlsError, quiet_tls_noise, server_context

if TYPE_CHECKING:
    from ._http import HttpServer

log = logging.getLogger("sluice")


def open_store(config: Config, core: Core) -> tuple[Store | None, Recovered | None]:
    """Open and lock the data dir, and recover ``core`` from it (None: in memory)."""
    if config.data_dir is None:
        log.info(
            "in memory: nothing is written to disk, a restart loses every message",
            extra=event("in_memory"),
        )
        return None, None
    store = Store(
        config.data_dir,
        fsync=config.fsync,
        max_storage=config.max_storage,
        initial_map=config.initial_map_size,
    )
    data_dir = os.path.abspath(config.data_dir)
    log.info(
        "recovering from %s (fsync %s)",
        data_dir,
        config.fsync,
        extra=event("recovering", data_dir=data_dir, fsync=config.fsync),
    )
    # The cyclic GC is paused while recovering: a million new objects would start a full
    # collection over all of them again and again (recovery makes no cycles). What it
    # loaded lives long, so it is frozen out of the collector's sight before it resumes.
    gc.disable()
    try:
        recovered = store.recover(core, time.time())
    finally:
        gc.freeze()
        gc.enable()
    states = ", ".join(f"{count} {state}" for state, count in recovered.by_state.items())
    log.info(
        "recovered %d messages (%s) in %d queues in %.3f s",
        recovered.messages,
        states,
        recovered.queues,
        recovered.seconds,
        extra=event(
            "recovered",
            messages=recovered.messages,
            queues=recovered.queues,
            seconds=round(recovered.seconds, 6),
            **recovered.by_state,
        ),
    )
    return store, recovered


GIL_SWITCH_INTERVAL: Final = 0.0005  # seconds; Python's default is 0.005
GC_YOUNG_THRESHOLD: Final = 10_000  # allocations between young collections; default 700


async def serve(config: Config) -> None:
    # A reserve reply carries at most about half a frame of bodies (always one message).
    log_start(config)
    raise_open_files_limit(config.max_connections)
    # The checkpoint thread competes with the loop for the GIL: a waiting loop gets it
    # back after this long, not after Python's default 5 ms.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    # Each request allocates a few dozen objects, nearly all freed by reference counting:
    # a young-generation collection every 700 allocations (the default) is mostly wasted
    # work. (bench.micro_server: 26.0 -> 24.0 us per request.)
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    core = Core(
        max_delivery_bytes=config.max_frame // 2,
        max_body_limit=config.max_frame,
        track_changes=config.data_dir is not None,
        on_dead=log_dead_letter,
        max_queues=config.max_queues,
        events=EventRing(config.event_buffer),
    )
    verifier = None
    if config.jwt_key:
        from ._jwt import JwtVerifier  # jwt and cryptography: imported only when used

        verifier = JwtVerifier(config.jwt_key, config.jwt_audience)
    authority = Authority(config.auth_token, config.auth_file, verifier)  # bad: stops here
    audit_file = None if config.audit_log is None else AuditFile(config.audit_log)  # likewise
    tls = server_context(config.tls_cert, config.tls_key, config.tls_client_ca)
    store, recovered = open_store(config, core)
    if store is not None:
        core.admit_fire = store.admits  # a full store skips schedules' fires, as it refuses puts
    limits = ServerLimits(
        max_frame=config.max_frame,
        auth_token=config.auth_token,
        fsync_interval=config.fsync_interval,
        background_sync=config.background_sync,
        max_connections=config.max_connections,
        hello_timeout=config.hello_timeout,
        event_linger=config.event_linger,
    )
    server = BrokerServer(core, limits, store=store, authority=authority)
    server.metrics.recovered = recovered
    try:
        await run_until_signal(server, config, tls, audit_file)
    finally:
        if audit_file is not None:
            audit_file.close()
        if store is not None:
            # The next start then has no log to apply, and goes on from these counters.
            if not store.checkpoint_now(core.counters):
                log.warning(
                    "could not checkpoint before stopping (%s); the next start applies "
                    "the log, nothing is lost",
                    store.checkpoint_error or store.disk_full or "timed out",
                    extra=event("shutdown_checkpoint_skipped"),
                )
            store.close()


FD_RESERVE: Final = 64  # descriptors kept for the store, logs, HTTP and the runtime
MAX_OPEN_FILES: Final = 1 << 20  # what an unlimited hard limit is raised to


def raise_open_files_limit(max_connections: int) -> int:
    """Raise the soft limit on open files to the hard one (a default of 1,024 lets ~1,000
    silent sockets lock every real client out) and log how many connections it allows.
    Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass  # keep the soft limit; the line below says what it allows
    capacity = max(0, soft - FD_RESERVE)
    level = logging.WARNING if capacity < max_connections else logging.INFO
    log.log(
        level,
        "open files limit %d: room for about %d connections (--max-connections %d)",
        soft,
        capacity,
        max_connections,
        extra=event("fd_limit", soft=soft, hard=hard, connections=capacity),
    )
    return soft


def log_start(config: Config) -> None:
    settings = config.summary()
    log.info(
        "sluice %s starting (pid %d): %s",
        __version__,
        os.getpid(),
        " ".join(f"{name}={value}" for name, value in settings.items()),
        extra=event("start", version=__version__, pid=os.getpid(), settings=settings),
    )


async def start_http(
    server: BrokerServer, config: Config, tls: ssl.SSLContext | None
) -> tuple[HttpServer | None, str]:
    """Serve metrics, health, the API and the dashboard unless HTTP is off; returns the
    server and its address for the log ("off" if none)."""
    if config.http_port is None:
        return None, "off"
    from ._http import HttpServer  # aiohttp: imported only when HTTP is on (a faster start)

    http = HttpServer(server, top_queues=config.metrics_top_queues)
    host, port = await http.start(config.host, config.http_port, tls)
    shown = f"[{host}]" if ":" in host else host
    return http, f"{'https' if tls else 'http'}://{shown}:{port}/"


def on_sighup(server: BrokerServer, audit_file: AuditFile | None) -> None:
    """Reload the auth file and reopen the audit log (after a rotation moved it)."""
    server.reload_auth()
    if audit_file is not None:
        audit_file.reopen()


async def run_until_signal(
    server: BrokerServer,
    config: Config,
    tls: ssl.SSLContext | None,
    audit_file: AuditFile | None = None,
) -> None:
    if tls is not None:
        quiet_tls_noise()
    host, port = await server.start(config.host, config.port, tls)
    http, http_address = await start_http(server, config, tls)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_sighup, server, audit_file)
    # The log line first: whoever reads the stdout line can then find the HTTP port.
    log.info(
        "listening on %s:%d, http %s",
        host,
        port,
        http_address,
        extra=event(
            "listening",
            host=host,
            port=port,
            http=http_address,
            metrics="off" if http is None else f"{http_address}metrics",  # its older name
        ),
    )
    print(f"sluice listening on {host}:{port}", flush=True)
    await stop.wait()
    log.info("shutting down: answering in-flight requests", extra=event("shutdown"))
    await server.shutdown()
    if http is not None:
        await http.close()
    log.info("stopped", extra=event("stopped"))


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    configure_logging(config.log_level, config.log_format)
    try:
        uvloop.run(serve(config))
    except (StoreError, HttpUnavailable, AuthFileError, AuditFileError, TlsError) as error:
        print(f"sluice-broker: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(
            f"sluice-broker: cannot listen on {config.host}:{config.port}: {error}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
