"""The daemon's structured logs: ``--log-format json`` gives one JSON object per stderr line
with the event's fields; ``--log-format text`` keeps one human line per event.

Each test drives a real broker through the events that matter (a client connects, names
itself, has two messages dead-lettered, goes away), stops it, and reads its whole log.
"""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path
from typing import Any

from broker._logging import JsonFormatter, event
from client import Client
from tests.conftest import BrokerProcess, start_broker, stop_broker

QUEUE = "logs.jobs"
TOKEN = "s3cret-token-for-logs"
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) sluice[\w.]*: "
)


def dead_letter_two(client: Client) -> tuple[int, int]:
    """One message buried, one nacked past its max_attempts; returns their ids."""
    buried = client.put(QUEUE, b"bad address", headers={"correlation_id": "order-17"})
    exhausted = client.put(
        QUEUE, b"flaky", max_attempts=1, headers={"correlation-id": "order-18", "tenant": "acme"}
    )
    first, second = client.reserve(QUEUE, max_messages=2)
    assert (first.id, second.id) == (buried, exhausted)
    client.bury(first, reason="no such mailbox")
    client.nack(second, error="SMTP timeout")
    return buried, exhausted


def run_scenario(broker: BrokerProcess, client_name: str) -> tuple[int, int]:
    with broker.client(client_name=client_name, auth_token=TOKEN) as client:
        ids = dead_letter_two(client)
    stop_broker(broker)  # the log is complete once the broker has exited
    return ids


def json_lines(broker: BrokerProcess) -> list[dict[str, Any]]:
    lines = broker.log().splitlines()
    assert lines, "the broker logged nothing"
    parsed = []
    for line in lines:
        record = json.loads(line)  # every line is one JSON object
        assert isinstance(record, dict), line
        for key in ("ts", "level", "logger", "event", "msg"):
            assert key in record, f"{key!r} missing from {line}"
        assert ISO_UTC.match(record["ts"]), record["ts"]
        parsed.append(record)
    return parsed


def events(records: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [record for record in records if record["event"] == name]


def only(records: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = events(records, name)
    assert len(found) == 1, f"expected one {name!r} event, got {found}"
    return found[0]


def test_json_log_has_every_event_with_its_fields(tmp_path: Path) -> None:
    broker = start_broker(tmp_path / "broker.log", "--log-format", "json", "--auth-token", TOKEN)
    buried, exhausted = run_scenario(broker, "billing-worker-1")
    records = json_lines(broker)
    assert TOKEN not in broker.log(), "the auth token must never be logged"

    start = only(records, "start")
    assert start["settings"]["auth_token"] == "set" and start["pid"] > 0
    assert only(records, "recovered")["messages"] == 0
    listening = only(records, "listening")
    assert listening["port"] == broker.port and listening["metrics"] == "off"

    # One line per connection at info, when it closes, with everything the others had.
    assert events(records, "connection_opened") == events(records, "hello") == []
    closed = only(records, "connection_closed")
    assert closed["client"] == "billing-worker-1" and closed["peer"].startswith("127.0.0.1:")
    assert closed["requests"] == 6  # hello, two puts, reserve, bury, nack
    assert closed["level"] == "info" and closed["connection_id"] > 0

    dead = {record["id"]: record for record in events(records, "dead_letter")}
    assert set(dead) == {buried, exhausted}
    assert dead[buried]["queue"] == QUEUE and dead[buried]["reason"] == "no such mailbox"
    assert dead[buried]["correlation_id"] == "order-17" and dead[buried]["attempts"] == 1
    assert dead[exhausted]["reason"] == "max_attempts (1) used up"
    assert dead[exhausted]["correlation_id"] == "order-18"

    only(records, "shutdown")
    assert records[-1]["event"] == "stopped"
    per_message = {"dead_letter"}
    info_events = {r["event"] for r in records if r["level"] == "info"}
    fd_limit = only(records, "fd_limit")
    assert fd_limit["connections"] == fd_limit["soft"] - 64 and fd_limit["hard"] >= 1
    assert info_events - per_message == {
        "start",
        "fd_limit",
        "recovering",
        "recovered",
        "listening",
        "connection_closed",
        "shutdown",
        "stopped",
    }, "no per-message lines at info level but dead letters"


def test_debug_log_also_has_each_connection_opening_and_its_hello(tmp_path: Path) -> None:
    broker = start_broker(tmp_path / "broker.log", "--log-format", "json", "--log-level", "debug")
    with broker.client(client_name="mailer-2") as client:
        client.ping()
    stop_broker(broker)
    records = json_lines(broker)
    opened = only(records, "connection_opened")
    assert opened["peer"].startswith("127.0.0.1:") and opened["level"] == "debug"
    hello = only(records, "hello")
    assert hello["client"] == "mailer-2" and hello["level"] == "debug"
    assert hello["connection_id"] == opened["connection_id"]
    closed = only(records, "connection_closed")
    assert closed["connection_id"] == opened["connection_id"] and closed["peer"] == opened["peer"]


def test_text_log_keeps_one_line_per_event(tmp_path: Path) -> None:
    broker = start_broker(tmp_path / "broker.log", "--log-format", "text", "--auth-token", TOKEN)
    buried, _ = run_scenario(broker, "evil\nname")
    lines = broker.log().splitlines()
    for line in lines:
        assert TEXT_LINE.match(line), f"not a one-line log entry: {line!r}"
    assert TOKEN not in broker.log()
    dead = [line for line in lines if "dead letter" in line]
    assert len(dead) == 2
    assert f"message {buried} of {QUEUE}" in dead[0] and "correlation id order-17" in dead[0]
    assert any(r"(evil\nname) closed after" in line for line in lines), "names stay on one line"
    assert any("listening on" in line for line in lines)
    assert sum("closed after" in line for line in lines) == 1


def test_json_formatter_keeps_a_traceback_on_the_same_line() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("sluice.test-json")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            logger.exception("it failed", extra=event("internal_error", op="put"))
        logger.warning("no event named here")
    finally:
        logger.removeHandler(handler)
    first, second = stream.getvalue().splitlines()
    record = json.loads(first)
    assert record["event"] == "internal_error" and record["op"] == "put"
    assert record["level"] == "error" and "ValueError: boom" in record["exc"]
    assert json.loads(second)["event"] == "log"
