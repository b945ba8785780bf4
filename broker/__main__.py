"""``python -m broker``: run the daemon until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

import uvloop

from ._config import Config, parse_config
from ._core import Core
from ._server import BrokerServer, ServerLimits

log = logging.getLogger("sluice")


async def serve(config: Config) -> None:
    if config.data_dir is not None:
        os.makedirs(config.data_dir, exist_ok=True)
        log.info("data dir %s (this version keeps state in memory only)", config.data_dir)
    # A reserve reply carries at most about half a frame of bodies (always one message).
    core = Core(max_delivery_bytes=config.max_frame // 2)
    limits = ServerLimits(max_frame=config.max_frame, auth_token=config.auth_token)
    server = BrokerServer(core, limits)
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
    except OSError as error:
        print(
            f"sluice-broker: cannot listen on {config.host}:{config.port}: {error}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
