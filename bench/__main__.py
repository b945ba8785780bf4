"""``python -m bench`` (or ``sluice-bench``): load-test Sluice, optionally side by side with
beanstalkd and Redis. See ``--help``; the scenarios are described in bench/_scenarios.py."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import math
import os
import platform
import resource
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack

from ._accounting import MIN_BODY
from ._harness import Progress
from ._load import CLIENT_FORMS, QueueLimit, Workload
from ._output import (
    describe_workload,
    format_comparison,
    format_run,
    report_json,
    write_json,
)
from ._peers import parse_peers
from ._scenarios import SCENARIOS, RunReport, run_scenario
from ._servers import Server
from ._sluice import FSYNC_MODES, SluiceServer

DESCRIPTION = """\
Load-test Sluice: producer and worker processes, each running many connections (asyncio
tasks on uvloop, or with --client sync a thread each with a blocking client), against a
broker the bench starts on a free port, or the one at --url.

Reports jobs/s end to end (first put to last ack), put-confirm and put-to-deliver latency
percentiles, the broker's CPU seconds and peak RSS, and checks that every message was
delivered and acked exactly once (exit status 1 if not).

scenarios:
  throughput     closed loop: put as fast as confirmations come back (default 50,000)
  latency        open loop at a fixed offered rate (default 1,000/s for 10 s)
  many-workers   throughput load plus 1,000 idle long-polling worker connections
  backlog        enqueue 1,000,000 with no workers, then drain: fill/drain rates, RSS
  recovery       fill a durable broker with 1,000,000, kill -9, restart: time to ready,
                 then check and drain every message (needs a broker with --fsync)
  limited        a queue rate-limited to 200/s (burst 20): fill it with 10 s worth, drain
                 it with greedy workers; delivered rate against the limit, the busiest
                 second against burst + rate, the broker's throttle counters (Sluice only)
"""

EPILOG = """\
examples:
  python -m bench                                   # throughput, default workload
  python -m bench --batch 100 --messages 200000
  python -m bench --scenario latency --rate 5000 --duration 20
  python -m bench --against beanstalkd,redis --json results.json
  python -m bench --against redis:always,beanstalkd:fsync
  python -m bench --producers 32 --workers 32 --against sluice:memory
  python -m bench --client sync --against beanstalkd,redis   # blocking clients in threads
  python -m bench --scenario limited --limit-rate 50 --limit-burst 5 --max-in-flight 4

peers (--against): beanstalkd (modes off, binlog, fsync) and redis (off, everysec,
always); a bare name runs every mode. sluice:MODE runs Sluice again with --fsync MODE
(sluice:memory beside the default: what durability costs, measured in one run). The
peers need the servers (apt-get install beanstalkd redis-server) and the clients (pip
install -e '.[bench]'); a missing one is skipped.

client forms (--client): async drives every server through an asyncio client: Sluice's
AsyncClient, a pipelining beanstalkd client in the bench, redis.asyncio. sync gives each
connection a thread and the usual blocking client: Sluice's Client, greenstalk (no
pipelining: a batch is that many round trips), redis.Redis. The threads of one load
process share its interpreter lock, so only one runs Python code at a time: that is what
an application on a blocking client lives with, and what client CPU per job shows.
"""

DEFAULT_LIMIT_RATE = 200.0  # messages/s the limited scenario's queue is limited to

BASE_DEFAULTS: dict[str, Any] = {
    "producers": 1,
    "workers": 8,
    "idle_workers": 0,
    "body_size": 100,
    "batch": 1,
    "priorities": 1,
    "delay_fraction": 0.0,
    "delay_seconds": 1.0,
    "queues": 1,
    "rate": None,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sluice-bench",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--scenario", choices=list(SCENARIOS), default="throughput", help="what to run")
    add(
        "--url",
        help="bench the broker at sluice://HOST:PORT (sluices:// for TLS, verified against "
        "SLUICE_TLS_CA or the system's CAs) instead of starting one (a token, if it needs "
        "one, from SLUICE_AUTH_TOKEN)",
    )
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--messages", type=int, metavar="N", help="messages to put in all")
    amount.add_argument(
        "--duration", type=float, metavar="SECONDS", help="put for this long instead"
    )
    add("--producers", type=int, metavar="N", help="producer connections (default 1)")
    add("--workers", type=int, metavar="N", help="worker connections (default 8)")
    add("--idle-workers", type=int, metavar="N", help="extra idle long-polling connections")
    add(
        "--body-size",
        type=int,
        metavar="BYTES",
        help=f"bytes per body, at least {MIN_BODY} (default 100)",
    )
    add(
        "--batch",
        type=int,
        metavar="N",
        help="messages per put, reserve and ack frame; 1 = unbatched",
    )
    add(
        "--priorities",
        type=int,
        metavar="N",
        help="spread puts over this many priorities (default 1)",
    )
    add("--delay-fraction", type=float, metavar="F", help="share of puts sent with a delay (0..1)")
    add(
        "--delay-seconds",
        type=float,
        metavar="SECONDS",
        help="the delay of delayed puts (default 1)",
    )
    add(
        "--rate",
        type=float,
        metavar="PER_S",
        help="open loop: offered messages/s in all (latency runs)",
    )
    add("--queues", type=int, metavar="N", help="spread the load over this many queues (default 1)")
    limits = parser.add_argument_group("limited scenario")
    limits.add_argument(
        "--limit-rate",
        type=float,
        metavar="N",
        help=f"the queue's rate limit: N messages per --limit-per seconds (default "
        f"{DEFAULT_LIMIT_RATE:g})",
    )
    limits.add_argument(
        "--limit-per", type=float, metavar="SECONDS", help="the rate's period (default 1)"
    )
    limits.add_argument(
        "--limit-burst",
        type=int,
        metavar="B",
        help="messages the full bucket lets out at once (default: a tenth of a second's "
        "worth, at least 1: 20 at 200/s)",
    )
    limits.add_argument(
        "--max-in-flight",
        type=int,
        metavar="N",
        help="also cap the queue's messages reserved at once (default: no cap)",
    )
    add(
        "--fsync",
        choices=FSYNC_MODES,
        default="always",
        help="the broker's durability: passed as --fsync MODE --data-dir TMP, memory as "
        "--in-memory; a broker without --fsync runs in memory and the report says so "
        "(default %(default)s)",
    )
    add(
        "--client",
        choices=list(CLIENT_FORMS),
        default="async",
        help="how each load process drives its connections: async, as asyncio tasks on "
        "uvloop; sync, a thread per connection with a blocking client, the threads sharing "
        "the process's interpreter lock (see below; default %(default)s)",
    )
    add(
        "--processes",
        type=int,
        metavar="N",
        help="client processes per side, producers and workers (default: half the cores)",
    )
    add(
        "--against",
        metavar="PEERS",
        help="also run peers: beanstalkd,redis or NAME:MODE,... (see below)",
    )
    add(
        "--json",
        type=Path,
        metavar="FILE",
        help="write every figure, the configuration and versions here",
    )
    add("--progress", action="store_true", help="show the live progress line (default: on a TTY)")
    add(
        "--stall-timeout",
        type=float,
        metavar="SECONDS",
        default=30.0,
        help="fail when nothing is put or acked for this many seconds (default %(default)s)",
    )
    return parser


def build_workload(args: argparse.Namespace) -> Workload:
    """Flags given win; the scenario's defaults fill the rest, then BASE_DEFAULTS."""
    defaults = {**BASE_DEFAULTS, **SCENARIOS[args.scenario].defaults}
    if args.messages is not None or args.duration is not None:
        defaults.pop("messages", None)
        defaults.pop("duration", None)
    chosen: dict[str, Any] = {
        key: getattr(args, key, None) for key in (*BASE_DEFAULTS, "messages", "duration")
    }
    values: dict[str, Any] = {
        key: value if value is not None else defaults.get(key) for key, value in chosen.items()
    }
    cores = os.cpu_count() or 2
    processes = args.processes or max(1, cores // 2)
    return Workload(
        processes=processes,
        stall_timeout=args.stall_timeout,
        client=args.client,
        limit=build_limit(args),
        **values,
    )


def build_limit(args: argparse.Namespace) -> QueueLimit | None:
    """The limited scenario's queue limits (also built when another scenario is given a
    limit flag, so that ``check_workload`` refuses it)."""
    flags = (args.limit_rate, args.limit_per, args.limit_burst, args.max_in_flight)
    if args.scenario != "limited" and all(flag is None for flag in flags):
        return None
    rate = DEFAULT_LIMIT_RATE if args.limit_rate is None else args.limit_rate
    per = 1.0 if args.limit_per is None else args.limit_per
    burst = args.limit_burst
    if burst is None:
        burst = max(1, math.ceil(rate / per / 10)) if rate > 0 and per > 0 else 1
    return QueueLimit(rate=rate, per=per, burst=burst, max_in_flight=args.max_in_flight)


def _limit_problems(
    scenario: str, limit: QueueLimit | None, stall_timeout: float
) -> list[tuple[bool, str]]:
    if limit is None:
        return []
    return [
        (scenario != "limited", "--limit-* and --max-in-flight apply to --scenario limited"),
        (limit.rate <= 0, "--limit-rate must be above 0"),
        (limit.per <= 0, "--limit-per must be above 0"),
        (limit.burst < 1, "--limit-burst must be at least 1"),
        (
            limit.max_in_flight is not None and limit.max_in_flight < 1,
            "--max-in-flight must be at least 1",
        ),
        (
            limit.rate > 0 and limit.per / limit.rate >= stall_timeout,
            "the limit lets out a message less often than --stall-timeout: raise it",
        ),
    ]


def check_workload(scenario: str, workload: Workload) -> str | None:
    """What is wrong with this workload, said so the user can fix it (None if fine)."""
    problems = [
        (workload.producers < 1, "--producers must be at least 1"),
        (workload.workers < 1, "--workers must be at least 1"),
        (workload.idle_workers < 0, "--idle-workers cannot be negative"),
        (workload.body_size < MIN_BODY, f"--body-size must be at least {MIN_BODY}"),
        (not 1 <= workload.batch <= 1000, "--batch must be 1..1000 (the protocol's max)"),
        (workload.priorities < 1, "--priorities must be at least 1"),
        (not 0 <= workload.delay_fraction <= 1, "--delay-fraction must be 0..1"),
        (workload.delay_seconds < 0, "--delay-seconds cannot be negative"),
        (workload.queues < 1, "--queues must be at least 1"),
        (workload.rate is not None and workload.rate <= 0, "--rate must be above 0"),
        (workload.messages is not None and workload.messages < 1, "--messages must be >= 1"),
        (workload.duration is not None and workload.duration <= 0, "--duration must be > 0"),
        (workload.processes < 1, "--processes must be at least 1"),
        (
            scenario in ("backlog", "recovery") and workload.messages is None,
            f"{scenario} fills a fixed number of messages: use --messages, not --duration",
        ),
        (
            -(-workload.queues // max(1, min(workload.workers, workload.queues))) > 100,
            "a worker reserves from at most 100 queues: raise --workers or lower --queues",
        ),
        *_limit_problems(scenario, workload.limit, workload.stall_timeout),
        (
            scenario == "limited" and workload.queues != 1,
            "limited runs one queue (a rate limit is per queue): leave out --queues",
        ),
        (
            scenario == "limited" and workload.rate is not None,
            "limited fills the queue, then the limit paces the workers: leave out --rate "
            "(the limit is --limit-rate)",
        ),
    ]
    return next((message for wrong, message in problems if wrong), None)


def raise_open_file_limit(connections: int) -> None:
    """Allow this process (and the broker it starts) a descriptor per connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections * 2 + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def client_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "uvloop": importlib.metadata.version("uvloop"),
        "msgpack": ".".join(map(str, msgpack.version)),
        "platform": platform.platform(),
        "cpu_count": str(os.cpu_count()),
    }


def json_document(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    workload: Workload,
    reports: Sequence[RunReport],
) -> dict[str, Any]:
    """Every figure of every run, with the command, configuration and versions."""
    return {
        "command": shlex.join(["python", "-m", "bench", *(argv or sys.argv[1:])]),
        "scenario": args.scenario,
        "config": {
            **{key: value for key, value in vars(args).items() if key != "json"},
            "workload": dataclasses.asdict(workload),
        },
        "versions": client_versions(),
        "runs": [report_json(report) for report in reports],
        "ok": exit_status(reports) == 0,
    }


def exit_status(reports: Sequence[RunReport]) -> int:
    """1 if any run failed (an error, or a message not acked exactly once); skips are fine."""
    return 1 if any(report.status == "failed" for report in reports) else 0


def run(args: argparse.Namespace, workload: Workload) -> list[RunReport]:
    sluice = SluiceServer(args.fsync, args.url)
    servers: list[Server] = [sluice]
    if args.against:
        servers += parse_peers(args.against, workload.body_size)
    progress = Progress(args.progress or sys.stderr.isatty())
    reports = []
    for server in servers:
        print(f"running {args.scenario} against {server.name} ({server.mode})...", file=sys.stderr)
        reports.append(run_scenario(args.scenario, server, workload, progress))
        print(format_run(reports[-1]) + "\n", flush=True)
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    workload = build_workload(args)
    problem = check_workload(args.scenario, workload)
    if problem is None and args.against:
        try:
            parse_peers(args.against, workload.body_size)
        except ValueError as error:
            problem = f"--against: {error}"
    if problem is not None:
        parser.error(problem)
    raise_open_file_limit(workload.producers + workload.workers + workload.idle_workers)
    print(f"sluice-bench {describe_workload(args.scenario, workload)}\n", flush=True)
    reports = run(args, workload)
    if len(reports) > 1:
        print(format_comparison(args.scenario, reports))
    status = exit_status(reports)
    if args.json is not None:
        write_json(args.json, json_document(args, argv, workload, reports))
    if status:
        print("sluice-bench: FAILED (see the errors above)", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
