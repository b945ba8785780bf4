"""Fixtures for tests that run the real daemon (``python -m broker``) as a subprocess.

``broker`` starts a fresh daemon on port 0 for each test and, on teardown, stops it with
SIGTERM and asserts that it exits 0 without having logged a traceback. ``shared_broker`` is
the same daemon kept for a whole module, for long tables of independent cases.
``RawConnection`` speaks the wire protocol over a plain socket (its own framing, not the
``protocol`` package) for protocol-level tests.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import settings

from client import AsyncClient, Client

# No per-example deadline: the machines tests run on are shared and noisy, and a test must
# not fail because one example was slow (tests do not time things).
settings.register_profile("sluice", deadline=None)
settings.load_profile("sluice")

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 10.0  # seconds for the daemon to print its listening line
STOP_TIMEOUT = 10.0  # seconds for the daemon to exit after SIGTERM
REPLY_TIMEOUT = 5.0  # seconds a raw-socket read waits for a reply or for EOF
# A setting of its own keeps a queue (and its totals) once it is empty: an unused queue
# with the default settings is forgotten. Tests that look at a drained queue give it this.
KEEP = {"dedup_window": 301.0}


@dataclass
class BrokerProcess:
    """A running daemon: where it listens, its process, and the file its stderr goes to."""

    host: str
    port: int
    process: subprocess.Popen[str]
    log_path: Path
    stdout: queue.Queue[str | None] = field(default_factory=queue.Queue)  # after the first
    http_port: int | None = None  # where its HTTP server listens (None: off)

    @property
    def http(self) -> str:
        """The base URL of its HTTP server (metrics, API, dashboard)."""
        assert self.http_port is not None, "this broker was started without HTTP"
        return f"http://{self.host}:{self.http_port}"

    @property
    def url(self) -> str:
        return f"sluice://{self.host}:{self.port}"

    def client(self, **options: Any) -> Client:
        options.setdefault("timeout", REPLY_TIMEOUT)
        return Client(self.host, self.port, **options)

    def async_client(self, **options: Any) -> AsyncClient:
        options.setdefault("timeout", REPLY_TIMEOUT)
        return AsyncClient(self.host, self.port, **options)

    def raw(self, *, hello: bool = True) -> RawConnection:
        connection = RawConnection(self.host, self.port)
        if hello:
            connection.hello()
        return connection

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def assert_alive(self) -> None:
        assert self.process.poll() is None, (
            f"broker exited with {self.process.returncode}; log:\n{self.log()[-4000:]}"
        )

    def stop(self) -> int:
        """SIGTERM, then wait for the exit; kill -9 and fail if it does not come."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(
                f"broker did not exit within {STOP_TIMEOUT}s of SIGTERM; killed it. "
                f"log:\n{self.log()[-4000:]}"
            )


def _read_lines(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


HTTP_LINE = re.compile(r"listening on \S+, http https?://(?:\[[^]]*\]|[^:/]+):(\d+)/")


def start_broker(log_path: Path, *extra_args: str, http: bool = False) -> BrokerProcess:
    """Start ``python -m broker --port 0`` and wait (bounded) for its listening line.
    Unless ``extra_args`` pick a store, it gets a durable one in ``data`` beside the log.
    HTTP is off unless ``http`` (then on a free port, read from the log's listening line)
    or ``extra_args`` pick an HTTP port (brokers run side by side)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    # Flags for every broker of a run (the Makefile runs some suites again with them);
    # a test's own flags come after, so they win.
    extra_args = (*os.environ.get("SLUICE_TEST_BROKER_FLAGS", "").split(), *extra_args)
    if "--data-dir" not in extra_args and "--in-memory" not in extra_args:
        extra_args = ("--data-dir", str(log_path.parent / "data"), *extra_args)
    if not http and not {"--metrics-port", "--http-port"} & set(extra_args):
        extra_args = ("--http-port", "0", *extra_args)
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "broker", "--port", "0", *extra_args],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
        )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
    try:
        first = lines.get(timeout=START_TIMEOUT)
    except queue.Empty:
        first = None
    prefix = "sluice listening on "
    if first is None or not first.startswith(prefix):
        process.kill()
        process.wait()
        pytest.fail(
            f"broker did not print {prefix!r} within {START_TIMEOUT}s (got {first!r}); "
            f"log:\n{log_path.read_text(errors='replace')[-4000:]}"
        )
    host, _, port = first[len(prefix) :].strip().rpartition(":")
    # The broker logs its listening line (naming the HTTP port) before the stdout line.
    found = HTTP_LINE.search(log_path.read_text(errors="replace"))
    return BrokerProcess(
        host=host,
        port=int(port),
        process=process,
        log_path=log_path,
        stdout=lines,
        http_port=int(found.group(1)) if found else None,
    )


def stop_broker(broker: BrokerProcess, *, allow_traceback: bool = False) -> None:
    """Teardown: the daemon must exit 0 on SIGTERM and must not have logged a traceback
    (``allow_traceback`` only for tests marked xfail over a known broker bug)."""
    returncode = broker.stop()
    log = broker.log()
    assert returncode == 0, f"broker exited with {returncode}; log:\n{log[-4000:]}"
    extra = []
    while (line := broker.stdout.get(timeout=STOP_TIMEOUT)) is not None:
        extra.append(line)
    assert extra == [], f"the listening line must be the only stdout output, also got {extra}"
    if not allow_traceback:
        assert "Traceback" not in log, f"broker logged a traceback:\n{log[-4000:]}"


@pytest.fixture
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerProcess]:
    """A fresh daemon for one test."""
    running = start_broker(tmp_path / "broker.log")
    yield running
    stop_broker(running, allow_traceback=request.node.get_closest_marker("xfail") is not None)


@pytest.fixture
def brokers() -> Iterator[list[BrokerProcess]]:
    """For tests that start (and kill, and restart) brokers themselves: append each one;
    any still running at the end is killed."""
    started: list[BrokerProcess] = []
    yield started
    for running in started:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()


@pytest.fixture(scope="module")
def shared_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """One daemon for a whole module; each test must use queues of its own."""
    running = start_broker(tmp_path_factory.mktemp("broker") / "broker.log")
    yield running
    stop_broker(running)


# --------------------------------------------------------------------- raw protocol

HEADER = struct.Struct(">I")


def frame(obj: Any) -> bytes:
    """One frame: 4-byte big-endian length, then one msgpack object (str as str, bytes
    as bin)."""
    payload = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(payload)) + payload


class ConnectionEnded(AssertionError):
    """The broker closed the connection where a reply was expected."""


class RawConnection:
    """A plain blocking socket that sends frames and reads replies, each read bounded by
    ``REPLY_TIMEOUT`` so a broker that never answers fails the test instead of hanging."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=REPLY_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = bytearray()
        self._next_id = 1
        self.server_info: dict[str, Any] = {}

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def new_id(self) -> int:
        request_id, self._next_id = self._next_id, self._next_id + 1
        return request_id

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, obj: Any) -> None:
        self.send_bytes(frame(obj))

    def send_request(self, op: str, args: dict[str, Any], request_id: int | None = None) -> int:
        request_id = self.new_id() if request_id is None else request_id
        self.send([request_id, op, args])
        return request_id

    def _fill(self, size: int, timeout: float) -> bool:
        """Buffer at least ``size`` bytes; False on EOF before that."""
        self.sock.settimeout(timeout)
        while len(self._buffer) < size:
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                raise AssertionError(f"no reply from the broker within {timeout}s") from None
            except ConnectionResetError:
                data = b""
            if not data:
                return False
            self._buffer += data
        return True

    def read_reply(self, timeout: float = REPLY_TIMEOUT) -> list[Any]:
        """The next reply frame, decoded, checked to be ``[id, ok, result_or_error]``."""
        reply = self.read_frame(timeout)
        assert isinstance(reply, list) and len(reply) == 3, f"not a reply: {reply!r}"
        assert isinstance(reply[1], bool), f"not a reply: {reply!r}"
        if not reply[1]:
            error = reply[2]
            assert isinstance(error, dict), f"error is not a map: {reply!r}"
            assert isinstance(error.get("code"), str), f"error without a code: {reply!r}"
            assert isinstance(error.get("message"), str), f"error without a message: {reply!r}"
        return reply

    def read_frame(self, timeout: float = REPLY_TIMEOUT) -> Any:
        """The next frame, decoded (a reply, or a frame the broker pushes)."""
        if not self._fill(HEADER.size, timeout):
            raise ConnectionEnded(f"the broker closed the connection (buffered {self._buffer!r})")
        (length,) = HEADER.unpack_from(self._buffer)
        if not self._fill(HEADER.size + length, timeout):
            raise ConnectionEnded("the broker closed the connection in the middle of a frame")
        payload = bytes(self._buffer[HEADER.size : HEADER.size + length])
        del self._buffer[: HEADER.size + length]
        return msgpack.unpackb(payload, raw=False, strict_map_key=False)

    def request(self, op: str, args: dict[str, Any], request_id: int | None = None) -> list[Any]:
        """Send one request and return its reply (which must carry the same id)."""
        request_id = self.send_request(op, args, request_id)
        reply = self.read_reply()
        assert reply[0] == request_id, f"reply to {request_id} expected, got {reply!r}"
        return reply

    def call(self, op: str, args: dict[str, Any]) -> Any:
        """A request that must succeed; returns its result."""
        reply = self.request(op, args)
        assert reply[1] is True, f"{op} {args!r} failed: {reply!r}"
        return reply[2]

    def hello(self, version: Any = 1) -> dict[str, Any]:
        self.server_info = self.call("hello", {"version": version, "client": "raw-test"})
        return self.server_info

    def read_until_closed(self, timeout: float = REPLY_TIMEOUT) -> list[list[Any]]:
        """Every reply still to come, then EOF (the broker closed the connection)."""
        replies = []
        while True:
            try:
                replies.append(self.read_reply(timeout))
            except ConnectionEnded:
                assert not self._buffer, f"partial frame before EOF: {self._buffer!r}"
                return replies

    def assert_closed(self, timeout: float = REPLY_TIMEOUT) -> None:
        """No further reply: the next read is EOF."""
        replies = self.read_until_closed(timeout)
        assert replies == [], f"expected EOF, got more replies: {replies!r}"


def wait_for_state(
    check: Callable[[], bool],
    message: str = "the broker never reached the expected state",
    timeout: float = 5.0,
) -> None:
    """Query the broker until ``check`` holds (each query is a round trip, no sleeping)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, message


def error_code(reply: list[Any]) -> str:
    assert reply[1] is False, f"expected an error reply, got {reply!r}"
    return str(reply[2]["code"])
