"""The short forms of ``make soak`` (``tests/soak.py``): a crash campaign of a few rounds
of kill -9 under load on one data dir, restarts killed during recovery and kills while the
store's map grows among them, every restart checked; 20,000 fuzzed frames against a
running broker; a storm of 500 idle connections."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.soak import main, run_campaign, run_clients, run_fuzz, run_storm


def test_a_short_crash_campaign_finds_no_violation(tmp_path: Path) -> None:
    seed = random.SystemRandom().randrange(2**32)
    lines: list[str] = []
    summary = run_campaign(
        6,
        "interval",
        seed,
        tmp_path,
        lines.append,
        progress_every=3,
        recovery_kill_chance=1.0,
        settle_every=3,  # two settles: the second accounts for dead letters the first purged
        growth_kill_chance=1.0,
    )
    assert summary.violations == [], summary.violations
    assert summary.rounds == 6 and len(lines) == 2
    assert lines[1] == f"round 6/6: {summary.confirmed} operations confirmed"
    assert summary.confirmed > 100
    # Each round is a growth round; a growth kill that lands makes the next start a try.
    assert summary.growth_kill_tries >= 6
    recovery_tries = 6 - (summary.growth_kill_tries - 6)
    assert summary.recovery_kill_tries == recovery_tries and summary.recovery_kills >= 1
    assert len(summary.recoveries) == 7  # the first start and six restarts, each logged
    assert summary.lines()[3].startswith("kills during map growth ")
    assert summary.lines()[4] == "violations           0"


def test_the_command_says_what_it_does(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["crash", "--help"])
    assert done.value.code == 0
    assert "--rounds" in capsys.readouterr().out


def test_twenty_thousand_fuzzed_frames_break_nothing(tmp_path: Path) -> None:
    seed = random.SystemRandom().randrange(2**32)
    summary = run_fuzz(20_000, seed, tmp_path, lambda line: None)
    assert summary.violations == [], f"seed {seed}: {summary.violations}"
    assert summary.frames >= 20_000 and summary.replies >= 0.9 * summary.frames
    assert summary.codes.get("BAD_REQUEST", 0) > 0 and summary.codes.get("BAD_FRAME", 0) > 0


def test_a_storm_of_idle_connections_lets_work_through_and_leaves_no_fds(
    tmp_path: Path,
) -> None:
    summary = run_storm(500, tmp_path)
    assert summary.violations == [], summary.violations
    assert summary.connections == 500
    assert summary.fds[1] - min(summary.fds[0], summary.fds[2]) >= 500  # all open at once


def test_broken_clients_leave_a_working_one_its_work_and_memory_bounded(tmp_path: Path) -> None:
    summary = run_clients(tmp_path)
    assert summary.violations == [], summary.violations
    assert summary.work_done == 200 and summary.resets == 200
    assert summary.sent_unread > 0 and summary.half_close_replies == 200
