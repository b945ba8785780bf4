"""The peers Sluice is compared with: beanstalkd and a Redis reliable list queue.

Each is started by the bench on 127.0.0.1 (a free port, a temporary directory) in each of
its durability modes, and driven with the same workload shape as Sluice by the same load
processes: with ``--client async`` each runs its connections as asyncio tasks on uvloop,
with ``--client sync`` a thread per connection with the usual blocking client. A missing
server binary, or a missing Python client (redis, greenstalk: the ``bench`` extra), makes
that peer "skipped", never an error.

- beanstalkd. async: a small asyncio client of its text protocol in this module.
  beanstalkd has no batch commands, so a batch is that many commands pipelined in one
  write. sync: greenstalk, the usual Python client, which waits for each reply, so a batch
  is that many round trips (driven through threads it can spend more CPU than beanstalkd
  itself: the async form is the one that measures the server). Priorities map to
  beanstalkd's (lower is more urgent); delays round up to whole seconds.
- Redis, through redis.asyncio (async) or redis.Redis (sync), as the usual reliable queue:
  LPUSH to put, BLMOVE from the queue to a processing list to reserve, LREM from the
  processing list to ack. A batch is one multi-value LPUSH, a BLMOVE plus pipelined
  LMOVEs, and pipelined LREMs. A list has no priorities or delays, and BLMOVE watches one
  list, so such workloads skip Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.metadata
import importlib.util
import math
import shutil
import socket
import time
from collections.abc import Sequence
from typing import Any, ClassVar

from ._servers import (
    READY_TIMEOUT,
    Delivery,
    Endpoint,
    OwnedProcess,
    Unsupported,
    command_version,
    free_port,
    wait_for_port,
)
from ._sluice import FSYNC_MODES, SluiceServer

INSTALL_CLIENTS = "pip install -e '.[bench]'"
BEANSTALKD_MODES = {"off": "binlog off", "binlog": "binlog on", "fsync": "binlog, fsync each write"}
REDIS_MODES = {"off": "aof off", "everysec": "aof everysec", "always": "aof always"}
BEANSTALKD_TTR = 120  # seconds a reserved job is held; far longer than any bench delivery


def _require_module(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise Unsupported(f"the {module} client is not installed: {INSTALL_CLIENTS}")


def _require_binary(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise Unsupported(f"{binary} is not installed: apt-get install {package}")
    return path


def _module_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


class _PeerServer:
    """What both peers share: a process on a free port in a temporary directory."""

    name = ""
    binary = ""
    package = ""
    # client form -> the Python client it needs ("": none)
    clients: ClassVar[dict[str, str]] = {}
    version_flag = "--version"

    def __init__(self, mode: str, label: str) -> None:
        self.mode_key = mode
        self.mode = label
        self.notes: list[str] = []
        self.owned = OwnedProcess()
        self.port = 0
        self.client_module = ""  # as of check(): the client the workload's form uses

    @property
    def pid(self) -> int | None:
        return self.owned.pid

    def endpoint(self) -> Endpoint:
        return Endpoint(self.name, "127.0.0.1", self.port)

    def versions(self) -> dict[str, str]:
        path = shutil.which(self.binary)
        server = command_version([path, self.version_flag]) if path else "not installed"
        versions = {f"{self.name} server": server}
        if self.client_module:
            client = _module_version(self.client_module)
            versions[f"{self.client_module} python client"] = client
        return versions

    def check(self, workload: Any) -> None:
        if workload.limit is not None:
            raise Unsupported(
                f"{self.name} has no rate limit kept by the server across consumers "
                "(the limited scenario runs against Sluice only)"
            )
        _require_binary(self.binary, self.package)
        self.client_module = self.clients.get(workload.client, "")
        if self.client_module:
            _require_module(self.client_module)

    def command(self, binary: str, directory: str) -> list[str]:
        raise NotImplementedError

    @property
    def durable(self) -> bool:
        return self.mode_key != "off"

    def start(self) -> None:
        self.owned.make_directory(f"sluice-bench-{self.name}-")
        self.port = free_port()
        self._launch()

    def _launch(self) -> None:
        binary = _require_binary(self.binary, self.package)
        assert self.owned.directory is not None
        process = self.owned.spawn(self.command(binary, str(self.owned.directory)))
        try:
            wait_for_port(self.port, process, READY_TIMEOUT)
        except RuntimeError as error:
            tail = self.owned.log_tail()
            self.stop()
            raise RuntimeError(f"{self.name} {error}; its log:\n{tail}") from None

    def restart_after_kill(self) -> dict[str, float]:
        """SIGKILL the server, start it again on the same directory and port, and time it:
        seconds until it listens, and until it answers a command (it may load first)."""
        self.owned.kill()
        started = time.perf_counter()
        self._launch()
        listening = time.perf_counter() - started
        deadline = started + READY_TIMEOUT
        while not self._answers():
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{self.name} did not answer within {READY_TIMEOUT:.0f}s")
            time.sleep(0.01)
        return {"listening_s": listening, "ready_s": time.perf_counter() - started}

    def _ask(self, request: bytes, until: bytes) -> bytes:
        """Send one raw request; read until the reply ends with ``until``."""
        with socket.create_connection(("127.0.0.1", self.port), READY_TIMEOUT) as sock:
            sock.sendall(request)
            reply = b""
            while not reply.endswith(until):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
            return reply

    def _answers(self) -> bool:
        raise NotImplementedError

    def queued(self, queues: list[str]) -> int:
        """Messages ready over ``queues``, by the server's own count."""
        raise NotImplementedError

    def stop(self) -> None:
        self.owned.stop()


class BeanstalkdServer(_PeerServer):
    name = "beanstalkd"
    binary = "beanstalkd"
    package = "beanstalkd"
    # async: the client in this module; sync: greenstalk
    clients: ClassVar[dict[str, str]] = {"async": "", "sync": "greenstalk"}
    version_flag = "-v"

    def __init__(self, mode: str, max_job_size: int = 65535) -> None:
        super().__init__(mode, BEANSTALKD_MODES[mode])
        self.max_job_size = max(max_job_size, 65535)

    def check(self, workload: Any) -> None:
        super().check(workload)
        if workload.delay_fraction and workload.delay_seconds != math.ceil(workload.delay_seconds):
            self.notes.append("beanstalkd delays are whole seconds: rounded up")
        if workload.client == "sync" and workload.batch > 1:
            self.notes.append("greenstalk does not pipeline: a batch is that many round trips")

    def _answers(self) -> bool:
        return self._ask(b"list-tubes\r\n", b"\r\n").startswith(b"OK ")

    def queued(self, queues: list[str]) -> int:
        total = 0
        for tube in queues:
            reply = self._ask(b"stats-tube %s\r\n" % tube.encode(), b"\n\r\n")
            for line in reply.decode().splitlines():
                if line.startswith("current-jobs-ready:"):
                    total += int(line.split(":")[1])
        return total

    def command(self, binary: str, directory: str) -> list[str]:
        command = [binary, "-l", "127.0.0.1", "-p", str(self.port), "-z", str(self.max_job_size)]
        if self.mode_key != "off":
            command += ["-b", directory]
        if self.mode_key == "fsync":
            command += ["-f", "0"]
        return command


class RedisServer(_PeerServer):
    name = "redis"
    binary = "redis-server"
    package = "redis-server"
    clients: ClassVar[dict[str, str]] = {"async": "redis", "sync": "redis"}

    def __init__(self, mode: str) -> None:
        super().__init__(mode, REDIS_MODES[mode])

    def check(self, workload: Any) -> None:
        if workload.priorities > 1:
            raise Unsupported("a Redis list has no priorities (--priorities)")
        if workload.delay_fraction:
            raise Unsupported("a Redis list has no delays (--delay-fraction)")
        if workload.queues > 1 and workload.workers < workload.queues:
            raise Unsupported("BLMOVE watches one list: needs --workers >= --queues")
        super().check(workload)

    def _answers(self) -> bool:
        return self._ask(b"PING\r\n", b"\r\n") == b"+PONG\r\n"  # not "-LOADING"

    def queued(self, queues: list[str]) -> int:
        total = 0
        for key in queues:
            command = b"*2\r\n$4\r\nLLEN\r\n$%d\r\n%s\r\n" % (len(key), key.encode())
            total += int(self._ask(command, b"\r\n")[1:])
        return total

    def command(self, binary: str, directory: str) -> list[str]:
        appendonly = "no" if self.mode_key == "off" else "yes"
        fsync = "everysec" if self.mode_key == "off" else self.mode_key
        return [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            appendonly,
            "--appendfsync",
            fsync,
            "--dir",
            directory,
            "--daemonize",
            "no",
        ]


PEERS: dict[str, dict[str, str]] = {
    "beanstalkd": BEANSTALKD_MODES,
    "redis": REDIS_MODES,
    "sluice": {mode: mode for mode in FSYNC_MODES},  # Sluice in another mode, same run
}


def parse_peers(spec: str, max_job_size: int) -> list[_PeerServer | SluiceServer]:
    """``beanstalkd,redis`` (every mode of each) or ``beanstalkd:off,redis:always``;
    ``sluice:MODE`` is Sluice again in another ``--fsync`` mode (``sluice:memory`` beside
    a durable run: the cost of durability, in one run). Raises ValueError naming the
    choices for an unknown peer or mode, or for a bare ``sluice``."""
    servers: list[_PeerServer | SluiceServer] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, mode = item.partition(":")
        if name not in PEERS:
            raise ValueError(f"unknown peer {name!r}: choose from {', '.join(PEERS)}")
        modes = PEERS[name]
        if (mode and mode not in modes) or (name == "sluice" and not mode):
            raise ValueError(f"unknown {name} mode {mode!r}: choose from {', '.join(modes)}")
        for each in [mode] if mode else list(modes):
            if name == "beanstalkd":
                servers.append(BeanstalkdServer(each, max_job_size))
            elif name == "sluice":
                servers.append(SluiceServer(each))
            else:
                servers.append(RedisServer(each))
    return servers


def _urgency(priority: int) -> int:
    """beanstalkd's priority for ours: lower is more urgent there, higher here."""
    return 2**31 - priority


def _changed_watch(watched: Sequence[str], tubes: Sequence[str]) -> tuple[list[str], list[str]]:
    """(tubes to watch, tubes to ignore after) to go from watching ``watched`` to ``tubes``:
    beanstalkd refuses to ignore the last tube watched, so every watch comes first."""
    return list(tubes), [tube for tube in watched if tube not in tubes]


class BeanstalkdConnection:
    """One beanstalkd connection over asyncio, speaking the text protocol directly.

    Commands are pipelined: a batch is written at once, and concurrent callers (open-loop
    puts) write without waiting for earlier replies."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.address = (endpoint.host, endpoint.port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.replies = asyncio.Lock()
        self.used = b"default"
        self.watched: tuple[str, ...] = ("default",)

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(*self.address)
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await self.writer.wait_closed()

    async def _exchange(self, commands: bytes, replies: int) -> list[tuple[bytes, bytes]]:
        """Send ``commands``; read ``replies`` replies as (status line, job body)."""
        assert self.reader is not None and self.writer is not None
        self.writer.write(commands)
        # beanstalkd answers in command order, and the lock is FIFO: taken right after the
        # write, it hands each caller its own replies even with several puts in flight.
        async with self.replies:
            return await self._read(replies)

    async def _read(self, replies: int) -> list[tuple[bytes, bytes]]:
        assert self.reader is not None
        answers = []
        for _ in range(replies):
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("beanstalkd closed the connection")
            words = line.split()
            body = b""
            if words[0] in (b"RESERVED", b"FOUND"):
                body = (await self.reader.readexactly(int(words[2]) + 2))[:-2]
            answers.append((line, body))
        return answers

    @staticmethod
    def _expect(answers: list[tuple[bytes, bytes]], *good: bytes) -> None:
        for line, _ in answers:
            if line.split()[0] not in good:
                raise RuntimeError(f"beanstalkd answered {line.decode(errors='replace')!r}")

    async def put(self, queue: str, bodies: list[bytes], priority: int, delay: float) -> None:
        tube = queue.encode()
        commands = [] if self.used == tube else [b"use %s\r\n" % tube]
        head = b"put %d %d %d " % (_urgency(priority), math.ceil(delay), BEANSTALKD_TTR)
        commands += [b"%s%d\r\n%s\r\n" % (head, len(body), body) for body in bodies]
        self.used = tube  # as of this write: beanstalkd applies commands in order
        answers = await self._exchange(b"".join(commands), len(commands))
        self._expect(answers, b"USING", b"INSERTED")

    async def reserve(
        self, queues: Sequence[str], max_messages: int, wait: float
    ) -> list[Delivery]:
        await self._watch(tuple(queues))
        first = await self._exchange(b"reserve-with-timeout %d\r\n" % math.ceil(wait), 1)
        if first[0][0].startswith(b"TIMED_OUT"):
            return []
        answers = first
        if max_messages > 1:
            more = b"reserve-with-timeout 0\r\n" * (max_messages - 1)
            answers += await self._exchange(more, max_messages - 1)
        self._expect(answers, b"RESERVED", b"TIMED_OUT")
        return [(body, line.split()[1]) for line, body in answers if line.startswith(b"RESERVED")]

    async def _watch(self, tubes: tuple[str, ...]) -> None:
        if self.watched == tubes:
            return
        watch, ignore = _changed_watch(self.watched, tubes)
        commands = [b"watch %s\r\n" % tube.encode() for tube in watch]
        commands += [b"ignore %s\r\n" % tube.encode() for tube in ignore]
        self._expect(await self._exchange(b"".join(commands), len(commands)), b"WATCHING")
        self.watched = tubes

    async def ack(self, handles: list[Any]) -> None:
        commands = b"".join(b"delete %s\r\n" % job_id for job_id in handles)
        self._expect(await self._exchange(commands, len(handles)), b"DELETED")


def _processing_list(queue: str) -> str:
    """The list a reserved item waits in until its ack removes it."""
    return f"{queue}:processing"


def _check_removed(removed: list[int], handles: list[Any]) -> None:
    if sum(removed) != len(handles):
        raise RuntimeError(f"LREM removed {sum(removed)} of {len(handles)} items")


class RedisConnection:
    """One redis.asyncio connection driving a reliable list queue."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.module: Any = importlib.import_module("redis.asyncio")
        self.endpoint = endpoint
        self.redis: Any = None

    async def open(self) -> None:
        self.redis = self.module.Redis(
            host=self.endpoint.host, port=self.endpoint.port, single_connection_client=True
        )
        await self.redis.ping()

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

    async def put(self, queue: str, bodies: list[bytes], priority: int, delay: float) -> None:
        await self.redis.lpush(queue, *bodies)

    async def reserve(
        self, queues: Sequence[str], max_messages: int, wait: float
    ) -> list[Delivery]:
        source, processing = queues[0], _processing_list(queues[0])
        first = await self.redis.blmove(source, processing, wait, "RIGHT", "LEFT")
        if first is None:
            return []
        items: list[bytes] = [first]
        if max_messages > 1:
            pipe = self.redis.pipeline(transaction=False)
            for _ in range(max_messages - 1):
                pipe.lmove(source, processing, "RIGHT", "LEFT")
            items += [item for item in await pipe.execute() if item is not None]
        return [(item, (processing, item)) for item in items]

    async def ack(self, handles: list[Any]) -> None:
        if len(handles) == 1:
            processing, item = handles[0]
            removed = [await self.redis.lrem(processing, 1, item)]
        else:
            pipe = self.redis.pipeline(transaction=False)
            for processing, item in handles:
                pipe.lrem(processing, 1, item)
            removed = await pipe.execute()
        _check_removed(removed, handles)


class GreenstalkConnection:
    """One beanstalkd connection through greenstalk, the usual blocking Python client. It
    sends a command and reads its reply before the next: a batch is that many round trips."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.module: Any = importlib.import_module("greenstalk")
        self.address = (endpoint.host, endpoint.port)
        self.client: Any = None
        self.used = "default"
        self.watched: tuple[str, ...] = ("default",)

    def open(self) -> None:
        self.client = self.module.Client(self.address, encoding=None)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()

    def put(self, queue: str, bodies: list[bytes], priority: int, delay: float) -> None:
        if self.used != queue:
            self.client.use(queue)
            self.used = queue
        for body in bodies:
            self.client.put(body, _urgency(priority), math.ceil(delay), BEANSTALKD_TTR)

    def reserve(self, queues: Sequence[str], max_messages: int, wait: float) -> list[Delivery]:
        self._watch(tuple(queues))
        jobs = []
        try:
            jobs.append(self.client.reserve(math.ceil(wait)))
            while len(jobs) < max_messages:
                jobs.append(self.client.reserve(0))
        except self.module.TimedOutError:
            pass
        return [(job.body, job.id) for job in jobs]

    def _watch(self, tubes: tuple[str, ...]) -> None:
        if self.watched == tubes:
            return
        watch, ignore = _changed_watch(self.watched, tubes)
        for tube in watch:
            self.client.watch(tube)
        for tube in ignore:
            self.client.ignore(tube)
        self.watched = tubes

    def ack(self, handles: list[Any]) -> None:
        for job_id in handles:
            self.client.delete(job_id)  # raises NotFoundError for a job it did not delete


class RedisBlockingConnection:
    """One blocking redis.Redis connection driving the same reliable list queue."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.module: Any = importlib.import_module("redis")
        self.endpoint = endpoint
        self.redis: Any = None

    def open(self) -> None:
        self.redis = self.module.Redis(
            host=self.endpoint.host, port=self.endpoint.port, single_connection_client=True
        )
        self.redis.ping()

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()

    def put(self, queue: str, bodies: list[bytes], priority: int, delay: float) -> None:
        self.redis.lpush(queue, *bodies)

    def reserve(self, queues: Sequence[str], max_messages: int, wait: float) -> list[Delivery]:
        source, processing = queues[0], _processing_list(queues[0])
        first = self.redis.blmove(source, processing, wait, "RIGHT", "LEFT")
        if first is None:
            return []
        items: list[bytes] = [first]
        if max_messages > 1:
            pipe = self.redis.pipeline(transaction=False)
            for _ in range(max_messages - 1):
                pipe.lmove(source, processing, "RIGHT", "LEFT")
            items += [item for item in pipe.execute() if item is not None]
        return [(item, (processing, item)) for item in items]

    def ack(self, handles: list[Any]) -> None:
        if len(handles) == 1:
            processing, item = handles[0]
            removed = [self.redis.lrem(processing, 1, item)]
        else:
            pipe = self.redis.pipeline(transaction=False)
            for processing, item in handles:
                pipe.lrem(processing, 1, item)
            removed = pipe.execute()
        _check_removed(removed, handles)
