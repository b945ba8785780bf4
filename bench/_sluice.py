"""Sluice as a server under test: a broker process the bench starts (or one at ``--url``),
and the load loops' connections over ``AsyncClient`` and over the blocking ``Client``."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from client import AsyncClient, Client, Message
from client._common import TLS_SCHEME, Tls, cli_tls

from ._load import QueueLimit
from ._servers import READY_TIMEOUT, Delivery, Endpoint, OwnedProcess, Unsupported

LISTENING = "sluice listening on "
FSYNC_MODES = ("always", "interval", "never", "memory")


@functools.cache
def broker_help() -> str:
    """``python -m broker --help``, to find out which flags this broker has."""
    done = subprocess.run(
        [sys.executable, "-m", "broker", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.stdout


def broker_has_durable_mode() -> bool:
    return "--fsync" in broker_help()


def auth_token() -> str | None:
    """The token for a broker that wants one (``--url``), from SLUICE_AUTH_TOKEN."""
    return os.environ.get("SLUICE_AUTH_TOKEN") or None


def tls(wanted: bool) -> Tls:
    """TLS for a ``sluices://`` broker: a context from SLUICE_TLS_CA (and SLUICE_TLS_CERT,
    SLUICE_TLS_KEY for a broker that wants a client certificate), or the system's CAs."""
    env = os.environ.get
    context = cli_tls(env("SLUICE_TLS_CA"), env("SLUICE_TLS_CERT"), env("SLUICE_TLS_KEY"))
    return (context or True) if wanted else False


def probe(host: str, port: int, timeout: float = 10.0, use_tls: bool = False) -> Client:
    """A blocking client for the bench's own checks (version, stats, ping)."""
    return Client(host, port, timeout=timeout, **_client_options(use_tls))


def _client_options(use_tls: bool) -> dict[str, Any]:
    return {"client_name": "sluice-bench", "auth_token": auth_token(), "tls": tls(use_tls)}


def _check_acked(acked: int, messages: list[Message]) -> None:
    if acked != len(messages):
        raise RuntimeError(f"broker acked {acked} of {len(messages)} messages")


class SluiceConnection:
    """The load loops' view of one ``AsyncClient`` connection."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.client = AsyncClient(endpoint.host, endpoint.port, **_client_options(endpoint.tls))

    async def open(self) -> None:
        await self.client.connect()

    async def close(self) -> None:
        await self.client.close()

    async def put(self, queue: str, bodies: list[bytes], priority: int, delay: float) -> None:
        await self.client.put_many(queue, bodies, priority=priority, delay=delay)

    async def reserve(
        self, queues: Sequence[str], max_messages: int, wait: float
    ) -> list[Delivery]:
        messages = await self.client.reserve(queues, max_messages=max_messages, wait=wait)
        return [(message.body, message) for message in messages]

    async def ack(self, handles: list[Any]) -> None:
        _check_acked(await self.client.ack(handles), handles)


class SluiceBlockingConnection:
    """The thread loads' view of one blocking ``Client`` connection."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.client = Client(endpoint.host, endpoint.port, **_client_options(endpoint.tls))

    def open(self) -> None:
        self.client.connect()

    def close(self) -> None:
        self.client.close()

    def put(self, queue: str, bodies: list[bytes], priority: int, delay: float) -> None:
        self.client.put_many(queue, bodies, priority=priority, delay=delay)

    def reserve(self, queues: Sequence[str], max_messages: int, wait: float) -> list[Delivery]:
        messages = self.client.reserve(queues, max_messages=max_messages, wait=wait)
        return [(message.body, message) for message in messages]

    def ack(self, handles: list[Any]) -> None:
        _check_acked(self.client.ack(handles), handles)


class SluiceServer:
    """A broker started by the bench (``python -m broker`` on a free port), or the one at
    ``url``. ``fsync`` is one of FSYNC_MODES; a broker without durable mode runs in memory
    and ``notes`` says so."""

    name = "sluice"

    def __init__(self, fsync: str = "memory", url: str | None = None) -> None:
        self.url = url
        self.notes: list[str] = []
        self.owned = OwnedProcess()
        self.host, self.port = "127.0.0.1", 0
        self.tls = False
        if url:
            target = Client.from_url(url)  # parses only; connects on first use
            self.host, self.port = target.host, target.port
            self.tls = urlsplit(url).scheme == TLS_SCHEME
        self.durable = fsync != "memory"
        if url:
            self.mode = "external"
            self.notes.append(f"ran against {url}: --fsync does not apply, no CPU or RSS")
        elif self.durable and not broker_has_durable_mode():
            self.durable = False
            self.mode = "memory"
            self.notes.append(
                f"this broker has no --fsync flag yet: ran in memory instead of fsync {fsync}"
            )
        else:
            self.mode = "memory" if fsync == "memory" else f"fsync {fsync}"
        self.fsync = fsync if self.durable else "memory"

    @property
    def pid(self) -> int | None:
        return self.owned.pid

    def endpoint(self) -> Endpoint:
        return Endpoint("sluice", self.host, self.port, tls=self.tls)

    def check(self, workload: Any) -> None:
        """Sluice runs every workload."""

    def versions(self) -> dict[str, str]:
        try:
            package = importlib.metadata.version("sluice")
        except importlib.metadata.PackageNotFoundError:
            package = "not installed"
        info: dict[str, str] = {"sluice package": package}
        try:
            with probe(self.host, self.port, use_tls=self.tls) as client:
                info["sluice broker"] = str(client.server_info.get("version", "unknown"))
        except Exception as error:  # a version is nice to have, not worth failing a run
            info["sluice broker"] = f"unknown ({error})"
        return info

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "broker", "--host", "127.0.0.1", "--port"]
        command += [str(self.port or 0), "--log-level", "warning"]
        if self.durable:
            assert self.owned.directory is not None
            command += ["--fsync", self.fsync, "--data-dir", str(self.owned.directory / "data")]
        elif "--in-memory" in broker_help():
            command.append("--in-memory")
        if "--metrics-port" in broker_help():
            command += ["--metrics-port", "0"]  # benches may run side by side
        return command

    def start(self) -> None:
        """Start the broker and wait for its listening line (no-op with ``url``)."""
        if self.url:
            return
        self.owned.make_directory("sluice-bench-")
        self.port = self._launch()

    def _launch(self) -> int:
        process = self.owned.spawn(self.command(), stdout=subprocess.PIPE, text=True)
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], READY_TIMEOUT)
        line = process.stdout.readline() if ready else ""
        if not line.startswith(LISTENING):
            self.owned.kill()
            raise RuntimeError(
                f"the broker did not start (expected {LISTENING!r}, got {line!r}); its log:\n"
                + self.owned.log_tail()
            )
        return int(line.strip().rsplit(":", 1)[1])

    def restart_after_kill(self) -> dict[str, float]:
        """SIGKILL the broker, start it again on the same data directory and port, and time
        it: seconds until the listening line, and until it answered a ping."""
        self.owned.kill()
        started = time.perf_counter()
        self.port = self._launch()
        listening = time.perf_counter() - started
        with probe(self.host, self.port, READY_TIMEOUT, use_tls=self.tls) as client:
            client.ping()
        return {"listening_s": listening, "ready_s": time.perf_counter() - started}

    def queued(self, queues: list[str]) -> int:
        """Ready messages over ``queues``, by the broker's own listing (a queue not in it
        holds none: the broker forgets a queue once it is unused)."""
        with probe(self.host, self.port, use_tls=self.tls) as client:
            ready = {queue["name"]: int(queue["ready"]) for queue in client.queues()}
        return sum(ready.get(queue, 0) for queue in queues)

    def limit(self, queue: str, limit: QueueLimit) -> None:
        """Set ``limit`` on ``queue``; Unsupported if this broker has no rate limits."""
        with probe(self.host, self.port, use_tls=self.tls) as client:
            if "rate_limit" not in client.configure(queue):
                raise Unsupported("this broker has no rate_limit queue setting")
            client.configure(queue, **limit.settings())

    def limits(self, queue: str) -> dict[str, Any]:
        """The ``limits`` map of ``queue``'s stats: tokens, in_flight, max_in_flight,
        throttled_seconds and parked_by_limit."""
        with probe(self.host, self.port, use_tls=self.tls) as client:
            return dict(client.stats(queue).get("limits") or {})

    def stop(self) -> None:
        self.owned.stop()
