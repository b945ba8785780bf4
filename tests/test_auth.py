"""Principals and permissions against a real broker with an ``--auth-file``: every op
allowed for the principal holding its verb and refused (changing nothing) for the others,
globs, queue creation, multi-queue ops, the HTTP API, and SIGHUP reloads good and bad."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker._auth import PERMISSIONS, AuthFileError, Grant, Principal, parse_auth_file
from broker._handlers import HANDLERS
from tests.conftest import (
    REPO_ROOT,
    BrokerProcess,
    RawConnection,
    error_code,
    start_broker,
    stop_broker,
)

ROOT_TOKEN = "root-token"  # --auth-token: every right
TOKENS = {verb: f"{verb}-token" for verb in ("produce", "consume", "read", "admin")}
MIXED_TOKEN = "mixed-token"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def principal_toml(name: str, token: str, grants: list[tuple[str, list[str]]]) -> str:
    rows = ",\n".join(
        f'  {{ queues = "{glob}", allow = {json.dumps(allow)} }}' for glob, allow in grants
    )
    return (
        f'[[principal]]\nname = "{name}"\ntoken_sha256 = "{digest(token)}"\ngrants = [\n{rows}\n]\n'
    )


def auth_file_text(extra: str = "") -> str:
    parts = [principal_toml(verb, token, [("jobs.*", [verb])]) for verb, token in TOKENS.items()]
    parts.append(
        principal_toml(
            "mixed",
            MIXED_TOKEN,
            [("mix.?", ["produce", "consume"]), ("set.[ab]*", ["read"]), ("exact", ["read"])],
        )
    )
    return "\n".join(parts) + extra


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_suffix(".new")
    temporary.write_text(text)
    os.replace(temporary, path)


@pytest.fixture(scope="module")
def auth_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "auth.toml"
    path.write_text(auth_file_text())
    return path


@pytest.fixture(scope="module")
def secured(auth_path: Path) -> Iterator[BrokerProcess]:
    running = start_broker(
        auth_path.parent / "broker.log",
        "--in-memory",
        "--auth-file",
        str(auth_path),
        "--auth-token",
        ROOT_TOKEN,
        http=True,
    )
    yield running
    stop_broker(running)


def connect(broker: BrokerProcess, token: str) -> RawConnection:
    connection = RawConnection(broker.host, broker.port)
    connection.call("hello", {"version": 1, "client": "auth-test", "token": token})
    return connection


@pytest.fixture(scope="module")
def root(secured: BrokerProcess) -> Iterator[RawConnection]:
    with connect(secured, ROOT_TOKEN) as connection:
        yield connection


@pytest.fixture(scope="module")
def principals(secured: BrokerProcess) -> Iterator[dict[str, RawConnection]]:
    connections = {verb: connect(secured, token) for verb, token in TOKENS.items()}
    yield connections
    for connection in connections.values():
        connection.close()


# ----------------------------------------------------------------- the op table

Setup = Callable[[RawConnection, str], dict[str, Any]]


def put_one(root: RawConnection, queue: str) -> int:
    (message_id,) = root.call("put", {"queue": queue, "messages": [{"body": b"m"}]})["ids"]
    return int(message_id)


def leased(root: RawConnection, queue: str) -> tuple[int, int]:
    put_one(root, queue)
    (message,) = root.call("reserve", {"queues": [queue]})["messages"]
    return message["id"], message["lease"]


def with_schedule(root: RawConnection, queue: str) -> dict[str, Any]:
    root.call("schedule", {"queue": queue, "name": "s", "every": 3600, "body": b"s"})
    return {"queue": queue, "name": "s"}


def _lease_args(root: RawConnection, queue: str, **extra: Any) -> dict[str, Any]:
    message_id, lease = leased(root, queue)
    return {"id": message_id, "lease": lease, **extra}


def _items(root: RawConnection, queue: str) -> dict[str, Any]:
    return {"items": [list(leased(root, queue))]}


CASES: dict[str, Setup] = {
    "put": lambda root, q: {"queue": q, "messages": [{"body": b"p"}]},
    "put_and_wait": lambda root, q: {"queue": q, "message": {"body": b"w"}, "timeout": 0.01},
    "result": lambda root, q: {"id": put_one(root, q)},
    "progress": lambda root, q: _lease_args(root, q, percent=50),
    "reserve": lambda root, q: {"queues": [q]} if put_one(root, q) else {},
    "ack": _items,
    "nack": _items,
    "touch": _lease_args,
    "bury": _lease_args,
    "cancel": lambda root, q: {"id": put_one(root, q)},
    "status": lambda root, q: {"id": put_one(root, q)},
    "stats": lambda root, q: {"queue": q} if put_one(root, q) else {},
    "configure": lambda root, q: {"queue": q, "settings": {"max_attempts": 3}},
    "pause": lambda root, q: {"queue": q},
    "resume": lambda root, q: {"queue": q} if root.call("pause", {"queue": q}) else {},
    "purge": lambda root, q: {"queue": q} if put_one(root, q) else {},
    "dead_letters": lambda root, q: {"queue": q} if put_one(root, q) else {},
    "peek": lambda root, q: {"queue": q} if put_one(root, q) else {},
    "replay": lambda root, q: {"queue": q} if put_one(root, q) else {},
    "purge_dead": lambda root, q: {"queue": q} if put_one(root, q) else {},
    "delete_queue": lambda root, q: {"queue": q, "force": True} if put_one(root, q) else {},
    "schedule": lambda root, q: {"queue": q, "name": "s", "every": 60, "body": b"s"},
    "unschedule": with_schedule,
    "schedules": lambda root, q: {"queue": q} if with_schedule(root, q) else {},
    "trigger": with_schedule,
    "publish": lambda root, q: {"channel": q, "data": b"d"},
    "subscribe": lambda root, q: {"patterns": [q]},
    "bind": lambda root, q: {"pattern": "auth.*", "queue": q},
    "unbind": lambda root, q: (
        {"pattern": "auth.*", "queue": q}
        if root.call("bind", {"pattern": "auth.*", "queue": q})
        else {}
    ),
}


def snapshot(root: RawConnection, queue: str, args: dict[str, Any]) -> Any:
    """What a refused request must leave as it was: the queues, the queue's schedules and
    the state of the message it names."""
    ids = [args["id"]] if "id" in args else [item[0] for item in args.get("items", [])]
    return (
        root.call("queues", {}),
        root.call("schedules", {"queue": queue}),
        [root.call("status", {"id": message_id}) for message_id in ids],
    )


def test_every_op_is_in_the_permission_table_and_in_this_test() -> None:
    assert set(HANDLERS) <= set(PERMISSIONS)
    assert set(CASES) | {"ping", "queues", "unsubscribe", "bindings"} == set(HANDLERS)


@pytest.mark.parametrize("op", sorted(CASES))
def test_op_allowed_for_its_verb_and_refused_otherwise(
    op: str, root: RawConnection, principals: dict[str, RawConnection]
) -> None:
    verb = PERMISSIONS[op][0]
    for other in sorted(set(principals) - {verb}):
        queue = f"jobs.{op}.{other}"
        args = CASES[op](root, queue)
        before = snapshot(root, queue, args)
        reply = principals[other].request(op, args)
        assert error_code(reply) == "FORBIDDEN", (op, other, reply)
        assert reply[2]["details"]["verb"] == verb and reply[2]["details"]["queue"] == queue
        assert f"may not {verb} on queue {queue!r}" in reply[2]["message"]
        assert snapshot(root, queue, args) == before, f"refused {op} by {other} changed state"

    # The right verb, but on a queue outside its glob.
    outside = f"other.{op}"
    args = CASES[op](root, outside)
    before = snapshot(root, outside, args)
    assert error_code(principals[verb].request(op, args)) == "FORBIDDEN"
    assert snapshot(root, outside, args) == before

    allowed = principals[verb].request(op, CASES[op](root, f"jobs.{op}.ok"))
    assert allowed[1] is True, (op, allowed)


def test_broker_wide_reads_show_only_what_the_principal_may_read(
    root: RawConnection, principals: dict[str, RawConnection]
) -> None:
    put_one(root, "jobs.listed")
    put_one(root, "other.listed")
    with_schedule(root, "jobs.listed")
    with_schedule(root, "other.listed")
    names = {q["name"] for q in principals["read"].call("queues", {})["queues"]}
    assert "jobs.listed" in names and not any(n.startswith("other.") for n in names)
    everything = {q["name"] for q in root.call("queues", {})["queues"]}
    assert "other.listed" in everything
    schedules = principals["read"].call("schedules", {})["schedules"]
    assert {s["queue"] for s in schedules} >= {"jobs.listed"}
    assert all(s["queue"].startswith("jobs.") for s in schedules)
    root.call("bind", {"pattern": "listed.*", "queue": "jobs.listed"})
    root.call("bind", {"pattern": "listed.*", "queue": "other.listed"})
    bound = principals["read"].call("bindings", {})["bindings"]
    assert {"pattern": "listed.*", "queue": "jobs.listed"} in bound
    assert all(b["queue"].startswith("jobs.") for b in bound)
    assert len(root.call("bindings", {})["bindings"]) > len(bound)
    for verb in ("produce", "consume", "admin"):
        assert error_code(principals[verb].request("queues", {})) == "FORBIDDEN"
        assert error_code(principals[verb].request("schedules", {})) == "FORBIDDEN"
        assert error_code(principals[verb].request("bindings", {})) == "FORBIDDEN"
    for verb in ("produce", "consume", "read", "admin"):  # no verb needed: its own
        reply = principals[verb].request("unsubscribe", {"subscription": 12345})
        assert reply[1:] == [True, {"unsubscribed": False}], reply
    for connection in principals.values():
        assert connection.call("ping", {})["time"] > 0


def test_consume_only_may_reserve_on_a_queue_not_made_and_leaves_none(
    root: RawConnection, principals: dict[str, RawConnection]
) -> None:
    """A reserve that finds nothing leaves no queue behind (an unused queue is
    forgotten), so a consumer whose queue drained can reserve there again."""
    reply = principals["consume"].request("reserve", {"queues": ["jobs.never-made"]})
    assert reply[1:] == [True, {"messages": []}], reply
    assert "jobs.never-made" not in {q["name"] for q in root.call("queues", {})["queues"]}


def test_multi_queue_ops_need_the_verb_on_every_queue(
    root: RawConnection, principals: dict[str, RawConnection]
) -> None:
    consumer = principals["consume"]
    put_one(root, "other.multi")
    put_one(root, "jobs.multi")
    reply = consumer.request("reserve", {"queues": ["jobs.multi", "other.multi"], "max": 2})
    assert error_code(reply) == "FORBIDDEN" and reply[2]["details"]["queue"] == "other.multi"
    inside, outside = leased(root, "jobs.multi"), leased(root, "other.multi")
    reply = consumer.request("ack", {"items": [list(inside), list(outside)]})
    assert error_code(reply) == "FORBIDDEN"
    assert root.call("status", {"id": inside[0]})["state"] == "reserved"
    assert root.call("status", {"id": outside[0]})["state"] == "reserved"
    assert consumer.call("ack", {"items": [list(inside)]}) == {"acked": 1}


def test_globs(root: RawConnection, secured: BrokerProcess) -> None:
    with connect(secured, MIXED_TOKEN) as mixed:
        for queue in ("mix.a", "mix.9"):
            assert mixed.request("put", {"queue": queue, "messages": [{"body": b"g"}]})[1]
        for queue in ("mix.ab", "mix.", "mixa", "jobs.x"):
            reply = mixed.request("put", {"queue": queue, "messages": [{"body": b"g"}]})
            assert error_code(reply) == "FORBIDDEN", queue
        for queue in ("set.a", "set.bzz", "exact"):
            put_one(root, queue)
            assert mixed.request("stats", {"queue": queue})[1], queue
        for queue in ("set.c", "set.", "exact2", "xexact"):
            put_one(root, queue)
            assert error_code(mixed.request("stats", {"queue": queue})) == "FORBIDDEN", queue


def test_tokens_and_unknown_ops(secured: BrokerProcess, principals: dict[str, Any]) -> None:
    with RawConnection(secured.host, secured.port) as stranger:
        reply = stranger.request("hello", {"version": 1, "token": "not-a-token"})
        assert error_code(reply) == "UNAUTHORIZED"
        stranger.assert_closed()
    assert error_code(principals["read"].request("frobnicate", {})) == "UNKNOWN_OP"


def test_principal_cache_and_glob_unit() -> None:
    principal = Principal(
        "p", (Grant("a.*", frozenset({"read"})), Grant("b?", frozenset({"admin"})))
    )
    assert principal.may("read", "a.x") and principal.may("read", "a.x")  # cached answer
    assert not principal.may("admin", "a.x") and principal.may("admin", "b1")
    assert not principal.may("admin", "b12") and not principal.may("read", "b1")
    assert not principal.may_everywhere("read")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("principal = 3", "array of tables"),
        ("[[principal]]\nname = 'x'\n", "needs name and token_sha256"),
        ("[[principal]]\nname = 'x'\ntoken_sha256 = 'abc'\n", "64 lowercase hex"),
        (f"[[principal]]\nname='x'\ntoken_sha256='{'0' * 64}'\ngrants=[{{queues='*'}}]", "grant"),
        (
            f"[[principal]]\nname='x'\ntoken_sha256='{'0' * 64}'\n"
            "grants=[{queues='*', allow=['write']}]",
            "allow must be",
        ),
        (f"[[principal]]\nname='x'\ntoken_sha256='{'0' * 64}'\nrole='y'", "unknown keys"),
        ("[[principal]\n", "not TOML"),
    ],
)
def test_bad_auth_files_are_named(text: str, why: str) -> None:
    with pytest.raises(AuthFileError, match=re.escape(why)):
        parse_auth_file(text)


# ----------------------------------------------------------------- HTTP API


def http(
    broker: BrokerProcess, method: str, path: str, token: str | None = None
) -> tuple[int, Any]:
    headers = {"X-Sluice-Request": "1"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        broker.http + path, method=method, headers=headers, data=b"" if method == "POST" else None
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_http_api_uses_the_same_principals(secured: BrokerProcess, root: RawConnection) -> None:
    put_one(root, "jobs.http")
    put_one(root, "other.http")
    assert http(secured, "GET", "/api/v1/queues")[0] == 401
    status, body = http(secured, "GET", "/api/v1/queues", TOKENS["read"])
    names = {q["name"] for q in body["queues"]}
    assert status == 200 and "jobs.http" in names and "other.http" not in names
    assert http(secured, "GET", "/api/v1/queues/other.http", TOKENS["read"])[0] == 403
    assert http(secured, "GET", "/api/v1/overview", TOKENS["read"])[0] == 403
    assert http(secured, "GET", "/api/v1/overview", ROOT_TOKEN)[0] == 200
    status, body = http(secured, "POST", "/api/v1/queues/jobs.http/pause", TOKENS["read"])
    assert status == 403 and body["code"] == "FORBIDDEN" and body["details"]["verb"] == "admin"
    assert root.call("stats", {"queue": "jobs.http"})["paused"] is False
    status, _ = http(secured, "POST", "/api/v1/queues/jobs.http/pause", TOKENS["admin"])
    assert status == 200 and root.call("stats", {"queue": "jobs.http"})["paused"]


# ----------------------------------------------------------------- reloads


def wait_for_log(broker: BrokerProcess, text: str, count: int, timeout: float = 5.0) -> None:
    """Until ``text`` is in the log ``count`` times (a file read each time)."""
    deadline = time.monotonic() + timeout
    while broker.log().count(text) < count:
        assert time.monotonic() < deadline, f"never logged {text!r} {count} times"
        time.sleep(0.01)


def test_sighup_reload_good_and_bad(tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    path.write_text(auth_file_text())
    running = start_broker(tmp_path / "broker.log", "--in-memory", "--auth-file", str(path))
    try:
        consumer = connect(running, TOKENS["consume"])
        reader = connect(running, TOKENS["read"])
        put = {"queue": "jobs.reload", "messages": [{"body": b"r"}]}
        assert error_code(consumer.request("put", put)) == "FORBIDDEN"

        # Good: the consumer may now produce too; the reader is gone.
        grown = principal_toml("consume", TOKENS["consume"], [("jobs.*", ["consume", "produce"])])
        write_atomically(path, grown)
        running.process.send_signal(signal.SIGHUP)
        wait_for_log(running, "reloaded: 1 principals", 1)
        assert consumer.call("put", put)["ids"]
        assert error_code(reader.request("stats", {"queue": "jobs.reload"})) == "FORBIDDEN"
        with RawConnection(running.host, running.port) as again:
            reply = again.request("hello", {"version": 1, "token": TOKENS["read"]})
            assert error_code(reply) == "UNAUTHORIZED"

        # Bad: the old grants stay, and the log says why.
        write_atomically(path, grown + "\n[[principal]]\nname = 'broken'\n")
        running.process.send_signal(signal.SIGHUP)
        wait_for_log(running, "auth file not reloaded, the old grants stay", 1)
        assert "needs name and token_sha256" in running.log()
        assert consumer.call("put", put)["ids"]
        path.unlink()
        running.process.send_signal(signal.SIGHUP)
        wait_for_log(running, "auth file not reloaded, the old grants stay", 2)
        assert consumer.call("put", put)["ids"]
        consumer.close()
        reader.close()
    finally:
        stop_broker(running)


def test_a_bad_auth_file_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    path.write_text("[[principal]]\nname = 'x'\ntoken_sha256 = 'short'\n")
    done = subprocess.run(
        [sys.executable, "-m", "broker", "--in-memory", "--port", "0", "--auth-file", str(path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 1 and "64 lowercase hex" in done.stderr
    assert "Traceback" not in done.stderr


def test_protocol_md_shows_the_permission_table() -> None:
    text = (REPO_ROOT / "protocol" / "PROTOCOL.md").read_text()
    section = text[text.index("### Permissions") : text.index("## 5. Errors")]
    rows = re.findall(r"^\| `(\w+)` \| (`\w+`|—) \|", section, flags=re.MULTILINE)
    shown = {op: None if verb == "—" else verb.strip("`") for op, verb in rows}
    assert shown == {op: verb for op, (verb, _) in PERMISSIONS.items() if op in HANDLERS}


def test_sluice_token_prints_a_token_and_its_entry(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "client.cli", "token", "--name", "billing"]
    command += ["--queues", "billing.*", "--allow", "produce,read"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    token, blank, *entry = done.stdout.splitlines()
    assert len(token) >= 43 and blank == "" and token not in done.stdout.partition("\n")[2]
    path = tmp_path / "auth.toml"
    path.write_text("\n".join(entry) + "\n")
    (principal,) = parse_auth_file(path.read_text()).values()
    assert principal.name == "billing" and principal.may("read", "billing.x")
    running = start_broker(tmp_path / "broker.log", "--in-memory", "--auth-file", str(path))
    try:
        with connect(running, token) as billing:
            assert billing.call("put", {"queue": "billing.1", "messages": [{"body": b"b"}]})
            reply = billing.request("reserve", {"queues": ["billing.1"]})
            assert error_code(reply) == "FORBIDDEN"
    finally:
        stop_broker(running)
    again = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=20)
    assert again.stdout.splitlines()[0] != token
    bad = subprocess.run([*command[:4], "--allow", "write"], cwd=REPO_ROOT, capture_output=True)
    assert bad.returncode == 2 and b"produce, consume, read, admin" in bad.stderr
