"""The JSON admin API (/api/v1), route by route, against a real broker with an auth token
and a durable store: what each route answers, what it changes (seen through the wire
client), what bad input gets, and that a POST's change survives kill -9 once answered."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client import Client
from tests.conftest import BrokerProcess, start_broker, stop_broker, wait_for_state

TOKEN = "api-test-token"
MUTATE = {"X-Sluice-Request": "1", "Authorization": f"Bearer {TOKEN}"}


class Api:
    def __init__(self, broker: BrokerProcess) -> None:
        self.base = f"{broker.http}/api/v1"

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, Any]:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path, data=data, method=method, headers=headers or {}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, text = response.status, response.read()
                assert response.headers["Content-Type"].startswith("application/json")
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read()
        return status, json.loads(text)

    def get(self, path: str) -> Any:
        status, answer = self.call("GET", path)
        assert status == 200, answer
        return answer

    def post(self, path: str, body: Any = None) -> Any:
        status, answer = self.call("POST", path, body, headers=MUTATE)
        assert status == 200, answer
        return answer

    def error(self, method: str, path: str, body: Any = None, **options: Any) -> tuple[int, str]:
        """The status and error code of a request that must fail."""
        if method == "POST":
            options.setdefault("headers", MUTATE)
        status, answer = self.call(method, path, body, **options)
        assert set(answer) >= {"code", "message"}, answer
        assert isinstance(answer["message"], str) and answer["message"]
        return status, answer["code"]


def start(tmp_path: Path, *extra: str) -> BrokerProcess:
    return start_broker(tmp_path / "broker.log", "--auth-token", TOKEN, *extra, http=True)


@pytest.fixture(scope="module")
def api_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    running = start(tmp_path_factory.mktemp("api"))
    yield running
    stop_broker(running)


@pytest.fixture
def api(api_broker: BrokerProcess) -> Api:
    return Api(api_broker)


@pytest.fixture
def client(api_broker: BrokerProcess) -> Iterator[Client]:
    with api_broker.client(auth_token=TOKEN, client_name="api-test") as connected:
        yield connected


def dead_letters(client: Client, queue: str, count: int) -> list[int]:
    """``count`` messages put into ``queue`` and buried; returns their ids."""
    client.put_many(queue, [f"doomed {n}".encode() for n in range(count)])
    ids = []
    for message in client.reserve(queue, max_messages=count):
        client.bury(message, reason="bad address")
        ids.append(message.id)
    return sorted(ids)


# ----------------------------------------------------------------------- reads


def test_queues_and_one_queue_show_the_counts(api: Api, client: Client) -> None:
    client.put_many("api.counts", [b"a", b"b"])
    client.put("api.counts", b"later", delay=3600)
    listed = {queue["name"]: queue for queue in api.get("/queues")["queues"]}
    assert listed["api.counts"] == {
        "name": "api.counts",
        "ready": 2,
        "delayed": 1,
        "reserved": 0,
        "dead": 0,
        "paused": False,
    }
    assert api.get("/queues/api.counts") == client.stats("api.counts")
    assert api.error("GET", "/queues/api.never") == (404, "NOT_FOUND")
    assert api.error("GET", "/queues/bad%20name!") == (400, "BAD_REQUEST")
    assert api.error("GET", "/queues/api.counts?verbose=1") == (400, "BAD_REQUEST")


def test_messages_pages_through_each_state(api: Api, client: Client) -> None:
    queue = "api.pages"
    ids = [client.put(queue, f"m{n}".encode(), priority=n) for n in range(5)]
    first = api.get(f"/queues/{queue}/messages?limit=2")
    assert [item["id"] for item in first["items"]] == [ids[4], ids[3]]  # delivery order
    assert first["items"][0]["body"] == {"text": "m4", "size": 2, "truncated": False}
    assert first["next"] == ids[3]
    rest = api.get(f"/queues/{queue}/messages?state=ready&limit=10&after={first['next']}")
    assert [item["id"] for item in rest["items"]] == [ids[2], ids[1], ids[0]]
    assert rest["next"] is None
    client.put(queue, b"later", delay=3600)
    delayed = api.get(f"/queues/{queue}/messages?state=delayed")["items"]
    assert [item["body"]["text"] for item in delayed] == ["later"]
    (leased,) = client.reserve(queue)
    reserved = api.get(f"/queues/{queue}/messages?state=reserved")["items"]
    assert [item["id"] for item in reserved] == [leased.id]
    client.bury(leased, reason="no")
    dead = api.get(f"/queues/{queue}/messages?state=dead")["items"]
    assert [item["dead_reason"] for item in dead] == ["no"]
    for bad in ("state=bogus", "limit=0", "limit=x", "limit=100000", "after=-1", "colour=red"):
        assert api.error("GET", f"/queues/{queue}/messages?{bad}") == (400, "BAD_REQUEST"), bad
    # the page's last message moved on: start again
    assert api.error("GET", f"/queues/{queue}/messages?after={leased.id}") == (400, "BAD_REQUEST")
    assert api.error("GET", "/queues/api.nope/messages") == (404, "NOT_FOUND")


def test_dead_pages_by_id(api: Api, client: Client) -> None:
    ids = dead_letters(client, "api.dead", 3)
    page = api.get("/queues/api.dead/dead?limit=2")
    assert [item["id"] for item in page["items"]] == ids[:2] and page["next"] == ids[1]
    assert page["items"][0]["dead_reason"] == "bad address"
    page = api.get(f"/queues/api.dead/dead?after={ids[1]}")
    assert [item["id"] for item in page["items"]] == ids[2:] and page["next"] is None
    assert api.error("GET", "/queues/api.dead/dead?limit=abc") == (400, "BAD_REQUEST")
    assert api.error("GET", "/queues/api.nope/dead") == (404, "NOT_FOUND")


def test_message_shows_status_headers_body_and_result(api: Api, client: Client) -> None:
    message_id = client.put("api.one", b"\xff\x00binary", headers={"order": "17"})
    found = api.get(f"/messages/{message_id}")
    assert found["state"] == "ready" and found["headers"] == {"order": "17"}
    assert found["body"] == {"base64": "/wBiaW5hcnk=", "size": 8, "truncated": False}
    big = client.put("api.one", b"y" * 5000)
    assert api.get(f"/messages/{big}")["body"]["truncated"] is True
    for bad in ("abc", "0", "-3", "1.5", str(2**64)):
        assert api.error("GET", f"/messages/{bad}") == (400, "BAD_REQUEST"), bad
    assert api.error("GET", "/messages/999999999") == (404, "NOT_FOUND")


def test_a_result_shows_once_acked(api: Api, client: Client) -> None:
    client.put("api.result", b"job")
    (message,) = client.reserve("api.result")
    client.ack(message, result={"thumbnail": "t.png"})
    found = api.get(f"/messages/{message.id}")
    assert found["state"] == "done" and found["result"] == {"thumbnail": "t.png"}


def test_connections_list_peers_names_and_deliveries(api: Api, api_broker: BrokerProcess) -> None:
    with api_broker.client(auth_token=TOKEN, client_name="api-consumer") as consumer:
        consumer.put_many("api.conn", [b"1", b"2"])
        consumer.reserve("api.conn", max_messages=2)
        listed = api.get("/connections")["connections"]
        (mine,) = [c for c in listed if c["client"] == "api-consumer"]
    assert mine["consumer"] is True and mine["delivered"] == 2 and mine["requests"] >= 3
    assert mine["peer"].startswith("127.0.0.1:") and mine["opened_at"] <= time.time()

    def names() -> list[str]:
        return [c["client"] for c in api.get("/connections")["connections"]]

    wait_for_state(lambda: "api-consumer" not in names(), "the closed connection is still listed")


def test_overview_counts_every_queue_and_rates_come_by_themselves(api: Api, client: Client) -> None:
    before = api.get("/overview")
    client.put_many("api.overview", [b"x"] * 7)
    after = api.get("/overview")
    assert after["messages"]["ready"] == before["messages"]["ready"] + 7
    assert after["totals"]["put"] == before["totals"]["put"] + 7
    assert after["queues"] >= 1 and after["connections"] >= 1
    (mine,) = [queue for queue in after["deepest"] if queue["name"] == "api.overview"]
    assert mine["ready"] == 7 and mine["paused"] is False
    wait_for_state(
        lambda: api.get("/overview")["rates"]["put_per_s"] is not None,
        "the sampler never gave a rate",
        timeout=10,
    )
    assert api.error("GET", "/overview?x=1") == (400, "BAD_REQUEST")


# ---------------------------------------------------------------------- writes


def test_pause_and_resume(api: Api, client: Client) -> None:
    client.put("api.pause", b"x")
    assert api.post("/queues/api.pause/pause")["settings"]["paused"] is True
    assert client.stats("api.pause")["paused"] is True and client.reserve("api.pause") == []
    assert api.post("/queues/api.pause/resume")["settings"]["paused"] is False
    assert len(client.reserve("api.pause")) == 1


def test_purge_drops_ready_and_delayed(api: Api, client: Client) -> None:
    client.put_many("api.purge", [b"1", b"2"])
    client.put("api.purge", b"3", delay=3600)
    assert api.post("/queues/api.purge/purge") == {"purged": 3}
    assert "api.purge" not in [q["name"] for q in client.queues()]  # emptied: forgotten
    assert api.error("POST", "/queues/api.nope/purge") == (404, "NOT_FOUND")


def test_delete_queue_refuses_one_in_use_unless_forced(api: Api, client: Client) -> None:
    client.put("api.delete", b"1")
    assert api.error("POST", "/queues/api.delete/delete") == (400, "BAD_REQUEST")
    assert client.stats("api.delete")["ready"] == 1
    deleted = api.post("/queues/api.delete/delete", {"force": True})
    assert deleted == {"deleted": True, "messages": 1, "schedules": 0, "bindings": 0}
    assert api.error("POST", "/queues/api.delete/delete") == (404, "NOT_FOUND")
    assert api.error("POST", "/queues/api.delete/delete", {"force": 1}) == (400, "BAD_REQUEST")


def test_replay_some_then_all_then_purge_dead(api: Api, client: Client) -> None:
    ids = dead_letters(client, "api.replay", 4)
    assert api.post("/queues/api.replay/replay", {"ids": ids[:1]}) == {"replayed": 1}
    assert client.stats("api.replay")["ready"] == 1
    assert api.post("/queues/api.replay/replay", {"ids": [999_999]}) == {"replayed": 0}
    assert api.post("/queues/api.replay/replay") == {"replayed": 3}
    assert client.stats("api.replay")["ready"] == 4
    dead_letters(client, "api.replay", 2)
    assert api.post("/queues/api.replay/purge-dead") == {"purged": 2}
    assert client.stats("api.replay")["dead"] == 0
    for bad in ({"ids": "all"}, {"ids": [0]}, {"ids": ["1"]}, {"ids": [1.5]}, {"every": True}):
        assert api.error("POST", "/queues/api.replay/replay", bad) == (400, "BAD_REQUEST"), bad
    assert api.error("POST", "/queues/api.replay/replay", {"queue": "other"})[0] == 400


def test_cancel_a_ready_message_but_not_a_reserved_one(api: Api, client: Client) -> None:
    ready = client.put("api.cancel", b"x")
    assert api.post(f"/messages/{ready}/cancel") == {"cancelled": True}
    assert api.error("GET", f"/messages/{ready}") == (404, "NOT_FOUND")
    client.put("api.cancel", b"y")
    (leased,) = client.reserve("api.cancel")
    assert api.post(f"/messages/{leased.id}/cancel") == {"cancelled": False}
    assert client.status(leased.id)["state"] == "reserved"
    assert api.error("POST", "/messages/x/cancel") == (400, "BAD_REQUEST")


def test_configure_checks_settings_as_the_wire_does(api: Api, client: Client) -> None:
    settings = api.post("/queues/api.conf/configure", {"visibility_timeout": 90})["settings"]
    assert settings["visibility_timeout"] == 90
    assert client.configure("api.conf")["visibility_timeout"] == 90
    for bad in ({"visibility_timeout": "long"}, {"visibility_timeout": -1}, {"colour": "red"}):
        assert api.error("POST", "/queues/api.conf/configure", bad) == (400, "BAD_REQUEST"), bad
    assert client.configure("api.conf")["visibility_timeout"] == 90  # nothing changed
    assert api.error("POST", "/queues/bad%20name/configure", {}) == (400, "BAD_REQUEST")


def test_bad_bodies_are_refused_and_change_nothing(api: Api, client: Client) -> None:
    client.configure("api.body", visibility_timeout=30)
    path = "/queues/api.body/configure"
    assert api.error("POST", path, raw=b"{not json") == (400, "BAD_REQUEST")
    assert api.error("POST", path, raw=b"\xff\xfe") == (400, "BAD_REQUEST")
    assert api.error("POST", path, [1, 2]) == (400, "BAD_REQUEST")
    assert api.error("POST", path, "text") == (400, "BAD_REQUEST")
    huge = b'{"visibility_timeout": 5, "pad": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    assert api.error("POST", path, raw=huge) == (413, "TOO_LARGE")
    assert client.configure("api.body")["visibility_timeout"] == 30


def test_mutations_need_the_custom_header_and_the_token(api: Api, client: Client) -> None:
    client.put("api.auth", b"x")
    path = "/queues/api.auth/pause"
    token = {"Authorization": f"Bearer {TOKEN}"}
    assert api.error("POST", path, headers=token) == (403, "FORBIDDEN")  # a cross-site form
    assert api.error("POST", path, headers={"X-Sluice-Request": "1"}) == (401, "UNAUTHORIZED")
    wrong = {"X-Sluice-Request": "1", "Authorization": "Bearer guess"}
    assert api.error("POST", path, headers=wrong) == (403, "FORBIDDEN")
    basic = {"X-Sluice-Request": "1", "Authorization": f"Basic {TOKEN}"}
    assert api.error("POST", path, headers=basic) == (403, "FORBIDDEN")
    assert client.stats("api.auth")["paused"] is False  # none of them got through
    assert api.get("/queues/api.auth")["ready"] == 1  # reads need no token


def test_unknown_routes_and_methods_answer_json(api: Api) -> None:
    assert api.error("GET", "/nothing") == (404, "NOT_FOUND")
    assert api.error("DELETE", "/queues") == (405, "BAD_REQUEST")
    assert api.error("GET", "/queues/api.x/pause") == (405, "BAD_REQUEST")


# ------------------------------------------------------------------ durability


def test_an_answered_post_survives_kill_9(tmp_path: Path, brokers: list[BrokerProcess]) -> None:
    running = start(tmp_path)
    brokers.append(running)
    with running.client(auth_token=TOKEN) as client:
        client.put_many("api.durable", [b"1", b"2"])
        dead_letters(client, "api.durable.dead", 1)
    api = Api(running)
    api.post("/queues/api.durable/pause")
    api.post("/queues/api.durable/configure", {"max_attempts": 9})
    api.post("/queues/api.durable.dead/replay")
    running.process.kill()  # no chance to write anything more
    running.process.wait()
    again = start(tmp_path)
    brokers.append(again)
    with again.client(auth_token=TOKEN) as client:
        assert client.stats("api.durable")["paused"] is True
        assert client.configure("api.durable")["max_attempts"] == 9
        assert client.stats("api.durable.dead")["ready"] == 1
    stop_broker(again)


def test_every_error_code_has_an_http_status() -> None:
    from broker._api import STATUS
    from protocol import ErrorCode

    assert set(STATUS) == set(ErrorCode)
    assert STATUS[ErrorCode.STORAGE_FULL] == 507 and STATUS[ErrorCode.TOO_LARGE] == 413


# ------------------------------------------------------------------ schedules


def test_schedules_are_created_listed_triggered_and_removed(api: Api, client: Client) -> None:
    made = api.post("/queues/api.sched/schedules/nightly", {"cron": "30 2 * * *", "body": "go"})
    assert made["schedule"]["cron"] == "30 2 * * *" and made["schedule"]["next_at"] > 0
    assert made["schedule"]["body"]["text"] == "go"
    [listed] = api.get("/queues/api.sched/schedules")["schedules"]
    assert listed["name"] == "nightly"
    assert "nightly" in [s["name"] for s in api.get("/schedules")["schedules"]]
    fired = api.post("/queues/api.sched/schedules/nightly/trigger")["id"]
    [message] = client.reserve("api.sched")
    assert message.id == fired and message.body == b"go"
    assert api.post("/queues/api.sched/schedules/nightly/unschedule") == {"removed": True}
    assert client.schedules("api.sched") == []


def test_bad_schedules_over_http_are_refused_and_change_nothing(api: Api, client: Client) -> None:
    base = "/queues/api.sched-bad/schedules"
    assert api.error("POST", f"{base}/s", {"cron": "61 * * * *", "body": "x"}) == (
        400,
        "BAD_REQUEST",
    )
    assert api.error("POST", f"{base}/s", {"every": 1, "tz": "Nowhere/X", "body": "x"})[0] == 400
    assert api.error("POST", f"{base}/s", {"every": 1, "body": 5})[0] == 400
    assert api.error("POST", f"{base}/s", {"every": 1, "body": "x", "name": "t"})[0] == 400
    assert api.error("POST", f"{base}/bad%20name!", {"every": 1, "body": "x"})[0] == 400
    assert api.error("POST", f"{base}/missing/trigger") == (404, "NOT_FOUND")
    status, _ = api.call("POST", f"{base}/s", {"every": 1, "body": "x"})
    assert status in (401, 403)  # no custom header, no token
    assert client.schedules("api.sched-bad") == []
