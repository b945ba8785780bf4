"""What every benchmarked server shares: how the load processes reach it, the interface
their connections offer (asyncio and blocking), and starting and stopping a server
process the bench owns.

A server the bench starts listens on 127.0.0.1 on a free port, keeps its files in a
temporary directory, and is stopped by the PID the bench started (SIGTERM, then SIGKILL
if it does not exit); the directory is removed afterwards.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

STOP_TIMEOUT = 10.0
READY_TIMEOUT = 30.0

# One delivery as the load loops see it: the body, and whatever the server needs to ack it.
Delivery = tuple[bytes, Any]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a load process connects, and with which client (``kind``)."""

    kind: str  # "sluice", "beanstalkd" or "redis"
    host: str
    port: int
    namespace: str = ""  # prefix for queue names, so runs never share a queue
    tls: bool = False  # connect with TLS (a sluices:// --url)


class Connection(Protocol):
    """One client connection, as the producer and worker loops use it."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def put(self, queue: str, bodies: list[bytes], priority: int, delay: float) -> None:
        """Store every body (confirmed by the server) before returning."""

    async def reserve(
        self, queues: Sequence[str], max_messages: int, wait: float
    ) -> list[Delivery]:
        """Lease up to ``max_messages``, waiting up to ``wait`` seconds for the first."""

    async def ack(self, handles: list[Any]) -> None:
        """Finish the deliveries; raise if the server did not finish every one."""


class BlockingConnection(Protocol):
    """The same connection through a blocking client, for a load that gives each
    connection a thread of its own: each call returns once the server has answered."""

    def open(self) -> None: ...

    def close(self) -> None: ...

    def put(self, queue: str, bodies: list[bytes], priority: int, delay: float) -> None:
        """Store every body (confirmed by the server) before returning."""

    def reserve(self, queues: Sequence[str], max_messages: int, wait: float) -> list[Delivery]:
        """Lease up to ``max_messages``, waiting up to ``wait`` seconds for the first."""

    def ack(self, handles: list[Any]) -> None:
        """Finish the deliveries; raise if the server did not finish every one."""


class Unsupported(Exception):
    """This server cannot run this workload; the message says why (shown as "skipped")."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[Any], timeout: float) -> None:
    """Return once ``port`` accepts connections; raise if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with status {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.02)
    raise RuntimeError(f"not listening on port {port} after {timeout:.0f}s")


def command_version(command: Sequence[str]) -> str:
    """The first line a ``--version``-style command prints, or "unknown"."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "unknown"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


@dataclass
class OwnedProcess:
    """A server process this bench started, with its temporary directory."""

    process: subprocess.Popen[Any] | None = None
    directory: Path | None = None
    log_path: Path | None = None
    _log: Any = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def make_directory(self, prefix: str) -> Path:
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix=prefix))
        return self.directory

    def spawn(self, command: Sequence[str], **options: Any) -> subprocess.Popen[Any]:
        """Start ``command`` with its stderr (and stdout unless redirected) in a log file."""
        assert self.directory is not None, "make_directory first"
        self.log_path = self.directory / "server.log"
        if self._log is None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        options.setdefault("stdout", self._log)
        self.process = subprocess.Popen(command, stderr=self._log, **options)
        return self.process

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the process and reap it; keep the directory (for a restart)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self, *, keep_directory: bool = False) -> None:
        """SIGTERM, SIGKILL after STOP_TIMEOUT; then remove the directory."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.directory is not None and not keep_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


class Server(Protocol):
    """A server under test: started and stopped by the bench, or reached by URL."""

    name: str  # "sluice", "beanstalkd", "redis"
    mode: str  # durability setting, e.g. "memory", "binlog off", "aof always"
    notes: list[str]

    @property
    def pid(self) -> int | None: ...

    def endpoint(self) -> Endpoint: ...

    def versions(self) -> dict[str, str]: ...

    def check(self, workload: Any) -> None:
        """Raise Unsupported if this server cannot run ``workload`` faithfully."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    @property
    def durable(self) -> bool:
        """Whether what it confirmed survives a kill -9 (so recovery can run)."""

    def restart_after_kill(self) -> dict[str, float]:
        """SIGKILL, restart on the same data and port; "listening_s" and "ready_s"."""

    def queued(self, queues: list[str]) -> int:
        """Messages ready over ``queues``, by the server's own count."""
