"""Soaks too long for ``make test``, run by ``make soak`` (the suite runs a short form).

    python -m tests.soak crash --rounds 1000 --fsync always [--seed S]

``crash``, the crash campaign: one data dir for every round. Each round runs the
producers and consumers of ``tests/test_crash.py`` (puts with priorities and delays,
single and batch reserves, acks with results, nacks with and without a delay, touches,
buries, messages that die of their attempts) and kills the broker with SIGKILL at a random
moment. Some restarts are killed too, before the broker listens (during recovery). Every
restart is checked as ``test_crash`` checks it: every confirmed put is there with its body,
priority and headers, no confirmed ack is delivered again, leases held at the crash run
out at their deadlines, due times, dead letters with their reasons and the queue's
settings are kept, and ids and lease tokens are never handed out twice. Every
``SETTLE_EVERY`` rounds the queue is drained and every put accounted for (so the backlog
stays within one peek). Prints a line per ``--progress-every`` rounds and a summary:
rounds, operations confirmed, kills during recovery, violations (the first stops the
campaign, with its seed), and recovery times (p50, p99, max) as the broker logged them.
Seeded: ``--seed`` replays the workload's choices (not the threads' timing).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests import test_crash as crash
from tests.conftest import REPO_ROOT, BrokerProcess, start_broker

SETTLE_EVERY = 10  # rounds between drains that account for every put
RECOVERY_KILL_CHANCE = 0.2  # of a restart being killed before it listens
RECOVERED = re.compile(r"recovered \d+ messages .* in ([0-9.]+) s")


@dataclass
class Summary:
    rounds: int = 0
    confirmed: int = 0  # puts, acks, nacks, buries and touches the broker confirmed
    recovery_kills: int = 0  # restarts killed before they listened
    recovery_kill_tries: int = 0
    violations: list[str] = field(default_factory=list)
    recoveries: list[float] = field(default_factory=list)  # seconds, as the broker logged

    def lines(self) -> list[str]:
        recoveries = sorted(self.recoveries) or [0.0]
        p99 = recoveries[min(len(recoveries) - 1, int(len(recoveries) * 0.99))]
        return [
            f"rounds               {self.rounds}",
            f"operations confirmed {self.confirmed}",
            f"kills during recovery {self.recovery_kills} (of {self.recovery_kill_tries} tried)",
            f"violations           {len(self.violations)}",
            f"recovery p50         {statistics.median(recoveries) * 1000:.1f} ms",
            f"recovery p99         {p99 * 1000:.1f} ms",
            f"recovery max         {recoveries[-1] * 1000:.1f} ms",
        ]


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


def kill_while_recovering(data_dir: Path, fsync: str, log_path: Path, wait: float) -> bool:
    """Start a broker on ``data_dir``, SIGKILL it after ``wait`` seconds; True if it had
    not yet said it listens (it died starting or recovering)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    command = [sys.executable, "-m", "broker", "--port", "0", "--http-port", "0"]
    command += ["--data-dir", str(data_dir), "--fsync", fsync]
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
        )
    time.sleep(wait)
    assert process.stdout is not None
    listening = bool(select.select([process.stdout], [], [], 0)[0])
    process.kill()
    process.wait()
    process.stdout.close()
    return not listening


def run_campaign(
    rounds: int,
    fsync: str,
    seed: int,
    workdir: Path,
    progress: Callable[[str], None] = print,
    progress_every: int = 50,
    recovery_kill_chance: float = RECOVERY_KILL_CHANCE,
) -> Summary:
    """The crash campaign; returns its summary (violations listed, not raised)."""
    rng = random.Random(seed)
    ledger = crash.Ledger()
    summary = Summary()
    data_dir = workdir / "data"
    started: list[BrokerProcess] = []
    startup = 0.5  # seconds a start takes, measured: where a recovery kill may land

    def start(epoch: int) -> BrokerProcess:
        nonlocal startup
        log_path = workdir / f"broker-{epoch % 2}.log"  # two logs, rewritten in turn
        if epoch and rng.random() < recovery_kill_chance:
            summary.recovery_kill_tries += 1
            wait = rng.uniform(0.0, startup)
            if kill_while_recovering(data_dir, fsync, log_path, wait):
                summary.recovery_kills += 1
        began = time.monotonic()
        broker = start_broker(log_path, "--data-dir", str(data_dir), "--fsync", fsync)
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
            killed_at = crash.run_round(broker, ledger, rng)
            broker = crash.restart_and_check(start, ledger, killed_at)
            if number % SETTLE_EVERY == 0 or number == rounds:
                with broker.client() as client:
                    crash.drain(client, ledger)
                    crash.cancel_delayed(client, ledger)
                    crash.account_for_every_put(client, ledger)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.soak",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    campaign = commands.add_parser(
        "crash",
        help="kill -9 the broker under load, round after round, on one data dir",
        description="Kill -9 the broker at random moments under load, on one data dir, "
        "and check after every restart that nothing it confirmed was lost or done twice.",
    )
    campaign.add_argument("--rounds", type=int, default=1000, help="kills (default 1000)")
    campaign.add_argument("--fsync", choices=["always", "interval"], default="always")
    campaign.add_argument("--seed", type=int, help="replay a campaign's choices")
    campaign.add_argument("--progress-every", type=int, default=50, metavar="N")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    print(f"crash campaign: {args.rounds} rounds, fsync {args.fsync}, seed {seed}", flush=True)
    with tempfile.TemporaryDirectory(prefix="sluice-soak-") as workdir:
        summary = run_campaign(
            args.rounds,
            args.fsync,
            seed,
            Path(workdir),
            lambda line: print(line, flush=True),
            args.progress_every,
        )
    for line in summary.lines():
        print(line)
    for violation in summary.violations:
        print(f"violation: {violation}")
    return 1 if summary.violations else 0


if __name__ == "__main__":
    sys.exit(main())
