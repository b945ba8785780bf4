"""The audit log against a real broker: an ``audit`` event for every admin op and every
FORBIDDEN refusal, in the broker's JSON log and in the ``--audit-log`` file, and none for
reads and puts."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker._audit import ADMIN_OPS
from broker._auth import PERMISSIONS
from tests.conftest import (
    REPO_ROOT,
    BrokerProcess,
    RawConnection,
    error_code,
    start_broker,
    stop_broker,
)
from tests.test_auth import connect, principal_toml, wait_for_log

ROOT_TOKEN = "audit-root"
OPS_TOKEN = "audit-ops"  # every verb on audit.*
READER_TOKEN = "audit-reader"  # read on audit.*
WIRE_PEER = re.compile(r"127\.0\.0\.1:\d+")


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    directory = tmp_path_factory.mktemp("audit")
    auth = directory / "auth.toml"
    verbs = ["produce", "consume", "read", "admin"]
    auth.write_text(
        principal_toml("ops", OPS_TOKEN, [("audit.*", verbs)])
        + principal_toml("reader", READER_TOKEN, [("audit.*", ["read"])])
    )
    running = start_broker(
        directory / "broker.log",
        "--in-memory",
        "--log-format",
        "json",
        "--auth-file",
        str(auth),
        "--auth-token",
        ROOT_TOKEN,
        "--audit-log",
        str(directory / "audit.log"),
        http=True,
    )
    yield running
    stop_broker(running)


@pytest.fixture(scope="module")
def ops(audited: BrokerProcess) -> Iterator[RawConnection]:
    with connect(audited, OPS_TOKEN) as connection:
        yield connection


def audit_file(broker: BrokerProcess) -> Path:
    return broker.log_path.parent / "audit.log"


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def audit_events(broker: BrokerProcess, **match: Any) -> tuple[list[Any], list[Any]]:
    """The audit events matching ``match``: in the broker's log, and in the audit file."""

    def matching(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            line
            for line in lines
            if line.get("event") == "audit" and all(line.get(k) == v for k, v in match.items())
        ]

    in_file = matching(json_lines(audit_file(broker).read_text()))
    return matching(json_lines(broker.log())), in_file


def the_event(broker: BrokerProcess, **match: Any) -> dict[str, Any]:
    """The one audit event matching ``match``, the same in the log and the file."""
    in_log, in_file = audit_events(broker, **match)
    assert len(in_log) == 1, f"{match}: audit events in the log: {in_log}"
    assert len(in_file) == 1, f"{match}: audit events in the file: {in_file}"
    assert in_log[0]["ts"] == in_file[0]["ts"] and in_log[0]["msg"] == in_file[0]["msg"]
    return dict(in_file[0])


def put(connection: RawConnection, queue: str, count: int = 1) -> list[int]:
    messages = [{"body": b"secret body"} for _ in range(count)]
    return list(connection.call("put", {"queue": queue, "messages": messages})["ids"])


def dead_one(connection: RawConnection, queue: str) -> None:
    put(connection, queue)
    (message,) = connection.call("reserve", {"queues": [queue]})["messages"]
    connection.call("bury", {"id": message["id"], "lease": message["lease"]})


def scheduled(connection: RawConnection, queue: str) -> None:
    connection.call("schedule", {"queue": queue, "name": "s", "every": 3600, "body": b"s"})


def bound(connection: RawConnection, queue: str) -> None:
    connection.call("bind", {"pattern": "audit.ch", "queue": queue})


Prepare = Callable[[RawConnection, str], dict[str, Any]]

# op -> (prepare the queue and give the op's arguments, what the event says it changed)
ADMIN_CASES: dict[str, tuple[Prepare, dict[str, Any]]] = {
    "configure": (
        lambda c, q: {"queue": q, "settings": {"max_attempts": 3}},
        {"settings": {"max_attempts": 3}},
    ),
    "pause": (lambda c, q: {"queue": q}, {}),
    "resume": (lambda c, q: {"queue": q} if c.call("pause", {"queue": q}) else {}, {}),
    "purge": (lambda c, q: {"queue": q} if put(c, q, 2) else {}, {"purged": 2}),
    "replay": (lambda c, q: dead_one(c, q) or {"queue": q}, {"replayed": 1}),
    "purge_dead": (lambda c, q: dead_one(c, q) or {"queue": q}, {"purged": 1}),
    "cancel": (lambda c, q: {"id": put(c, q)[0]}, {"cancelled": True}),
    "schedule": (
        lambda c, q: {"queue": q, "name": "s", "every": 60, "body": b"secret body"},
        {"name": "s", "every": 60},
    ),
    "unschedule": (
        lambda c, q: scheduled(c, q) or {"queue": q, "name": "s"},
        {"name": "s", "removed": True},
    ),
    "trigger": (lambda c, q: scheduled(c, q) or {"queue": q, "name": "s"}, {"name": "s"}),
    "bind": (
        lambda c, q: {"pattern": "audit.ch", "queue": q},
        {"pattern": "audit.ch", "bound": True},
    ),
    "unbind": (
        lambda c, q: bound(c, q) or {"pattern": "audit.ch", "queue": q},
        {"pattern": "audit.ch", "unbound": True},
    ),
    "delete_queue": (
        lambda c, q: {"queue": q, "force": True} if put(c, q, 2) else {},
        {"force": True, "deleted": True, "messages": 2, "schedules": 0, "bindings": 0},
    ),
}


def test_the_cases_are_every_admin_op() -> None:
    admin = {op for op, (verb, _) in PERMISSIONS.items() if verb == "admin"}
    assert ADMIN_OPS == admin == set(ADMIN_CASES)


@pytest.mark.parametrize("op", sorted(ADMIN_CASES))
def test_every_admin_op_is_audited(audited: BrokerProcess, ops: RawConnection, op: str) -> None:
    prepare, changed = ADMIN_CASES[op]
    queue = f"audit.{op}"
    args = prepare(ops, queue)
    result = ops.call(op, args)
    target = {"id": args["id"]} if op == "cancel" else {"queue": queue}
    line = the_event(audited, op=op, **target)
    assert line["principal"] == "ops" and WIRE_PEER.fullmatch(line["peer"])
    assert line["outcome"] == "ok" and line["level"] == "info"
    if op == "trigger":
        changed = changed | {"id": result["id"]}
    assert line["changed"] == changed
    assert "secret" not in json.dumps(line)  # bodies are never audited


def test_a_failed_admin_op_is_audited_with_its_code(
    audited: BrokerProcess, ops: RawConnection
) -> None:
    bad = {"queue": "audit.bad", "settings": {"max_attempts": -1}}
    assert error_code(ops.request("configure", bad)) == "BAD_REQUEST"
    line = the_event(audited, op="configure", queue="audit.bad")
    assert line["outcome"] == "BAD_REQUEST" and line["level"] == "warning"
    assert line["changed"] == {"settings": {"max_attempts": -1}}


def test_the_auth_token_is_named(audited: BrokerProcess) -> None:
    with connect(audited, ROOT_TOKEN) as root:
        root.call("pause", {"queue": "elsewhere.root"})
    assert the_event(audited, op="pause", queue="elsewhere.root")["principal"] == "auth-token"


def test_a_refusal_is_audited_with_its_principal(audited: BrokerProcess) -> None:
    with connect(audited, READER_TOKEN) as reader:
        assert error_code(reader.request("purge", {"queue": "audit.refused"})) == "FORBIDDEN"
        refused_put = {"queue": "audit.refused-put", "messages": [{"body": b"x"}]}
        assert error_code(reader.request("put", refused_put)) == "FORBIDDEN"
    line = the_event(audited, op="purge", queue="audit.refused")
    assert line["principal"] == "reader" and WIRE_PEER.fullmatch(line["peer"])
    assert line["outcome"] == "FORBIDDEN" and line["changed"]["verb"] == "admin"
    line = the_event(audited, op="put", queue="audit.refused-put")  # not admin, but refused
    assert line["outcome"] == "FORBIDDEN" and line["changed"]["verb"] == "produce"


def test_reads_and_puts_are_not_audited(audited: BrokerProcess, ops: RawConnection) -> None:
    queue = "audit.quiet"
    (message_id,) = put(ops, queue)
    ops.call("stats", {"queue": queue})
    ops.call("peek", {"queue": queue})
    ops.call("status", {"id": message_id})
    (message,) = ops.call("reserve", {"queues": [queue]})["messages"]
    ops.call("ack", {"items": [[message["id"], message["lease"]]]})
    assert audit_events(audited, queue=queue) == ([], [])
    assert audit_events(audited, id=message_id) == ([], [])
    ops.call("pause", {"queue": queue})  # the one event of this queue
    assert the_event(audited, queue=queue)["op"] == "pause"


def test_an_http_admin_post_is_audited(audited: BrokerProcess, ops: RawConnection) -> None:
    put(ops, "audit.http")
    request = urllib.request.Request(
        f"{audited.http}/api/v1/queues/audit.http/purge",
        method="POST",
        data=b"",
        headers={"X-Sluice-Request": "1", "Authorization": f"Bearer {OPS_TOKEN}"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
    line = the_event(audited, op="purge", queue="audit.http")
    assert line["principal"] == "ops" and line["peer"] == "127.0.0.1"
    assert line["outcome"] == "ok" and line["changed"] == {"purged": 1}


def http_status(broker: BrokerProcess, method: str, path: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(
        f"{broker.http}/api/v1{path}", method=method, data=b"" if method == "POST" else None
    )
    for name, value in headers.items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.parametrize(
    ("name", "method", "headers", "status", "reason", "principal"),
    [
        (
            "csrf",
            "POST",
            {"Authorization": f"Bearer {OPS_TOKEN}"},
            403,
            "no X-Sluice-Request header",
            "(unknown)",
        ),
        ("no-token", "POST", {"X-Sluice-Request": "1"}, 401, "no token", "(unknown)"),
        (
            "wrong",
            "POST",
            {"X-Sluice-Request": "1", "Authorization": "Bearer nope"},
            403,
            "wrong token",
            "(unknown)",
        ),
        ("read", "GET", {}, 401, "no token", "(unknown)"),
    ],
)
def test_http_refusals_before_the_op_are_audited(
    audited: BrokerProcess,
    name: str,
    method: str,
    headers: dict[str, str],
    status: int,
    reason: str,
    principal: str,
) -> None:
    queue = f"audit.http-{name}"
    path = f"/queues/{queue}/purge" if method == "POST" else f"/queues/{queue}"
    assert http_status(audited, method, path, headers) == status
    route = f"{method} /api/v1{path}"
    line = the_event(audited, route=route)
    assert line["principal"] == principal and line["peer"] == "127.0.0.1"
    assert line["reason"] == reason and line["level"] == "warning"
    assert line["outcome"] == ("UNAUTHORIZED" if status == 401 else "FORBIDDEN")
    assert "nope" not in json.dumps(line) and OPS_TOKEN not in json.dumps(line)  # no token


def test_a_broker_wide_http_read_refused_is_audited_with_its_principal(
    audited: BrokerProcess,
) -> None:
    headers = {"Authorization": f"Bearer {READER_TOKEN}"}  # read on audit.* only
    assert http_status(audited, "GET", "/connections", headers) == 403
    line = the_event(audited, route="GET /api/v1/connections")
    assert line["principal"] == "reader" and line["outcome"] == "FORBIDDEN"
    assert line["reason"] == "read on every queue needed"


def test_sighup_reopens_the_audit_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    running = start_broker(tmp_path / "broker.log", "--in-memory", "--audit-log", str(path))
    try:
        with running.raw() as connection:
            connection.call("pause", {"queue": "before"})
            os.rename(path, tmp_path / "audit.log.1")
            running.process.send_signal(signal.SIGHUP)
            wait_for_log(running, "reopened", 1)
            connection.call("pause", {"queue": "after"})
    finally:
        stop_broker(running)
    (before,) = json_lines((tmp_path / "audit.log.1").read_text())
    (after,) = json_lines(path.read_text())
    assert before["queue"] == "before" and after["queue"] == "after"
    assert after["principal"] == "-"  # the broker checks nothing
    assert "audit: - from" in running.log()  # the text log carries the event too


def test_an_audit_log_that_cannot_be_opened_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "audit.log"
    command = [sys.executable, "-m", "broker", "--in-memory", "--port", "0"]
    finished = subprocess.run(
        [*command, "--http-port", "0", "--audit-log", str(path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert finished.returncode == 1
    assert f"cannot open the audit log {path}" in finished.stderr
    assert "listening" not in finished.stdout and "Traceback" not in finished.stderr
