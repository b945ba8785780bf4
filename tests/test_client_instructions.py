"""bench.client_instructions: its arithmetic, its client runs against a real broker, its
refusals, and (make slow, where valgrind is installed) one real count."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.client_instructions import WARM_UP, collected, instructions_per_call
from tests.conftest import BrokerProcess

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.client_instructions", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_a_call_costs_what_the_extra_calls_added() -> None:
    # 1,000 calls counted 5,000,000 in all, 3,000 counted 9,000,000: 2,000 calls more
    # added 4,000,000, so 2,000 a call (start-up and imports cancel out).
    assert instructions_per_call(5_000_000, 9_000_000, 1000) == 2000
    with pytest.raises(ValueError, match="not more than the run of 1000"):
        instructions_per_call(9_000_000, 9_000_000, 1000)


def test_the_total_is_read_from_callgrind_and_its_absence_is_an_error() -> None:
    assert collected("==12== Events    : Ir\n==12== Collected : 123456789\n==12==\n") == 123456789
    with pytest.raises(RuntimeError, match="callgrind reported no total"):
        collected("valgrind: cannot start\n")


@pytest.mark.parametrize("form", ["async", "sync"])
@pytest.mark.parametrize("shape", ["put", "work"])
def test_each_client_run_makes_its_calls_on_a_real_broker(
    broker: BrokerProcess, form: str, shape: str
) -> None:
    calls = 20
    fill = 3 * calls + WARM_UP if shape == "work" else 0
    done = _run("--child", "sluice", form, shape, str(broker.port), str(calls), str(fill))
    assert done.returncode == 0, done.stderr
    assert f"sluice {form} {shape}: " in done.stdout


def test_a_work_run_with_too_few_messages_fails_rather_than_counting_empty_reserves(
    broker: BrokerProcess,
) -> None:
    # WARM_UP + 5 reserves from a queue of 10: the eleventh waits out its second and
    # comes back empty, which the run refuses.
    done = _run("--child", "sluice", "sync", "work", str(broker.port), "5", "10")
    assert done.returncode != 0
    assert "reserve returned 0 messages, not 1" in done.stderr


def test_it_says_what_to_install_without_valgrind() -> None:
    env = {**os.environ, "PATH": "/nonexistent"}
    done = _run("--calls", "10", "--against", "none", env=env)
    assert done.returncode == 1
    assert "apt-get install valgrind" in done.stderr


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--calls", "0"], "--calls must be at least 1"),
        (["--against", "rabbitmq"], "unknown peer 'rabbitmq': choose from beanstalkd, redis"),
        (["--client", "threads"], "invalid choice: 'threads'"),
        (["--shape", "ping"], "invalid choice: 'ping'"),
    ],
)
def test_bad_options_are_refused_before_anything_starts(args: list[str], error: str) -> None:
    done = _run(*args)
    assert done.returncode in (1, 2)
    assert error in done.stderr


@pytest.mark.parametrize(
    ("child", "error"),
    [
        (["rabbitmq", "sync", "put", "7700", "10", "0"], "unknown server 'rabbitmq'"),
        (["sluice", "threads", "put", "7700", "10", "0"], "the form is one of"),
        (["sluice", "sync", "ping", "7700", "10", "0"], "the shape one of"),
        (["sluice", "sync", "put", "port", "10", "0"], "are whole numbers, got ['port'"),
        (["sluice", "sync", "put", "70000", "10", "0"], "PORT is 1-65535"),
        (["sluice", "sync", "put", "7700", "0", "0"], "CALLS at least 1"),
    ],
)
def test_a_hand_typed_child_run_with_bad_words_is_a_usage_error(
    child: list[str], error: str
) -> None:
    done = _run("--child", *child)
    assert done.returncode == 2
    assert error in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_it_counts_the_blocking_clients_put_under_valgrind() -> None:
    done = _run("--calls", "30", "--against", "none", "--client", "sync", "--shape", "put")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("  sync")]
    assert len(lines) == 1  # the put only
    assert "put of one message" in lines[0]
    assert int(lines[0].split()[-1].replace(",", "")) > 1000  # a call is thousands at least
