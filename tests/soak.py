"""Soaks too long for ``make test``, run by ``make soak`` (the suite runs a short form).

    python -m tests.soak crash --rounds 1000 --fsync always [--seed S]
    python -m tests.soak fuzz --frames 1000000 [--seed S]
    python -m tests.soak storm --connections 5000
    python -m tests.soak clients
    python -m tests.soak all    (make soak: every one in turn, one table of figures)

``crash``, the crash campaign: one data dir for every round. Each round runs the
producers and consumers of ``tests/test_crash.py`` (puts with priorities and delays,
single and batch reserves, acks with results, nacks with and without a delay, touches,
buries, messages that die of their attempts) and kills the broker with SIGKILL at a random
moment. Some restarts are killed too, before the broker listens (during recovery). Every
restart is checked as ``test_crash`` checks it: every confirmed put is there with its body,
priority and headers, no confirmed ack is delivered again, leases held at the crash run
out at their deadlines, due times, dead letters with their reasons and the queue's
settings are kept, and ids and lease tokens are never handed out twice. Every
``SETTLE_EVERY`` rounds the queue is drained, every put accounted for, every delivery so
far checked (attempts rising, none after a confirmed ack, tokens and ids never reused: the
history grows by hundreds of deliveries a round, so this is not redone at every restart)
and the dead letters purged (so the backlog stays within one peek and the checks stay
small). A tenth of the
rounds are growth rounds: the brokers run with a 1 MiB first map (``--initial-map-size``),
a client puts ballast the map has no room for, and the kill comes the moment the broker
logs that it grows its map; when it lands before the growth is written, the restart's
recovery grows the map too, and is killed the same way. Prints a line per
``--progress-every`` rounds and a summary: rounds, operations confirmed, kills during
recovery, kills during map growth (those that landed before the broker logged the growth
written, of those tried), violations (the first stops the campaign, with its seed), and
recovery times (p50, p99, max) as the broker logged them.
Seeded: ``--seed`` replays the workload's choices (not the threads' timing).

``fuzz``: frames from ``tests/fuzz.py`` over many connections against one durable broker
(wrong types and values for every op and argument, random payloads, flipped bits, framing
that lies). It must not crash, log a traceback or answer ``INTERNAL``; its RSS must stay
within ``RSS_GROWTH_BOUND`` of where it started; and a witness's messages, put before,
must be unchanged after. Prints the frames sent, replies by error code, and RSS.

``storm``: that many connections at once, each saying hello and long-polling, while a
producer and two consumers put and ack their work through the same broker; then every
idle connection goes, and the broker's open file descriptors and RSS must come back near
where they started. The soft limit on open files is raised to the hard one first (the
broker inherits it).

``clients``: broken clients beside a working one: one that sends requests and never reads
its replies, ones that half-close after a few requests (they must get every reply), ones
that reset the connection in the middle of a frame. The working client's puts and acks
must go on, the broker's RSS must stay within ``CLIENTS_RSS_BOUND`` of its start, and it
must log no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import re
import resource
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import msgpack

from client import AsyncClient, Client
from protocol import NEED_DATA, FrameDecoder
from tests import test_crash as crash
from tests.conftest import REPO_ROOT, BrokerProcess, start_broker, stop_broker
from tests.fuzz import FrameSource, frame

SETTLE_EVERY = 10  # rounds between drains that account for every put
RECOVERY_KILL_CHANCE = 0.2  # of a restart being killed before it listens
RECOVERED = re.compile(r"recovered \d+ messages .* in ([0-9.]+) s")
# Map growth: brokers start with a 1 MiB map (at a restart, the map is the file's size),
# so a checkpoint that needs pages past the file's end grows it. In a growth round a
# client puts BALLAST (kept for good, so each one needs new pages) and the broker is
# killed the moment it logs GROWING; the kill landed during the growth if it did not log
# GROWN (the transaction that needed the room committed) first.
GROWTH_KILL_CHANCE = 0.1
INITIAL_MAP = ("--initial-map-size", "1M")
BALLAST_QUEUE = "crash.ballast"
BALLAST = [bytes(60_000)] * 4
GROWTH_WAIT = 1.5  # seconds a growth round waits for the broker to grow its map
GROWING = "growing the store's map"
GROWN = "what needed the room is written"


@dataclass
class Summary:
    rounds: int = 0
    confirmed: int = 0  # puts, acks, nacks, buries and touches the broker confirmed
    recovery_kills: int = 0  # restarts killed before they listened
    recovery_kill_tries: int = 0
    growth_kills: int = 0  # kills that landed while the LMDB map was growing
    growth_kill_tries: int = 0
    violations: list[str] = field(default_factory=list)
    recoveries: list[float] = field(default_factory=list)  # seconds, as the broker logged

    def lines(self) -> list[str]:
        recoveries = sorted(self.recoveries) or [0.0]
        p99 = recoveries[min(len(recoveries) - 1, int(len(recoveries) * 0.99))]
        return [
            f"rounds               {self.rounds}",
            f"operations confirmed {self.confirmed}",
            f"kills during recovery {self.recovery_kills} (of {self.recovery_kill_tries} tried)",
            f"kills during map growth {self.growth_kills} (of {self.growth_kill_tries} tried)",
            f"violations           {len(self.violations)}",
            f"recovery p50         {statistics.median(recoveries) * 1000:.1f} ms",
            f"recovery p99         {p99 * 1000:.1f} ms",
            f"recovery max         {recoveries[-1] * 1000:.1f} ms",
        ]


def purge_dead_letters(client: Client, ledger: crash.Ledger) -> None:
    """Once accounted for, dead letters go, so the checks of each restart stay small."""
    dead = {item["id"] for item in crash.all_dead_letters(client)}
    assert client.purge_dead(crash.QUEUE) == len(dead)
    ledger.gone.update(dead)
    ledger.purged.update(dead)
    ledger.dead_seen = {}


def confirmed_operations(ledger: crash.Ledger) -> int:
    """What the broker confirmed: puts, and settles and touches that came back done."""
    settles = sum(
        1 for settle in ledger.settles.values() if settle.outcome not in ("unknown", "lost")
    )
    touches = sum(1 for deadline in ledger.touched.values() if deadline is not None)
    return len(ledger.body_of) + settles + touches


def recovery_seconds(broker: BrokerProcess) -> float | None:
    found = RECOVERED.search(broker.log())
    return float(found.group(1)) if found else None


def spawn_broker(data_dir: Path, fsync: str, log_path: Path) -> subprocess.Popen[bytes]:
    """A broker on ``data_dir``, its stdout a pipe (readable once it listens)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    command = [sys.executable, "-m", "broker", "--port", "0", "--http-port", "0"]
    command += ["--data-dir", str(data_dir), "--fsync", fsync, *INITIAL_MAP]
    with log_path.open("w") as log_file:
        return subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
        )


def kill(process: subprocess.Popen[bytes]) -> bool:
    """SIGKILL ``process``; True if it had not yet said it listens."""
    assert process.stdout is not None
    listening = bool(select.select([process.stdout], [], [], 0)[0])
    process.kill()
    process.wait()
    process.stdout.close()
    return not listening


def kill_while_recovering(data_dir: Path, fsync: str, log_path: Path, wait: float) -> bool:
    """Start a broker on ``data_dir``, SIGKILL it after ``wait`` seconds; True if it had
    not yet said it listens (it died starting or recovering)."""
    process = spawn_broker(data_dir, fsync, log_path)
    time.sleep(wait)
    return kill(process)


def kill_while_recovery_grows(data_dir: Path, fsync: str, log_path: Path) -> bool:
    """Start a broker on ``data_dir`` whose log holds ballast its map has no room for,
    SIGKILL it the moment it logs that it grows the map while recovering; True if that
    growth had not been written yet."""
    process = spawn_broker(data_dir, fsync, log_path)
    assert process.stdout is not None
    deadline = time.monotonic() + GROWTH_WAIT
    with log_path.open(errors="replace") as log:
        seen = ""
        while time.monotonic() < deadline and GROWING not in seen:
            if select.select([process.stdout], [], [], 0.001)[0]:
                break  # listening: recovery is over
            seen = seen[-len(GROWING) :] + log.read()
    recovering = kill(process)
    return recovering and killed_while_growing(log_path.read_text(errors="replace"))


def grow_the_map(broker: BrokerProcess) -> None:
    """Put ballast, then return the moment the broker logs that it grows its map (or after
    ``GROWTH_WAIT`` seconds without it)."""
    with broker.log_path.open(errors="replace") as log:
        log.seek(0, os.SEEK_END)  # a growth while recovering is not this one
        with broker.client() as client:
            client.put_many(BALLAST_QUEUE, BALLAST)
        deadline = time.monotonic() + GROWTH_WAIT
        seen = ""
        while time.monotonic() < deadline:
            seen = seen[-len(GROWING) :] + log.read()
            if GROWING in seen:
                return
            time.sleep(0.001)


def killed_while_growing(log: str) -> bool:
    """True if the killed broker's last map growth (in its ``log``) had not been written."""
    growing = log.rfind(GROWING)
    return growing >= 0 and GROWN not in log[growing:]


def run_campaign(
    rounds: int,
    fsync: str,
    seed: int,
    workdir: Path,
    progress: Callable[[str], None] = print,
    progress_every: int = 50,
    recovery_kill_chance: float = RECOVERY_KILL_CHANCE,
    settle_every: int = SETTLE_EVERY,
    growth_kill_chance: float = GROWTH_KILL_CHANCE,
) -> Summary:
    """The crash campaign; returns its summary (violations listed, not raised)."""
    rng = random.Random(seed)
    ledger = crash.Ledger()
    summary = Summary()
    data_dir = workdir / "data"
    started: list[BrokerProcess] = []
    startup = 0.5  # seconds a start takes, measured: where a recovery kill may land
    recovery_grows = False  # the next start's recovery is to grow the map

    def start(epoch: int) -> BrokerProcess:
        nonlocal startup, recovery_grows
        log_path = workdir / f"broker-{epoch % 2}.log"  # two logs, rewritten in turn
        if recovery_grows:
            summary.growth_kill_tries += 1
            summary.growth_kills += kill_while_recovery_grows(data_dir, fsync, log_path)
        elif epoch and rng.random() < recovery_kill_chance:
            summary.recovery_kill_tries += 1
            wait = rng.uniform(0.0, startup)
            if kill_while_recovering(data_dir, fsync, log_path, wait):
                summary.recovery_kills += 1
        began = time.monotonic()
        broker = start_broker(log_path, "--data-dir", str(data_dir), "--fsync", fsync, *INITIAL_MAP)
        recovery_grows = False
        startup = time.monotonic() - began
        started.append(broker)
        seconds = recovery_seconds(broker)
        if seconds is not None:
            summary.recoveries.append(seconds)
        return broker

    try:
        broker = start(0)
        with broker.client() as client:
            ledger.settings = client.configure(crash.QUEUE, **crash.SETTINGS)
        for number in range(1, rounds + 1):
            growth_round = rng.random() < growth_kill_chance
            moment = partial(grow_the_map, broker) if growth_round else None
            killed_at = crash.run_round(broker, ledger, rng, moment)
            if growth_round:
                summary.growth_kill_tries += 1
                grew = killed_while_growing(broker.log())
                summary.growth_kills += grew
                recovery_grows = grew  # the restart applies the log: it grows the map too
            # The whole history (every delivery so far) is checked at each settle, below.
            broker = crash.restart_and_check(start, ledger, killed_at, history=False)
            if number % settle_every == 0 or number == rounds:
                with broker.client() as client:
                    crash.drain(client, ledger)
                    crash.cancel_delayed(client, ledger)
                    crash.account_for_every_put(client, ledger)
                    purge_dead_letters(client, ledger)
            summary.rounds = number
            summary.confirmed = confirmed_operations(ledger)
            if number % progress_every == 0:
                progress(f"round {number}/{rounds}: {summary.confirmed} operations confirmed")
    except AssertionError as error:
        summary.violations.append(f"{error} [fsync={fsync} seed={seed} round {summary.rounds + 1}]")
    finally:
        for broker in started:
            if broker.process.poll() is None:
                broker.process.kill()
                broker.process.wait()
    return summary


# ------------------------------------------------------------------------ fuzz

WITNESS = "fuzz.witness"
WITNESS_MESSAGES = 100
BURNT_IDS = 1000  # ids used up first, so the witness's are above every small integer
FRAMES_PER_CONNECTION = 200
FUZZ_THREADS = 4
RSS_GROWTH_BOUND = 128 * 1024 * 1024
READ_TIMEOUT = 30.0


@dataclass
class FuzzSummary:
    frames: int = 0
    connections: int = 0
    replies: int = 0
    codes: dict[str, int] = field(default_factory=dict)  # error replies by code
    rss_before: int = 0
    rss_after: int = 0
    violations: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        codes = ", ".join(f"{code} {count}" for code, count in sorted(self.codes.items()))
        return [
            f"frames sent          {self.frames} over {self.connections} connections",
            f"replies              {self.replies} (errors: {codes or 'none'})",
            f"broker RSS           {self.rss_before / 2**20:.1f} -> "
            f"{self.rss_after / 2**20:.1f} MiB",
            f"violations           {len(self.violations)}",
        ]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def fuzz_connection(host: str, port: int, blob: bytes, summary: FuzzSummary) -> None:
    """Send one connection's frames, half-close, and read every reply until the broker
    closes; note the replies' error codes."""
    decoder = FrameDecoder(2**31)
    with socket.create_connection((host, port), timeout=READ_TIMEOUT) as sock:
        try:
            sock.sendall(blob)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the broker closed first (a framing error): read what it said
        replies, codes = 0, dict[str, int]()
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            decoder.feed(chunk)
            while (reply := decoder.next_frame()) is not NEED_DATA:
                replies += 1
                if isinstance(reply, list) and len(reply) == 3 and reply[1] is False:
                    code = str(reply[2].get("code")) if isinstance(reply[2], dict) else "?"
                    codes[code] = codes.get(code, 0) + 1
    with LOCK:
        summary.replies += replies
        for code, count in codes.items():
            summary.codes[code] = summary.codes.get(code, 0) + count


LOCK = threading.Lock()


def run_fuzz(
    frames: int,
    seed: int,
    workdir: Path,
    progress: Callable[[str], None] = print,
    progress_every: int = 100_000,
) -> FuzzSummary:
    summary = FuzzSummary()
    broker = start_broker(workdir / "fuzz.log")
    try:
        with broker.client() as client:
            client.put_many("fuzz.burn", [b"."] * BURNT_IDS)
            client.purge("fuzz.burn")
            bodies = [f"witness {n}".encode() for n in range(WITNESS_MESSAGES)]
            ids = client.put_many(WITNESS, bodies)
        summary.rss_before = rss_bytes(broker.process.pid)
        per_thread = frames // FUZZ_THREADS

        def fuzz_thread(index: int) -> None:
            source = FrameSource(seed + index, frozenset(ids))
            sent = 0
            while sent < per_thread:
                blob, count = source.connection(min(FRAMES_PER_CONNECTION, per_thread - sent))
                fuzz_connection(broker.host, broker.port, blob, summary)
                sent += count
                with LOCK:
                    before = summary.frames
                    summary.frames += count
                    summary.connections += 1
                    if summary.frames // progress_every > before // progress_every:
                        progress(f"{summary.frames} frames sent")

        threads = [threading.Thread(target=fuzz_thread, args=(i,)) for i in range(FUZZ_THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        check_after_fuzz(broker, summary, bodies)
    finally:
        if broker.process.poll() is None:
            summary.rss_after = summary.rss_after or rss_bytes(broker.process.pid)
            stop_broker(broker)
    return summary


def check_after_fuzz(broker: BrokerProcess, summary: FuzzSummary, bodies: list[bytes]) -> None:
    if broker.process.poll() is not None:
        summary.violations.append(f"the broker exited with {broker.process.returncode}")
        return
    summary.rss_after = rss_bytes(broker.process.pid)
    if summary.codes.get("INTERNAL"):
        summary.violations.append(f"{summary.codes['INTERNAL']} INTERNAL errors")
    log = broker.log()
    if "Traceback" in log or "internal error" in log:
        summary.violations.append(f"the broker logged an error:\n{log[-3000:]}")
    if summary.rss_after > summary.rss_before + RSS_GROWTH_BOUND:
        summary.violations.append("the broker's RSS grew by more than the bound")
    with broker.client() as client:
        kept = [item["body"] for item in client.peek(WITNESS, limit=1000)]
        if kept != bodies or client.stats(WITNESS)["ready"] != len(bodies):
            summary.violations.append(f"the witness's messages changed: {kept[:5]}...")


# ----------------------------------------------------------------------- storm

STORM_WORK = 2000  # messages the producer puts while the storm waits
FD_SLACK = 20  # descriptors the broker may keep above its start once the storm is gone
STORM_RSS_SLACK = 64 * 1024 * 1024


@dataclass
class StormSummary:
    connections: int = 0
    work_seconds: float = 0.0
    fds: tuple[int, int, int] = (0, 0, 0)  # before, during, after
    rss: tuple[int, int, int] = (0, 0, 0)
    violations: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        mib = [f"{value / 2**20:.1f}" for value in self.rss]
        return [
            f"idle connections     {self.connections} (each hello + a long-poll)",
            f"work through them    {STORM_WORK} put and acked in {self.work_seconds:.2f} s",
            f"broker fds           {self.fds[0]} -> {self.fds[1]} -> {self.fds[2]}",
            f"broker RSS           {mib[0]} -> {mib[1]} -> {mib[2]} MiB",
            f"violations           {len(self.violations)}",
        ]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raise_file_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def idle_connection(host: str, port: int) -> asyncio.StreamWriter:
    """Connect, say hello, and leave a long-poll waiting; returns the writer to close."""
    reader, writer = await asyncio.open_connection(host, port)
    hello = msgpack_frame([1, "hello", {"version": 1, "client": "storm"}])
    wait = msgpack_frame([2, "reserve", {"queues": ["storm.idle"], "wait": 600}])
    writer.write(hello + wait)
    await writer.drain()
    decoder = FrameDecoder(2**20)
    while (reply := decoder.next_frame()) is NEED_DATA:
        decoder.feed(await reader.read(4096))
    assert reply[1] is True, f"hello failed: {reply}"
    return writer


def msgpack_frame(value: object) -> bytes:
    return frame(msgpack.packb(value))


async def storm_work(broker: BrokerProcess) -> float:
    """A producer and two consumers through the stormed broker; returns their seconds."""
    began = time.monotonic()
    async with AsyncClient(broker.host, broker.port) as producer:
        await producer.put_many("storm.work", [b"job"] * STORM_WORK)

    async def consume() -> int:
        done = 0
        async with AsyncClient(broker.host, broker.port) as consumer:
            while True:
                messages = await consumer.reserve("storm.work", max_messages=50, wait=0.5)
                if not messages:
                    return done
                done += await consumer.ack(messages)

    counts = await asyncio.gather(consume(), consume())
    assert sum(counts) == STORM_WORK, f"{sum(counts)} of {STORM_WORK} acked"
    return time.monotonic() - began


async def storm(broker: BrokerProcess, connections: int, summary: StormSummary) -> None:
    pid = broker.process.pid
    writers: list[asyncio.StreamWriter] = []
    for start in range(0, connections, 500):  # in waves, not one SYN flood
        batch = range(start, min(start + 500, connections))
        writers += await asyncio.gather(*(idle_connection(broker.host, broker.port) for _ in batch))
    summary.connections = len(writers)
    summary.work_seconds = await storm_work(broker)
    during = (open_fds(pid), rss_bytes(pid))
    for writer in writers:
        writer.close()
    await asyncio.gather(*(writer.wait_closed() for writer in writers), return_exceptions=True)
    deadline = time.monotonic() + 10
    while open_fds(pid) > summary.fds[0] + 2 and time.monotonic() < deadline:  # closing
        await asyncio.sleep(0.05)
    summary.fds = (summary.fds[0], during[0], open_fds(pid))
    summary.rss = (summary.rss[0], during[1], rss_bytes(pid))


def run_storm(connections: int, workdir: Path) -> StormSummary:
    summary = StormSummary()
    limit = raise_file_limit()
    if connections + 200 > limit:
        summary.violations.append(f"{connections} connections need more than {limit} fds")
        return summary
    broker = start_broker(workdir / "storm.log")
    try:
        pid = broker.process.pid
        summary.fds = (open_fds(pid), 0, 0)
        summary.rss = (rss_bytes(pid), 0, 0)
        asyncio.run(storm(broker, connections, summary))
        if summary.fds[2] > summary.fds[0] + FD_SLACK:
            summary.violations.append(f"the broker kept {summary.fds[2]} fds open")
        if summary.rss[2] > summary.rss[0] + STORM_RSS_SLACK:
            summary.violations.append("the broker's RSS did not come back near its start")
        if "Traceback" in broker.log():
            summary.violations.append(f"the broker logged a traceback:\n{broker.log()[-3000:]}")
    except AssertionError as error:
        summary.violations.append(str(error))
    finally:
        stop_broker(broker)
    return summary


# ---------------------------------------------------------------------- clients

CLIENTS_RSS_BOUND = 64 * 1024 * 1024
NEVER_READ_BYTES = 64 * 1024 * 1024  # what the non-reader tries to send
HALF_CLOSERS = 50
RESETTERS = 200
WORK_ROUNDS = 200  # put + reserve + ack rounds the working client must get through


@dataclass
class ClientsSummary:
    sent_unread: int = 0  # bytes the non-reader got into the broker before it stopped reading
    half_close_replies: int = 0
    resets: int = 0
    work_done: int = 0
    rss: tuple[int, int] = (0, 0)  # before, with the non-reader still connected
    violations: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [
            f"never reads           sent {self.sent_unread / 2**20:.1f} MiB of requests "
            "before the broker stopped reading them",
            f"half-closers          {HALF_CLOSERS}, {self.half_close_replies} replies read",
            f"resets mid-frame      {self.resets}",
            f"working client        {self.work_done} of {WORK_ROUNDS} put/reserve/ack rounds",
            f"broker RSS            {self.rss[0] / 2**20:.1f} -> {self.rss[1] / 2**20:.1f} MiB",
            f"violations            {len(self.violations)}",
        ]


def never_reads(broker: BrokerProcess) -> tuple[socket.socket, int]:
    """A connection that pipelines pings and never reads a reply; returns it (still open)
    and how many bytes it got out before the broker stopped taking them."""
    sock = socket.create_connection((broker.host, broker.port))
    sock.sendall(msgpack_frame([1, "hello", {"version": 1}]))
    ping = b"".join(msgpack_frame([n, "ping", {}]) for n in range(2, 2 + 1000))
    sock.settimeout(2.0)
    sent = 0
    try:
        while sent < NEVER_READ_BYTES:
            sent += sock.send(ping)
    except (TimeoutError, BlockingIOError):
        pass  # the broker paused reading: this client's replies are not being read
    return sock, sent


def half_closes(broker: BrokerProcess) -> int:
    """Three pings, then a half-close: every reply must still come, then EOF."""
    with socket.create_connection((broker.host, broker.port), timeout=10) as sock:
        frames = [msgpack_frame([1, "hello", {"version": 1}])]
        frames += [msgpack_frame([n, "ping", {}]) for n in (2, 3, 4)]
        sock.sendall(b"".join(frames))
        sock.shutdown(socket.SHUT_WR)
        decoder, replies = FrameDecoder(2**20), 0
        while chunk := sock.recv(65536):
            decoder.feed(chunk)
            while decoder.next_frame() is not NEED_DATA:
                replies += 1
        return replies


def resets_mid_frame(broker: BrokerProcess) -> None:
    sock = socket.create_connection((broker.host, broker.port), timeout=10)
    sock.sendall(msgpack_frame([1, "hello", {"version": 1}]) + frame(b"\x93\x02\xa3put" * 4)[:9])
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # linger 0: a reset, not a close


def run_clients(workdir: Path) -> ClientsSummary:
    summary = ClientsSummary()
    broker = start_broker(workdir / "clients.log")
    try:
        pid = broker.process.pid
        summary.rss = (rss_bytes(pid), 0)
        unread, summary.sent_unread = never_reads(broker)
        with unread, broker.client() as client:
            for round_number in range(WORK_ROUNDS):
                if round_number % 4 == 0:
                    summary.half_close_replies += half_closes(broker)
                resets_mid_frame(broker)
                summary.resets += 1
                client.put("clients.work", b"job")
                [message] = client.reserve("clients.work", wait=5)
                client.ack(message)
                summary.work_done += 1
            summary.rss = (summary.rss[0], rss_bytes(pid))
        if summary.half_close_replies != (WORK_ROUNDS // 4) * 4:
            summary.violations.append(f"half-closers got {summary.half_close_replies} replies")
        if summary.rss[1] > summary.rss[0] + CLIENTS_RSS_BOUND:
            summary.violations.append("the broker's RSS grew past the bound")
        if "Traceback" in broker.log():
            summary.violations.append(f"the broker logged a traceback:\n{broker.log()[-3000:]}")
    except (AssertionError, OSError, ValueError) as error:
        summary.violations.append(f"{type(error).__name__}: {error}")
    finally:
        stop_broker(broker)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    with tempfile.TemporaryDirectory(prefix="sluice-soak-") as workdir:
        runs = RUNS[args.command](args, seed, Path(workdir))
        return report(runs, seed)


Run = tuple[str, "Summary | FuzzSummary | StormSummary | ClientsSummary"]


def crash_runs(args: argparse.Namespace, seed: int, workdir: Path) -> list[Run]:
    """One campaign per fsync mode, side by side in processes of their own (a round is
    mostly waiting: for the kill's moment, a start, leases to run out), each on its own
    data dir with the same seed."""
    modes = [args.fsync] if args.fsync else ["always", "interval"]
    for mode in modes:
        print(f"crash campaign: {args.rounds} rounds, fsync {mode}, seed {seed}", flush=True)
        (workdir / f"crash-{mode}").mkdir()
    if len(modes) == 1:
        summaries = [campaign_of(args.rounds, modes[0], seed, workdir, args.progress_every)]
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(len(modes), mp_context=context) as pool:
            futures = [
                pool.submit(campaign_of, args.rounds, mode, seed, workdir, args.progress_every)
                for mode in modes
            ]
            summaries = [future.result() for future in futures]
    return [(f"crash, fsync {mode}", s) for mode, s in zip(modes, summaries, strict=True)]


def campaign_of(rounds: int, mode: str, seed: int, workdir: Path, progress_every: int) -> Summary:
    """One mode's campaign in ``workdir/crash-<mode>``, its progress lines tagged."""
    progress = partial(_tagged_progress, f"[fsync {mode}] ")
    return run_campaign(rounds, mode, seed, workdir / f"crash-{mode}", progress, progress_every)


def _tagged_progress(tag: str, line: str) -> None:
    print(tag + line, flush=True)


def fuzz_runs(args: argparse.Namespace, seed: int, workdir: Path) -> list[Run]:
    print(f"fuzz: {args.frames} frames, seed {seed}", flush=True)
    return [("fuzz", run_fuzz(args.frames, seed, workdir, _progress))]


def storm_runs(args: argparse.Namespace, seed: int, workdir: Path) -> list[Run]:
    print(f"storm: {args.connections} connections", flush=True)
    return [("storm", run_storm(args.connections, workdir))]


def clients_runs(args: argparse.Namespace, seed: int, workdir: Path) -> list[Run]:
    print("clients: one that never reads, half-closers, resets mid-frame", flush=True)
    return [("broken clients", run_clients(workdir))]


def all_runs(args: argparse.Namespace, seed: int, workdir: Path) -> list[Run]:
    runs = []
    makers = (("crash", crash_runs), ("fuzz", fuzz_runs), ("storm", storm_runs))
    for name, make in (*makers, ("clients", clients_runs)):
        where = workdir / name
        where.mkdir()
        runs += make(args, seed, where)
    return runs


RUNS: dict[str, Any] = {
    "crash": crash_runs,
    "fuzz": fuzz_runs,
    "storm": storm_runs,
    "clients": clients_runs,
    "all": all_runs,
}


def _progress(line: str) -> None:
    print(line, flush=True)


def report(runs: list[Run], seed: int) -> int:
    """One table of every run's figures, then the violations; 1 if there are any."""
    print(f"\nsoak results (seed {seed})")
    for name, summary in runs:
        print(f"-- {name}")
        for line in summary.lines():
            print(f"   {line}")
    violations = [(name, v) for name, summary in runs for v in summary.violations]
    for name, violation in violations:
        print(f"violation ({name}): {violation}")
    return 1 if violations else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.soak",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    crash_cmd = commands.add_parser(
        "crash",
        help="kill -9 the broker under load, round after round, on one data dir",
        description="Kill -9 the broker at random moments under load, on one data dir, "
        "and check after every restart that nothing it confirmed was lost or done twice.",
    )
    fuzz_cmd = commands.add_parser(
        "fuzz",
        help="throw malformed and hostile frames at a broker over many connections",
        description="Send FRAMES fuzzed frames (wrong types and values for every op, random "
        "bytes, flipped bits, lying lengths) and check that the broker neither crashes nor "
        "answers INTERNAL, its RSS stays bounded and a witness's messages are unchanged.",
    )
    storm_cmd = commands.add_parser(
        "storm",
        help="many idle long-polling connections at once, and real work through them",
        description="Open CONNECTIONS connections that each say hello and long-poll, put "
        "and ack work through the same broker, close them, and check the broker's file "
        "descriptors and RSS come back near their start.",
    )
    clients_cmd = commands.add_parser(
        "clients",
        help="a client that never reads, half-closers and resets beside a working one",
        description="Broken clients beside a working one: the work goes on, memory stays "
        "bounded, nothing is logged as a traceback.",
    )
    all_cmd = commands.add_parser(
        "all",
        help="every soak in turn (make soak), one table of figures at the end",
        description="The crash campaign in both fsync modes, the fuzz and the storm.",
    )
    for command in (crash_cmd, all_cmd):
        command.add_argument("--rounds", type=int, default=1000, help="kills (default 1000)")
        command.add_argument("--progress-every", type=int, default=50, metavar="N")
    crash_cmd.add_argument(
        "--fsync", choices=["always", "interval"], help="one mode (default: both, in turn)"
    )
    all_cmd.set_defaults(fsync=None)
    for command in (fuzz_cmd, all_cmd):
        command.add_argument("--frames", type=int, default=1_000_000, help="(default 1,000,000)")
    for command in (storm_cmd, all_cmd):
        command.add_argument("--connections", type=int, default=5000, help="(default 5,000)")
    for command in (crash_cmd, fuzz_cmd, storm_cmd, clients_cmd, all_cmd):
        command.add_argument("--seed", type=int, help="replay a run's choices")
    return parser


if __name__ == "__main__":
    sys.exit(main())
