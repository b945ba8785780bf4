"""The runnable examples: each starts its own broker, must exit 0 and print its summary."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

RUN_TIMEOUT = 60.0  # seconds; each example takes a few


def run_example(module: str) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("SLUICE_")}
    try:
        return subprocess.run(
            [sys.executable, "-m", module],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{module} did not finish within {RUN_TIMEOUT}s; output:\n{error.stdout!r}")


def summary_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    lines = done.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("summary: "), done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    return lines[-1]


def test_ticket_booking_sells_exactly_every_seat_once() -> None:
    summary = summary_line(run_example("examples.ticket_booking"))
    assert re.match(
        r"summary: 100 sold, 400 sold out, 0 unanswered, 0 seats sold twice \(\d+\.\d s\)$",
        summary,
    ), summary


def test_stock_reservation_oversells_nothing_and_answers_every_order_once() -> None:
    summary = summary_line(run_example("examples.stock_reservation"))
    match = re.match(
        r"summary: 200 orders, (\d+) confirmed, (\d+) sold out, 0 unanswered, "
        r"0 items oversold, 0 units sold twice, 200 acked events \(\d+\.\d s\)$",
        summary,
    )
    assert match, summary
    assert int(match[1]) + int(match[2]) == 200 and int(match[1]) > 0


def test_seat_hold_releases_the_unpaid_hold() -> None:
    done = run_example("examples.seat_hold")
    summary = summary_line(done)
    assert summary == "summary: sold 2 (A1 to alice, B2 to dave), released 1, 0 wrong"
    assert "bob cannot hold A1: it is held already" in done.stdout
    assert "carol pays for B2 too late" in done.stdout


def test_an_example_runs_as_a_script_from_another_directory(tmp_path: Path) -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("SLUICE_")}
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "seat_hold.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert summary_line(done) == "summary: sold 2 (A1 to alice, B2 to dave), released 1, 0 wrong"
