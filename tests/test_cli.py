"""The ``sluice`` admin CLI, run as a subprocess (``python -m client.cli``) against a real
broker for every command: human and ``--json`` output, exit codes 0/1/2, confirmation of
destructive commands, and ``watch`` driven refresh by refresh."""

from __future__ import annotations

import base64
import json
import os
import pty
import queue
import re
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any
from zoneinfo import ZoneInfo

import pytest

from client._cli_commands import COMMANDS
from client._cli_text import (
    UsageError,
    body_preview,
    parse_settings,
    parse_time,
    parse_value,
    table,
    zoned_time,
)
from client.cli import main
from tests.conftest import REPO_ROOT, BrokerProcess, start_broker, stop_broker, wait_for_state

RUN_TIMEOUT = 30.0  # seconds one CLI run may take before the test fails
LINE_TIMEOUT = 10.0  # seconds to wait for the next line of `watch`


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def cli_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    return env | settings


def sluice(broker: BrokerProcess | None, *args: str, stdin: bytes = b"", **env: str) -> Run:
    """Run the CLI to the end, with SLUICE_URL set to ``broker`` and ``stdin`` (a pipe,
    never a terminal) as its input."""
    if broker is not None:
        env.setdefault("SLUICE_URL", broker.url)
    done = subprocess.run(
        [sys.executable, "-m", "client.cli", *args],
        cwd=REPO_ROOT,
        env=cli_env(**env),
        input=stdin,
        capture_output=True,
        timeout=RUN_TIMEOUT,
    )
    return Run(done.returncode, done.stdout.decode(), done.stderr.decode())


def ok(broker: BrokerProcess, *args: str, stdin: bytes = b"") -> Run:
    run = sluice(broker, *args, stdin=stdin)
    assert run.code == 0, f"sluice {' '.join(args)} exited {run.code}: {run.err}"
    return run


def failed(run: Run, code: int, start: str) -> None:
    """The run exited ``code`` with one line on stderr, starting with ``start``."""
    assert run.code == code, run
    assert run.err.count("\n") == 1 and run.err.startswith(start), run.err


def rows(text: str) -> dict[str, list[str]]:
    """A table's rows keyed by their first cell (header row included)."""
    return {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}


def cells(line: str) -> list[str]:
    """The cells of a table line whose cells may hold single spaces (cron fields, times):
    cells are at least two spaces apart."""
    return re.split(r"\s{2,}", line.strip())


def named_rows(text: str) -> dict[str, dict[str, str]]:
    """A table's rows as header -> cell maps, keyed by their "name" cell."""
    header, *lines = text.splitlines()
    table_rows = [dict(zip(cells(header), cells(line), strict=True)) for line in lines]
    return {row["name"]: row for row in table_rows}


def listing(lines: list[str]) -> dict[str, str]:
    """``key  value`` lines as a map (keys and values may hold single spaces)."""
    pairs = [cells(line) for line in lines]
    assert all(len(pair) == 2 for pair in pairs), pairs
    return {key: value for key, value in pairs}


def local(zone: str, year: int, month: int, day: int, hour: int, minute: int) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=ZoneInfo(zone)).timestamp()


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A URL where nothing listens: a bound socket that never listens refuses connections."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"sluice://127.0.0.1:{sock.getsockname()[1]}"


# -------------------------------------------------------------------- commands


def test_put_peek_and_status(shared_broker: BrokerProcess) -> None:
    text_id = int(ok(shared_broker, "put", "cli-peek", "hello world").out)
    binary = b"\x00\xffbinary\n"
    put_args = ["put", "cli-peek", "-", "--priority", "5", "--header", "tenant=acme", "--json"]
    put = ok(shared_broker, *put_args, stdin=binary)
    binary_id = put.json()["id"]
    delayed_id = int(ok(shared_broker, "put", "cli-peek", "later", "--delay", "60").out)

    table_rows = rows(ok(shared_broker, "peek", "cli-peek").out)
    assert list(table_rows) == ["id", str(binary_id), str(text_id)]  # priority 5 first
    assert table_rows[str(text_id)][-2:] == ["hello", "world"]
    assert table_rows[str(binary_id)][-1] == "hex:00ff62696e6172790a"
    items = ok(shared_broker, "peek", "cli-peek", "--json").json()
    assert [base64.b64decode(item["body"]) for item in items] == [binary, b"hello world"]
    assert items[0]["headers"] == {"tenant": "acme"} and items[0]["priority"] == 5
    delayed = ok(shared_broker, "peek", "cli-peek", "--state", "delayed", "--limit", "1")
    assert rows(delayed.out)[str(delayed_id)][3] == "in"  # due in about a minute

    status = rows(ok(shared_broker, "status", str(binary_id)).out)
    assert status["state"] == ["state", "ready"] and status["headers"] == ["headers", "tenant=acme"]
    as_json = ok(shared_broker, "--json", "status", str(delayed_id)).json()
    assert as_json["state"] == "delayed" and as_json["due_at"] > as_json["enqueued_at"]
    failed(sluice(shared_broker, "status", "999999"), 1, "sluice: NOT_FOUND: no message 999999")


def test_stats_and_queues(shared_broker: BrokerProcess) -> None:
    for queue_name, count in (("cli-stats-a", 2), ("cli-stats-b", 3)):
        for number in range(count):
            ok(shared_broker, "put", queue_name, f"message {number}")
    every = rows(ok(shared_broker, "stats").out)
    header = every["queue"]
    assert every["cli-stats-b"][header.index("ready")] == "3"
    assert every["cli-stats-b"][header.index("put")] == "3"
    assert "(all)" in every
    summed = ok(shared_broker, "stats", "--json").json()
    named = {s["queue"]: s for s in summed["queues"]}
    assert named["cli-stats-a"]["ready"] == 2 and named["cli-stats-b"]["totals"]["put"] == 3
    assert summed["all"]["ready"] == sum(s["ready"] for s in summed["queues"])

    one = rows(ok(shared_broker, "stats", "cli-stats-a").out)
    assert one["ready"] == ["ready", "2"] and one["totals.put"] == ["totals.put", "2"]
    assert ok(shared_broker, "stats", "cli-stats-a", "--json").json()["totals"]["put"] == 2
    listed = rows(ok(shared_broker, "queues").out)
    assert listed["cli-stats-a"][1:] == ["2", "0", "0", "0", "no"]
    names = [q["name"] for q in ok(shared_broker, "queues", "--json").json()]
    assert {"cli-stats-a", "cli-stats-b"} <= set(names) and names == sorted(names)
    failed(sluice(shared_broker, "stats", "cli-missing"), 1, "sluice: NOT_FOUND: ")


def _dead_letters(broker: BrokerProcess, queue_name: str, count: int) -> list[int]:
    """Put ``count`` messages on a queue with max_attempts=1 and nack each into the dead."""
    with broker.client() as client:
        client.configure(queue_name, max_attempts=1)
        ids = client.put_many(queue_name, [f"job {n}" for n in range(count)])
        for message in client.reserve(queue_name, max_messages=count):
            client.nack(message, error=f"SMTP timeout on {message.id}")
        assert client.stats(queue_name)["dead"] == count
    return ids


def test_dead_replay_and_purge_dead(shared_broker: BrokerProcess) -> None:
    ids = _dead_letters(shared_broker, "cli-dead", 3)
    listing = rows(ok(shared_broker, "dead", "cli-dead").out)
    assert [row[0] for row in listing.values()] == ["id", *map(str, ids)]
    assert "SMTP timeout on" in ok(shared_broker, "dead", "cli-dead").out
    page = ok(shared_broker, "dead", "cli-dead", "--limit", "1").out
    assert f"--after {ids[0]}" in page
    after = ok(shared_broker, "dead", "cli-dead", "--after", str(ids[0]), "--json").json()
    assert [item["id"] for item in after] == ids[1:]
    assert after[0]["last_error"] == f"SMTP timeout on {ids[1]}" and after[0]["attempts"] == 1
    assert str(ids[2]) in ok(shared_broker, "peek", "cli-dead", "--state", "dead").out

    assert ok(shared_broker, "replay", "cli-dead", str(ids[0])).out.startswith("replayed 1 ")
    assert ok(shared_broker, "replay", "cli-dead", "--json").json() == {"replayed": 2}
    assert ok(shared_broker, "dead", "cli-dead").out.startswith("no dead letters")

    ids = _dead_letters(shared_broker, "cli-dead-purge", 2)
    failed(sluice(shared_broker, "purge-dead", "cli-dead-purge"), 2, "sluice purge-dead: error")
    assert "--yes" in sluice(shared_broker, "purge-dead", "cli-dead-purge").err
    with shared_broker.client() as client:
        assert client.stats("cli-dead-purge")["dead"] == 2  # refused: nothing deleted
    purged = ok(shared_broker, "purge-dead", "cli-dead-purge", "--yes", "--json")
    assert purged.json() == {"purged": 2}


def test_pause_resume_and_purge(shared_broker: BrokerProcess) -> None:
    for body in ("a", "b"):
        ok(shared_broker, "put", "cli-purge", body)
    ok(shared_broker, "put", "cli-purge", "later", "--delay", "60")
    assert "paused 'cli-purge'" in ok(shared_broker, "pause", "cli-purge").out
    with shared_broker.client() as client:
        assert client.stats("cli-purge")["paused"] is True
        assert client.reserve("cli-purge") == []
    assert ok(shared_broker, "resume", "cli-purge", "--json").json()["paused"] is False

    refused = sluice(shared_broker, "purge", "cli-purge")
    failed(refused, 2, "sluice purge: error: purge deletes messages for good: pass --yes")
    with shared_broker.client() as client:
        assert client.stats("cli-purge")["ready"] == 2
    assert ok(shared_broker, "purge", "cli-purge", "-y").out.startswith("purged 3 ")
    emptied = sluice(shared_broker, "purge", "cli-purge", "--yes")  # emptied: forgotten
    failed(emptied, 1, "sluice: NOT_FOUND: ")
    failed(sluice(shared_broker, "pause", "bad name"), 1, "sluice: BAD_REQUEST: ")


def test_delete_queue_refuses_a_queue_in_use_unless_forced(shared_broker: BrokerProcess) -> None:
    ok(shared_broker, "put", "cli-delete", "a")
    refused = sluice(shared_broker, "delete-queue", "cli-delete")
    failed(refused, 1, "sluice: BAD_REQUEST: delete_queue: queue 'cli-delete' is not empty")
    assert "force=true" in refused.err
    with shared_broker.client() as client:
        assert client.stats("cli-delete")["ready"] == 1  # refused: nothing deleted
    deleted = ok(shared_broker, "delete-queue", "cli-delete", "--force")
    assert deleted.out == "deleted 'cli-delete' with 1 message\n"
    failed(sluice(shared_broker, "delete-queue", "cli-delete"), 1, "sluice: NOT_FOUND: ")
    ok(shared_broker, "pause", "cli-delete")
    assert ok(shared_broker, "delete-queue", "cli-delete", "--json").json() == {
        "deleted": True,
        "messages": 0,
        "schedules": 0,
        "bindings": 0,
    }
    failed(sluice(shared_broker, "delete-queue", "bad name"), 1, "sluice: BAD_REQUEST: ")


def test_configure(shared_broker: BrokerProcess) -> None:
    changes = "max_attempts=10 visibility_timeout=2.5 dead_letter_ttl=none backoff.type=fixed"
    configured = ok(
        shared_broker, "configure", "cli-conf", *changes.split(), "backoff.delay=2", "--json"
    )
    changed = configured.json()
    assert changed["max_attempts"] == 10 and changed["visibility_timeout"] == 2.5
    assert changed["dead_letter_ttl"] is None
    assert changed["backoff"] == {"type": "fixed", "delay": 2.0, "jitter": 0.0}
    shown = rows(ok(shared_broker, "configure", "cli-conf", 'backoff={"base": 3, "cap": 60}').out)
    assert shown["backoff.type"][1] == "exponential" and shown["backoff.base"][1] == "3"
    assert rows(ok(shared_broker, "configure", "cli-conf").out)["max_attempts"][1] == "10"

    failed(sluice(shared_broker, "configure", "cli-conf-missing"), 1, "sluice: NOT_FOUND: ")
    with shared_broker.client() as client:
        assert "cli-conf-missing" not in [q["name"] for q in client.queues()]
    failed(sluice(shared_broker, "configure", "cli-conf", "max_attempts=0"), 1, "sluice: BAD_REQ")
    failed(sluice(shared_broker, "configure", "cli-conf", "colour=blue"), 1, "sluice: BAD_REQ")
    twice = sluice(shared_broker, "configure", "cli-conf", "paused=true", "paused=false")
    failed(twice, 2, "sluice configure: error: 'paused' is given twice")


# ------------------------------------------------------------------- schedules


def test_schedule_and_schedules_show_the_next_fire_in_local_time_and_utc(
    shared_broker: BrokerProcess,
) -> None:
    empty = ok(shared_broker, "schedules", "cli-sched").out
    assert empty.startswith("no schedules on 'cli-sched'") and "sluice schedule QUEUE" in empty
    nightly = ["schedule", "cli-sched", "nightly", "--cron", "30 2 * * *", "--tz", "Europe/Berlin"]
    options = "--start-at 2030-01-15 --header team=ops --priority 3 --max-attempts 2 --limit 5"
    made = ok(
        shared_broker, *nightly, *options.split(), "--catchup", "all", "--overlap", "skip", "report"
    )
    title, *lines = made.out.splitlines()
    assert title == "scheduled 'nightly' on 'cli-sched': 30 2 * * *"
    shown = listing(lines)
    assert shown["next (local)"] == "2030-01-15 02:30:00 CET"  # --start-at read in --tz
    assert shown["next (UTC)"].startswith("2030-01-15 01:30:00Z (in ")
    assert shown["start_at"].startswith("2030-01-14 23:00:00Z")
    assert (shown["headers"], shown["priority"], shown["max_attempts"]) == ("team=ops", "3", "2")
    assert (shown["limit"], shown["catchup"], shown["overlap"]) == ("5", "all", "skip")
    assert (shown["body"], shown["runs"], shown["last message id"]) == ("report", "0", "-")

    # 02:30 does not exist in Berlin on 2030-03-31 (spring forward): it fires at 03:00.
    spring = ["schedule", "cli-sched", "spring", "--cron", "30 2 * * *", "--tz", "Europe/Berlin"]
    binary = b"\x00\xffraw"
    made_json = ok(shared_broker, *spring, "--start-at", "2030-03-31", "-", "--json", stdin=binary)
    spring_json = made_json.json()
    assert spring_json["next_at"] == local("Europe/Berlin", 2030, 3, 31, 3, 0)
    assert base64.b64decode(spring_json["body"]) == binary
    new_york = ["--cron", "@daily", "--tz", "America/New_York", "--start-at", "2030-07-01T12:00Z"]
    ok(shared_broker, "schedule", "cli-sched", "ny", *new_york, "x")
    every = ["--every", "3600", "--start-at", "1900000000", "--end-at", "2031-01-01T00:00+00:00"]
    tick = ok(shared_broker, "schedule", "cli-sched", "tick", *every, "tick", "--json").json()
    assert (tick["next_at"], tick["every"], tick["end_at"]) == (1900000000, 3600, 1924992000)

    table_rows = named_rows(ok(shared_broker, "schedules", "cli-sched").out)
    assert list(table_rows) == ["nightly", "ny", "spring", "tick"]
    assert table_rows["nightly"] == {
        "queue": "cli-sched",
        "name": "nightly",
        "cron or every": "30 2 * * *",
        "tz": "Europe/Berlin",
        "next (local)": "2030-01-15 02:30:00 CET",
        "next (UTC)": "2030-01-15 01:30:00Z",
        "last slot (UTC)": "-",
        "runs": "0",
        "missed": "0",
        "skipped": "0",
        "last id": "-",
    }
    assert table_rows["spring"]["next (local)"] == "2030-03-31 03:00:00 CEST"
    assert table_rows["spring"]["next (UTC)"] == "2030-03-31 01:00:00Z"
    ny_row = table_rows["ny"]  # @daily is shown as what it stands for
    assert (ny_row["cron or every"], ny_row["next (local)"]) == (
        "0 0 * * *",
        "2030-07-02 00:00:00 EDT",
    )
    assert ny_row["next (UTC)"] == "2030-07-02 04:00:00Z"
    assert table_rows["tick"]["cron or every"] == "every 3600s"
    assert table_rows["tick"]["next (local)"] == "2030-03-17 17:46:40 UTC"
    every_queue = ok(shared_broker, "schedules").out
    assert "cli-sched  nightly" in every_queue and "cli-sched  tick" in every_queue

    message_id = int(ok(shared_broker, "trigger", "cli-sched", "nightly").out)
    with shared_broker.client() as client:
        [message] = client.reserve("cli-sched")
        client.ack(message)
    assert (message.id, message.body, message.priority) == (message_id, b"report", 3)
    assert message.headers["schedule"] == "nightly" and message.headers["team"] == "ops"
    listed = {s["name"]: s for s in ok(shared_broker, "schedules", "cli-sched", "--json").json()}
    assert listed["nightly"]["triggered"] == 1 and listed["nightly"]["runs"] == 0
    assert listed["nightly"]["last_message_id"] == message_id
    assert ok(shared_broker, "trigger", "cli-sched", "ny", "--json").json()["id"] > message_id

    removed = ok(shared_broker, "unschedule", "cli-sched", "spring").out
    assert removed.startswith("removed schedule 'spring' of 'cli-sched'")
    assert ok(shared_broker, "unschedule", "cli-sched", "tick", "--json").json() == {
        "removed": True
    }
    again = sluice(shared_broker, "unschedule", "cli-sched", "spring")
    failed(again, 1, "sluice: NOT_FOUND: no schedule 'spring' on queue 'cli-sched': nothing")
    missing = sluice(shared_broker, "trigger", "cli-sched", "spring")
    failed(missing, 1, "sluice: NOT_FOUND: no schedule 'spring' on queue 'cli-sched'")
    with shared_broker.client() as client:
        assert [s["name"] for s in client.schedules("cli-sched")] == ["nightly", "ny"]


def test_a_schedule_made_on_the_command_line_fires_and_its_row_counts_the_fires(
    shared_broker: BrokerProcess,
) -> None:
    ok(shared_broker, "schedule", "cli-fire", "tick", "--every", "0.2", "--limit", "2", "tick")
    with shared_broker.client() as client:
        wait_for_state(
            lambda: client.schedules("cli-fire")[0]["next_at"] is None,
            "the schedule did not finish its two fires",
        )
        fired = client.peek("cli-fire", limit=10)
    [row] = named_rows(ok(shared_broker, "schedules", "cli-fire").out).values()
    assert (row["runs"], row["next (local)"], row["next (UTC)"]) == ("2", "-", "-")
    assert row["last id"] == str(fired[-1]["id"]) and len(fired) == 2
    slots = [message["headers"]["scheduled_for"] for message in fired]
    assert [message["key"] for message in fired] == [f"schedule:tick:{slot}" for slot in slots]
    assert row["last slot (UTC)"] == slots[-1][:19].replace("T", " ") + "Z"


SCHEDULE_USAGE_ERRORS: tuple[tuple[list[str], str], ...] = (
    ([], "one of the arguments --cron --every is required"),
    (["--cron", "@daily", "--every", "5"], "argument --every: not allowed with argument --cron"),
    (["--every", "soon"], "argument --every: expected a number of seconds, got 'soon'"),
    (["--every", "5", "--catchup", "most"], "argument --catchup: invalid choice: 'most'"),
    (["--every", "5", "--overlap", "never"], "argument --overlap: invalid choice: 'never'"),
    (["--every", "5", "--limit", "0"], "argument --limit: must be 1 or more, got 0"),
    (["--every", "5", "--start-at", "tomorrow"], "--start-at: 'tomorrow' is neither epoch"),
    (["--every", "5", "--tz", "No/Where", "--end-at", "2030-01-01"], "--end-at: '2030-01-01'"),
    (["--every", "5", "--header", "a=1", "--header", "a=2"], "header 'a' is given twice"),
)
SCHEDULE_REFUSALS: tuple[tuple[list[str], str], ...] = (
    (["--cron", "* * *"], "cron must have 5 fields (minute hour day-of-month"),
    (["--cron", "61 * * * *"], "cron '61 * * * *': bad minute"),
    (["--cron", "0 0 * * 8"], "cron '0 0 * * 8': bad day-of-week"),
    (["--cron", "@fortnightly"], "cron: unknown alias '@fortnightly'"),
    (["--cron", "@daily", "--tz", "Nowhere/City"], "tz: unknown time zone 'Nowhere/City'"),
    (["--every", "0.05"], "every must be in [0.1, "),
    (["--every", "5", "--start-at", "2030-01-02", "--end-at", "2030-01-01"], "is before start_at"),
)


def test_bad_schedules_say_what_is_wrong_and_create_nothing(shared_broker: BrokerProcess) -> None:
    command = ["schedule", "cli-bad", "s"]
    for options, says in SCHEDULE_USAGE_ERRORS:
        run = sluice(shared_broker, *command, *options, "body")
        assert run.code == 2, (options, run)
        assert run.err.splitlines()[-1].startswith(f"sluice schedule: error: {says}"), run.err
    for options, says in SCHEDULE_REFUSALS:  # the broker's checks, in its words
        run = sluice(shared_broker, *command, *options, "body")
        failed(run, 1, "sluice: BAD_REQUEST: schedule: ")
        assert says in run.err, (options, run.err)
    bad_name = sluice(shared_broker, "schedule", "cli-bad", "no spaces", "--every", "5", "x")
    failed(bad_name, 1, "sluice: BAD_REQUEST: client: invalid schedule name 'no spaces'")
    for usage in (["unschedule", "cli-bad"], ["trigger"], ["schedules", "a", "b"]):
        run = sluice(shared_broker, *usage)
        assert run.code == 2 and "usage: sluice" in run.err, (usage, run)
    with shared_broker.client() as client:
        assert client.schedules("cli-bad") == []


def test_configure_rate_limit_and_cap_with_dotted_keys_and_stats_shows_them(
    shared_broker: BrokerProcess,
) -> None:
    limited = ok(shared_broker, "configure", "cli-lim", "rate_limit.rate=10", "rate_limit.per=1")
    shown = rows(limited.out)
    assert [shown[f"rate_limit.{key}"][1] for key in ("rate", "per", "burst")] == ["10", "1", "10"]
    assert shown["max_in_flight"] == ["max_in_flight", "-"]
    # Two an hour: once the burst is taken, the next token is half an hour away.
    changes = ["rate_limit.rate=2", "rate_limit.per=3600", "max_in_flight=3", "--json"]
    settings = ok(shared_broker, "configure", "cli-lim", *changes).json()
    assert settings["rate_limit"] == {"rate": 2.0, "per": 3600.0, "burst": 2}
    assert settings["max_in_flight"] == 3
    with shared_broker.client() as client:
        client.put_many("cli-lim", [b"a", b"b", b"c", b"d"])
        assert len(client.reserve("cli-lim", max_messages=4)) == 2  # the burst
        assert client.reserve("cli-lim", max_messages=4, wait=0.05) == []  # parked, timed out
    stats = rows(ok(shared_broker, "stats", "cli-lim").out)
    assert stats["limits.tokens"][1:] == ["0"] and stats["limits.in_flight"][1:] == ["2"]
    assert stats["limits.max_in_flight"][1:] == ["3"] and stats["limits.parked_by_limit"][1:] == [
        "1"
    ]
    assert float(stats["limits.throttled_seconds"][1]) > 0
    limits = ok(shared_broker, "stats", "cli-lim", "--json").json()["limits"]
    assert limits["tokens"] == 0 and limits["in_flight"] == 2 and limits["parked_by_limit"] == 1

    off = ok(shared_broker, "configure", "cli-lim", "rate_limit=null", "max_in_flight=none")
    assert rows(off.out)["rate_limit"] == ["rate_limit", "-"]
    assert rows(off.out)["max_in_flight"] == ["max_in_flight", "-"]
    assert "limits" not in ok(shared_broker, "stats", "cli-lim", "--json").json()
    assert "limits." not in ok(shared_broker, "stats", "cli-lim").out
    with shared_broker.client() as client:
        assert len(client.reserve("cli-lim", max_messages=4)) == 2  # no limit holds them now

    for change, says in (
        ("rate_limit.rate=0", "rate_limit.rate must be in (0, "),
        ("rate_limit.burst=5", "rate_limit needs a rate"),
        ("rate_limit=fast", "rate_limit must be a map"),
        ("max_in_flight=0", "max_in_flight"),
    ):
        failed(
            sluice(shared_broker, "configure", "cli-lim", change), 1, f"sluice: BAD_REQUEST: {says}"
        )
    with shared_broker.client() as client:
        assert client.configure("cli-lim")["rate_limit"] is None


USAGE_ERRORS = (
    [],
    ["frobnicate"],
    ["status", "abc"],
    ["peek", "q", "--state", "gone"],
    ["put", "q"],
    ["put", "q", "x", "--header", "no-equals-sign"],
    ["dead", "q", "--limit", "0"],
    ["configure", "q", "paused"],
)


def test_errors_and_connection_options(shared_broker: BrokerProcess, refused_url: str) -> None:
    port = refused_url.rsplit(":", 1)[1]
    down = sluice(None, "queues", SLUICE_URL=refused_url)
    failed(down, 1, f"sluice: cannot connect to 127.0.0.1:{port} (connection refused)")
    assert "set --url or SLUICE_URL" in down.err
    # --url wins over SLUICE_URL, before or after the command, with or without the scheme.
    assert sluice(None, "--url", shared_broker.url, "queues", SLUICE_URL=refused_url).code == 0
    bare = f"{shared_broker.host}:{shared_broker.port}"
    assert sluice(None, "queues", "--url", bare, SLUICE_URL=refused_url).code == 0
    failed(sluice(None, "queues", "--url", "http://x"), 2, "sluice queues: error: bad --url")

    for usage in USAGE_ERRORS:
        run = sluice(shared_broker, *usage)
        assert run.code == 2 and "usage: sluice" in run.err, (usage, run)


def test_auth_token(tmp_path: Path) -> None:
    guarded = start_broker(tmp_path / "broker.log", "--auth-token", "s3cret")
    try:
        failed(sluice(guarded, "queues"), 1, "sluice: UNAUTHORIZED: ")
        assert sluice(guarded, "queues", SLUICE_AUTH_TOKEN="s3cret").code == 0
        assert sluice(guarded, "queues", "--auth-token", "s3cret").code == 0
    finally:
        stop_broker(guarded)


def test_fresh_broker_has_no_queues(broker: BrokerProcess) -> None:
    assert ok(broker, "queues").out.startswith("no queues yet")
    assert ok(broker, "stats").out.startswith("no queues yet")
    summed = ok(broker, "stats", "--json").json()
    assert summed["queues"] == [] and summed["all"]["ready"] == 0
    assert ok(broker, "queues", "--json").json() == []


def _run_on_terminal(broker: BrokerProcess, args: list[str], typed: bytes) -> Run:
    """Run the CLI with a pseudo-terminal as stdin on which ``typed`` was already typed."""
    leader, follower = pty.openpty()
    try:
        os.write(leader, typed)
        done = subprocess.run(
            [sys.executable, "-m", "client.cli", *args],
            cwd=REPO_ROOT,
            env=cli_env(SLUICE_URL=broker.url),
            stdin=follower,
            capture_output=True,
            timeout=RUN_TIMEOUT,
        )
    finally:
        os.close(follower)
        os.close(leader)
    return Run(done.returncode, done.stdout.decode(), done.stderr.decode())


def test_purge_asks_on_a_terminal(shared_broker: BrokerProcess) -> None:
    ok(shared_broker, "put", "cli-ask", "keep me")
    declined = _run_on_terminal(shared_broker, ["purge", "cli-ask"], b"n\n")
    assert declined.code == 1, declined
    assert "delete 1 ready or delayed message of 'cli-ask' for good? [y/N]" in declined.err
    assert "nothing deleted" in declined.err
    with shared_broker.client() as client:
        assert client.stats("cli-ask")["ready"] == 1
    accepted = _run_on_terminal(shared_broker, ["purge-dead", "cli-ask", "--json"], b"y\n")
    assert accepted.code == 0 and accepted.json() == {"purged": 0}, accepted


# ----------------------------------------------------------------------- watch


class Watch:
    """A running ``sluice watch`` whose stdout is read line by line (bounded waits)."""

    def __init__(self, broker: BrokerProcess, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "client.cli", "watch", *args],
            cwd=REPO_ROOT,
            env=cli_env(SLUICE_URL=broker.url),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_table(self) -> dict[str, list[str]]:
        """The next refresh (title line, then table rows up to the blank line)."""
        block = []
        while (line := self.lines.get(timeout=LINE_TIMEOUT)) != "":
            assert line is not None, "watch exited before its next refresh"
            block.append(line)
        assert block[0].startswith("sluice watch  sluice://"), block
        return rows("\n".join(block[1:]))

    def refresh_now(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()

    def finish(self) -> int:
        try:
            return self.process.wait(timeout=RUN_TIMEOUT)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()


def test_watch_shows_depth_and_rates_refresh_by_refresh(shared_broker: BrokerProcess) -> None:
    # The timer is set far beyond the test; each refresh comes from a line on stdin, sent
    # only after the test's puts and acks were confirmed, so every delta is known exactly.
    with shared_broker.client() as client:
        client.put_many("cli-watch", [b"a", b"b", b"c"])
        watch = Watch(shared_broker, "--count", "3", "--interval", "3600")
        try:
            first = watch.next_table()
            header = first["queue"]
            assert header[-2:] == ["put/s", "acked/s"]
            assert first["cli-watch"][header.index("ready")] == "3"
            assert first["cli-watch"][-2:] == ["-", "-"]  # no rate before a second sample

            client.put_many("cli-watch", [b"d", b"e", b"f", b"g"])
            client.ack(client.reserve("cli-watch", max_messages=2))
            watch.refresh_now()
            second = watch.next_table()
            assert second["cli-watch"][header.index("ready")] == "5"
            put_rate, acked_rate = map(float, second["cli-watch"][-2:])
            assert put_rate > 0 and acked_rate > 0
            assert float(second["(all)"][-2]) >= put_rate

            watch.refresh_now()
            third = watch.next_table()
            assert third["cli-watch"][-2:] == ["0.0", "0.0"]  # nothing changed in between
        finally:
            code = watch.finish()
    assert code == 0
    assert watch.lines.get(timeout=LINE_TIMEOUT) is None  # exactly three refreshes


def test_watch_on_its_timer_as_json_and_until_ctrl_c(shared_broker: BrokerProcess) -> None:
    ok(shared_broker, "put", "cli-watch-json", "x")
    run = ok(shared_broker, "watch", "--count", "3", "--interval", "0.05")
    assert run.out.count("sluice watch  sluice://") == 3 and run.out.endswith("\n\n")
    assert "\x1b[" not in run.out  # no screen control codes when stdout is not a terminal
    records = [
        json.loads(line)
        for line in ok(
            shared_broker, "watch", "--json", "--count", "2", "--interval", "0.05"
        ).out.splitlines()
    ]
    assert len(records) == 2
    assert all(q["rates"] is None for q in records[0]["queues"])
    named = {q["queue"]: q for q in records[1]["queues"]}
    assert named["cli-watch-json"]["rates"] == {"put": 0.0, "acked": 0.0}

    watch = Watch(shared_broker, "--interval", "3600")
    try:
        watch.next_table()
        watch.process.send_signal(signal.SIGINT)
    finally:
        code = watch.finish()
    assert code == 0


def test_watch_redraws_the_screen_on_a_terminal(shared_broker: BrokerProcess) -> None:
    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "client.cli", "watch", "--count", "1"],
            cwd=REPO_ROOT,
            env=cli_env(SLUICE_URL=shared_broker.url),
            stdin=subprocess.DEVNULL,
            stdout=follower,
            stderr=subprocess.PIPE,
        )
        os.close(follower)
        output = b""
        while select.select([leader], [], [], LINE_TIMEOUT)[0]:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's last writer exited
                break
            output += chunk
        assert process.wait(timeout=RUN_TIMEOUT) == 0
    finally:
        os.close(leader)
    assert output.startswith(b"\x1b[H\x1b[2Jsluice watch  sluice://"), output[:80]


# ------------------------------------------------------------------ help and docs


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help_with_examples(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "examples:" in help_text and f"sluice {command}" in help_text


def test_tool_help_and_readme_name_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## Admin CLI") :]
    for command in COMMANDS:
        assert f"    {command} " in help_text
        assert f"\nsluice {command}" in section, f"README has no example of sluice {command}"
    assert "SLUICE_URL" in help_text and "exit status" in help_text


# ---------------------------------------------------------------- text helpers


def test_setting_values_and_nested_keys() -> None:
    cases = {"none": None, "True": True, "3": 3, "2.5": 2.5, "[1]": [1], "fixed": "fixed"}
    assert {text: parse_value(text) for text in cases} == cases
    assert parse_settings(["backoff.type=fixed", "backoff.delay=2", "paused=false"]) == {
        "backoff": {"type": "fixed", "delay": 2},
        "paused": False,
    }
    for bad in (["x"], ["=1"], ["a..b=1"], ["backoff=1", "backoff.delay=2"], ["j={oops"]):
        with pytest.raises(UsageError):
            parse_settings(bad)


def test_times_typed_for_a_schedule_and_shown_in_its_zone() -> None:
    berlin = "Europe/Berlin"
    assert parse_time("1900000000.5", berlin) == 1900000000.5
    assert parse_time("2030-01-15", berlin) == local(berlin, 2030, 1, 15, 0, 0)
    assert parse_time("2030-07-01T09:30", berlin) == local(berlin, 2030, 7, 1, 9, 30)
    assert parse_time("2030-07-01T09:30Z", berlin) == local("UTC", 2030, 7, 1, 9, 30)
    assert parse_time("2030-07-01T09:30-04:00", "UTC") == local("UTC", 2030, 7, 1, 13, 30)
    assert parse_time("2030-07-01T09:30Z", "No/Where") == local("UTC", 2030, 7, 1, 9, 30)
    for bad, zone in (
        ("soon", "UTC"),
        ("inf", "UTC"),
        ("2030-13-01", "UTC"),
        ("2030-01-01", "No/Where"),
    ):
        with pytest.raises(UsageError):
            parse_time(bad, zone)
    assert zoned_time(local("UTC", 2030, 10, 27, 0, 30), berlin) == "2030-10-27 02:30:00 CEST"
    assert zoned_time(local("UTC", 2030, 10, 27, 1, 30), berlin) == "2030-10-27 02:30:00 CET"
    assert zoned_time(0, "No/Where") == "1970-01-01 00:00:00Z" and zoned_time(None, "UTC") == "-"


def test_body_preview_and_table() -> None:
    assert body_preview(b"") == "(empty)"
    assert body_preview(b"line\tone\n") == "line\\tone\\n"
    assert body_preview(("é" * 50).encode()) == "é" * 37 + "..."
    assert body_preview(bytes(range(30))) == "hex:" + bytes(range(16)).hex() + "..."
    assert table(["name", "n"], [["a", 1], ["bb", None]]).splitlines() == [
        "name  n",
        "a     1",
        "bb    -",
    ]


def test_status_of_a_done_message_shows_its_time_and_result_for_people(
    shared_broker: BrokerProcess,
) -> None:
    with shared_broker.client() as client:
        message_id = client.put("cli-done", b"job")
        (message,) = client.reserve("cli-done")
        client.ack(message, result={"sent_to": "ada@example.com"})
        (binary,) = [client.put("cli-done", b"other")]
        (leased,) = client.reserve("cli-done")
        client.ack(leased, result=b"\xff\x00")
        never = message_id + 10_000_000
    done = rows(ok(shared_broker, "status", str(message_id)).out)
    assert done["state"] == ["state", "done"]
    assert done["result"] == ["result", '{"sent_to":', '"ada@example.com"}']
    assert "ago" in " ".join(done["done_at"]) or "UTC" in " ".join(done["done_at"])
    assert rows(ok(shared_broker, "status", str(binary)).out)["result"] == [
        "result",
        "2",
        "bytes:",
        "ff00",
    ]
    gone = sluice(shared_broker, "status", str(never))
    failed(gone, 1, f"sluice: NOT_FOUND: no message {never}: no put has made it yet")
