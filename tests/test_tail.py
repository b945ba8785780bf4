"""``sluice tail`` as a subprocess against a real broker: text and JSON lines, --queue and
patterns, --from-seq replay, the gap line, Ctrl-C, and bad input."""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from client._cli_parser import build_parser
from client._cli_tail import tail

from .conftest import REPO_ROOT, BrokerProcess, start_broker, stop_broker
from .test_cli import RUN_TIMEOUT, cli_env, failed, ok, sluice

LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}Z #(?P<seq>\d+) (?P<queue>\S+) (?P<event>\w+)"
    r"(?: id=(?P<id>\d+) attempts=(?P<attempts>\d+))?(?P<fields>.*)$"
)


def test_lines_of_one_queue_from_a_seq(broker: BrokerProcess) -> None:
    with broker.client() as client:
        client.put("tail.other", b"not shown")
        start = client.subscribe("queue.>").next_seq
        assert start is not None
        job = client.put("tail.one", b"x", priority=3)
        client.put("tail.one.more", b"a queue whose name goes on: not shown")
        (message,) = client.reserve("tail.one")
        client.nack(message, delay=0, error="flaky disk")
        (message,) = client.reserve("tail.one")
        client.ack(message)
    run = ok(broker, "tail", "--queue", "tail.one", "--from-seq", str(start), "--count", "5")
    lines = [LINE.match(line) for line in run.out.splitlines()]
    assert all(lines), run.out
    assert [(m["event"], m["id"], m["attempts"]) for m in lines if m] == [
        ("put", str(job), "0"),
        ("reserved", str(job), "1"),
        ("nacked", str(job), "1"),
        ("reserved", str(job), "2"),
        ("acked", str(job), "2"),
    ]
    first, nacked = lines[0], lines[2]
    assert first and int(first["seq"]) == start and first["fields"] == " delay=0.0 priority=3"
    assert nacked and nacked["fields"] == " delay=0.0 error='flaky disk'"


def test_json_lines(broker: BrokerProcess) -> None:
    with broker.client() as client:
        client.subscribe("queue.>")  # someone watches: the broker keeps the events
        job = client.put("tail_json", b"x")
        client.pause("tail_json")
    run = ok(
        broker,
        "tail",
        "queue.*.admin",
        "queue.tail_json.put",
        "--json",
        "--from-seq",
        "0",
        "--count",
        "2",
    )
    events = [json.loads(line) for line in run.out.splitlines()]
    assert [(e["event"], e["id"], e["queue"]) for e in events] == [
        ("put", job, "tail_json"),
        ("paused", None, "tail_json"),
    ]
    assert events[0]["seq"] + 1 == events[1]["seq"] and events[0]["priority"] == 0


def test_a_gap_line_when_the_ring_has_moved_on(tmp_path: Path) -> None:
    broker = start_broker(tmp_path / "broker.log", "--event-buffer", "1000")
    try:
        with broker.client() as client:
            client.subscribe("queue.>")
            client.put_many("tail.gap", [b"x"] * 1200)
        run = ok(broker, "tail", "--from-seq", "1", "--count", "2")
        gap, first = run.out.splitlines()
        assert gap.startswith("gap: events 1-200 are gone") and "going on from 201" in gap
        match = LINE.match(first)
        assert match and match["seq"] == "201" and match["event"] == "put"
    finally:
        stop_broker(broker)


def test_ctrl_c_ends_it_quietly(broker: BrokerProcess) -> None:
    with broker.client() as client:
        client.subscribe("queue.>")
        client.put("tail.int", b"x")
    process = subprocess.Popen(
        [sys.executable, "-m", "client.cli", "tail", "--from-seq", "0"],
        cwd=REPO_ROOT,
        env=cli_env(SLUICE_URL=broker.url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert " tail.int put " in process.stdout.readline()  # subscribed, and printing
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=RUN_TIMEOUT) == 0
        assert process.stderr is not None and process.stderr.read() == ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_bad_input(broker: BrokerProcess) -> None:
    for bad, why in (("-1", "must be 0 or more"), ("soon", "expected a seq")):
        run = sluice(broker, "tail", "--from-seq", bad)
        assert run.code == 2 and f"argument --from-seq: {why}" in run.err, run
    failed(
        sluice(broker, "tail", "--from-seq", "99999999"),
        1,
        "sluice: BAD_REQUEST: subscribe: from_seq",
    )
    failed(sluice(broker, "tail", "a..b"), 1, "sluice: BAD_REQUEST: subscribe: invalid pattern")
    help_text = ok(broker, "tail", "--help").out
    assert "queue.<queue>.<event>" in help_text and "--from-seq" in help_text


def test_falling_behind_ends_it_saying_where_to_go_on(
    broker: BrokerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    with broker.client() as client:
        client.subscribe("queue.nothing.*")
        client.put_many("tail.behind", [b"x"] * 3)
        monkeypatch.setattr("client._channels.MAX_INBOX", 0)  # the first event overflows it
        args = build_parser().parse_args(["tail", "--from-seq", "2", "--count", "5"])
        out, err = io.StringIO(), io.StringIO()
        assert tail(client, args, out, err) == 1
    assert out.getvalue() == ""
    assert err.getvalue() == (
        "sluice tail: fell behind at event 2 after 0 lines; go on with --from-seq 2\n"
    )
