"""What each client's own code does per call, counted in instructions: Sluice's two
clients beside the bench's clients of its peers, each call over a real socket to a real
server, one call at a time as the bench's closed loop makes them.

    python -m bench.client_instructions [--calls N] [--client async|sync|both]
                                        [--shape put|work|both]
                                        [--against beanstalkd,redis | none]

The side-by-side bench's ``client µs/job`` is the CPU time of the load processes, and on
a shared machine that moves with the server: a client that waits longer for each reply
sleeps and wakes more often, and each wake costs it time its own code did not ask for.
This counts the code's work instead: the user-space instructions of a client process
(valgrind's callgrind), the difference between a run of N calls and one of 3N, so that
start-up, imports and connecting cancel out. Two shapes: a producer's put of one
100-byte message, and a worker's reserve of one message and its ack (the queue filled
beforehand, by the same count in both runs). Each server runs in memory (beanstalkd
binlog off, redis AOF off), started here on a free port and stopped at the end.

Needs valgrind (apt-get install valgrind). Each measurement is two runs of a client under
it, several seconds each: a line is printed as each one is done (both forms against
beanstalkd and redis at the default N: about six minutes).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import uvloop

from ._load import connection_for
from ._peers import BeanstalkdServer, RedisServer
from ._servers import Endpoint, Unsupported
from ._sluice import SluiceServer

SHAPES = {"put": "put of one message", "work": "reserve of one message, and its ack"}
FORMS = ("async", "sync")
PEER_SERVERS: dict[str, Callable[[], Any]] = {
    "beanstalkd": lambda: BeanstalkdServer("off"),
    "redis": lambda: RedisServer("off"),
}
BODY = b"x" * 100
WARM_UP = 200  # calls before counting starts: caches, lazy imports, the first allocations
FILL_BATCH = 500  # messages per put when filling the queue for the work shape
_COLLECTED = re.compile(r"Collected : (\d+)")


def instructions_per_call(short: int, long: int, calls: int) -> float:
    """The instructions one call costs, from a run of ``calls`` calls (``short``
    instructions in all) and one of ``3 * calls`` (``long``): what the 2N extra calls
    added, per call. ValueError if the longer run counted fewer (a broken measurement)."""
    if long <= short:
        raise ValueError(
            f"the run of {3 * calls} calls counted {long:,} instructions, "
            f"not more than the run of {calls} ({short:,})"
        )
    return (long - short) / (2 * calls)


def collected(valgrind_stderr: str) -> int:
    """The total instructions callgrind reports at the end of a run."""
    found = _COLLECTED.findall(valgrind_stderr)
    if not found:
        raise RuntimeError(
            f"callgrind reported no total; its output ends:\n{valgrind_stderr[-2000:]}"
        )
    return sum(int(count) for count in found)


# The client side: one process, one connection, N calls ----------------------------------


def run_client(kind: str, form: str, shape: str, port: int, calls: int, fill: int) -> float:
    """Make ``calls`` calls of ``shape`` with the bench's ``form`` connection to the
    ``kind`` server on ``port``, after filling its queue with ``fill`` messages and the
    warm-up; returns the process's user CPU seconds for the counted calls."""
    endpoint = Endpoint(kind, "127.0.0.1", port)
    queue = f"instructions-{os.getpid()}"
    if form == "sync":
        return _run_sync(connection_for(endpoint, blocking=True), shape, queue, calls, fill)
    return uvloop.run(
        _run_async(connection_for(endpoint, blocking=False), shape, queue, calls, fill)
    )


def _run_sync(connection: Any, shape: str, queue: str, calls: int, fill: int) -> float:
    connection.open()
    try:
        for start in range(0, fill, FILL_BATCH):
            connection.put(queue, [BODY] * min(FILL_BATCH, fill - start), 0, 0)

        def put() -> None:
            connection.put(queue, [BODY], 0, 0)

        def work() -> None:
            deliveries = connection.reserve([queue], 1, 1.0)
            if len(deliveries) != 1:
                raise RuntimeError(f"reserve returned {len(deliveries)} messages, not 1")
            connection.ack([handle for _, handle in deliveries])

        call = put if shape == "put" else work
        for _ in range(WARM_UP):
            call()
        started = time.process_time()
        for _ in range(calls):
            call()
        return time.process_time() - started
    finally:
        connection.close()


async def _run_async(connection: Any, shape: str, queue: str, calls: int, fill: int) -> float:
    await connection.open()
    try:
        for start in range(0, fill, FILL_BATCH):
            await connection.put(queue, [BODY] * min(FILL_BATCH, fill - start), 0, 0)

        async def put() -> None:
            await connection.put(queue, [BODY], 0, 0)

        async def work() -> None:
            deliveries = await connection.reserve([queue], 1, 1.0)
            if len(deliveries) != 1:
                raise RuntimeError(f"reserve returned {len(deliveries)} messages, not 1")
            await connection.ack([handle for _, handle in deliveries])

        call = put if shape == "put" else work
        for _ in range(WARM_UP):
            await call()
        started = time.process_time()
        for _ in range(calls):
            await call()
        return time.process_time() - started
    finally:
        await connection.close()


# The parent: servers, and each client under callgrind -----------------------------------


def count(kind: str, form: str, shape: str, port: int, calls: int) -> float:
    """Instructions per call of one client and shape: two runs under callgrind."""
    totals = []
    # Both runs fill the queue alike, for the longer run's calls: the fill cancels out.
    fill = 3 * calls + WARM_UP if shape == "work" else 0
    for run_calls in (calls, 3 * calls):
        command = [
            "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
            sys.executable, "-m", "bench.client_instructions",
            "--child", kind, form, shape, str(port), str(run_calls), str(fill),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"{kind} {form} {shape} failed under valgrind:\n{done.stderr[-2000:]}"
            )
        totals.append(collected(done.stderr))
    return instructions_per_call(totals[0], totals[1], calls)


@contextmanager
def running(servers: dict[str, Any]) -> Iterator[dict[str, int]]:
    """Start each server; yield its port by name; stop them all."""
    with ExitStack() as stack:
        ports = {}
        for name, server in servers.items():
            server.start()
            stack.callback(server.stop)
            ports[name] = server.endpoint().port
        yield ports


def peers_of(spec: str) -> list[str]:
    """``beanstalkd,redis`` or ``none``; SystemExit naming the choices otherwise."""
    if spec == "none":
        return []
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in PEER_SERVERS]
    if unknown or not names:
        raise SystemExit(
            f"--against: unknown peer {unknown[0] if unknown else spec!r}: "
            f"choose from {', '.join(PEER_SERVERS)}, or none"
        )
    return names


def _child_args(
    parser: argparse.ArgumentParser, words: list[str]
) -> tuple[str, str, str, int, int, int]:
    """``--child KIND FORM SHAPE PORT CALLS FILL``, checked (the parent makes it, but a
    hand-typed one gets a usage error, not a traceback)."""
    kind, form, shape, *numbers = words
    if kind not in ("sluice", *PEER_SERVERS):
        parser.error(f"--child: unknown server {kind!r}: sluice, {', '.join(PEER_SERVERS)}")
    if form not in FORMS or shape not in SHAPES:
        parser.error(f"--child: the form is one of {FORMS}, the shape one of {tuple(SHAPES)}")
    try:
        port, calls, fill = (int(number) for number in numbers)
    except ValueError:
        parser.error(f"--child: PORT, CALLS and FILL are whole numbers, got {numbers}")
    if not 0 < port < 65536 or calls < 1 or fill < 0:
        parser.error("--child: PORT is 1-65535, CALLS at least 1, FILL at least 0")
    return kind, form, shape, port, calls, fill


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--calls", type=int, default=1000, help="N: each count is a run of N and one of 3N"
    )
    parser.add_argument(
        "--client", choices=(*FORMS, "both"), default="both", help="client forms (default both)"
    )
    parser.add_argument(
        "--shape", choices=(*SHAPES, "both"), default="both", help="call shapes (default both)"
    )
    parser.add_argument(
        "--against",
        default="beanstalkd",
        help="peers beside Sluice: beanstalkd, redis or both comma-separated, or none "
        "(default beanstalkd)",
    )
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)  # one client run
    args = parser.parse_args()
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    if args.child:
        kind, form, shape, port, calls, fill = _child_args(parser, args.child)
        user = run_client(kind, form, shape, port, calls, fill)
        print(f"{kind} {form} {shape}: {user / calls * 1e6:.1f} µs user CPU per call")
        return
    peers = peers_of(args.against)
    if shutil.which("valgrind") is None:
        raise SystemExit("this counts instructions with valgrind: apt-get install valgrind")
    servers: dict[str, Any] = {"sluice": SluiceServer("memory")}
    for name in peers:
        servers[name] = PEER_SERVERS[name]()
    forms = FORMS if args.client == "both" else (args.client,)
    print(f"user-space instructions per call, the difference of {args.calls} and "
          f"{3 * args.calls} calls (callgrind); servers in memory")  # fmt: skip
    try:
        with running(servers) as ports:
            for form in forms:
                for shape, what in SHAPES.items():
                    if args.shape not in (shape, "both"):
                        continue
                    ours = count("sluice", form, shape, ports["sluice"], args.calls)
                    print(f"  {form:<5} {what:<38} {'sluice':<10} {ours:>9,.0f}", flush=True)
                    for name in peers:
                        figure = count(name, form, shape, ports[name], args.calls)
                        ratio = f"sluice/{name} {ours / figure:.2f}x"
                        print(
                            f"  {form:<5} {what:<38} {name:<10} {figure:>9,.0f}   {ratio}",
                            flush=True,
                        )
    except (Unsupported, RuntimeError, ValueError) as error:  # a peer missing, a run failed
        raise SystemExit(str(error)) from None


if __name__ == "__main__":
    main()
