"""``python -m broker``: run the daemon until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

import uvloop

from ._config import Config, parse_config
from ._core import Core
from ._server import BrokerServer, ServerLimits
from ._store import Store, StoreError

log = logging.getLogger("sluice")


def open_store(config: Config, core: Core) -> Store | None:
    """Open and lock the data dir, and recover ``core`` from it (None: in memory)."""
    if config.data_dir is None:
        log.info("in memory: nothing is written to disk, a restart loses every message")
        return None
    store = Store(config.data_dir, fsync=config.fsync, max_storage=config.max_storage)
    log.info("recovering from %s (fsync %s)", os.path.abspath(config.data_dir), config.fsync)
    recovered = store.recover(core, time.time())
    states = ", ".join(f"{count} {state}" for state, count in recovered.by_state.items())
    log.info(
        "recovered %d messages (%s) in %d queues in %.3f s",
        recovered.messages,
        states,
        recovered.queues,
        recovered.seconds,
    )
    return store


async def serve(config: Config) -> None:
    # A reserve reply carries at most about half a frame of bodies (always one message).
    core = Core(max_delivery_bytes=config.max_frame // 2, track_changes=config.data_dir is not None)
    store = open_store(config, core)
    limits = ServerLimits(
        max_frame=config.max_frame,
        auth_token=config.auth_token,
        fsync_interval=config.fsync_interval,
    )
    server = BrokerServer(core, limits, store=store)
    try:
        await run_until_signal(server, config)
    finally:
        if store is not None:
            store.sync()
            store.close()


async def run_until_signal(server: BrokerServer, config: Config) -> None:
    host, port = await server.start(config.host, config.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"sluice listening on {host}:{port}", flush=True)
    await stop.wait()
    log.info("shutting down: answering in-flight requests")
    await server.shutdown()
    log.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    logging.basicConfig(
        level=config.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        uvloop.run(serve(config))
    except StoreError as error:
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
