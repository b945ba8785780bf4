"""Bodies and results sealed by the client (``body_key``): the broker stores ciphertext,
clients with the key read plaintext, keys rotate, and a wrong or missing key is a typed
error. Against a real durable broker; the data dir's files are read to prove it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from client import AsyncClient, Client, Worker
from client._sealing import KEY_HEADER, SealError, key_id
from client.errors import BadRequest
from tests.conftest import BrokerProcess, start_broker, stop_broker

KEY = bytes(range(32))
NEW_KEY = bytes(range(32, 64))
SECRET = b"card 4111-1111-1111-1111"


def data_files(data_dir: Path) -> bytes:
    return b"".join(path.read_bytes() for path in data_dir.iterdir() if path.is_file())


def test_the_broker_stores_only_ciphertext(tmp_path: Path, brokers: list[BrokerProcess]) -> None:
    data_dir = tmp_path / "data"
    brokers.append(start_broker(tmp_path / "broker.log", "--data-dir", str(data_dir)))
    with brokers[-1].client(body_key=KEY) as sealed, brokers[-1].client() as plain:
        sealed.put("vault", SECRET)
        sealed.put_many("vault", [SECRET + b" %d" % n for n in range(3)])
        plain.put("open", b"visible marker 12345")
        [seen] = plain.peek("vault", limit=1)
        assert seen["body"] != SECRET and SECRET not in seen["body"]
        assert seen["headers"][KEY_HEADER] == key_id(KEY)
        assert len(seen["body"]) == len(SECRET) + 28  # nonce and tag
    stop_broker(brokers[-1])  # a clean stop checkpoints into LMDB
    stored = data_files(data_dir)
    assert b"visible marker 12345" in stored  # the control: plaintext is found when there
    assert SECRET not in stored


def test_a_client_with_the_key_reads_plaintext_and_results_round_trip(
    broker: BrokerProcess,
) -> None:
    with broker.client(body_key=KEY) as client, broker.client() as plain:
        message_id = client.put("jobs", SECRET, headers={"kind": "pay"})
        [message] = client.reserve("jobs")
        assert message.body == SECRET and message.headers["kind"] == "pay"
        client.ack(message, result={"paid": True, "ref": "r-1"})
        assert client.result(message_id) == {"paid": True, "ref": "r-1"}
        assert client.status(message_id)["result"] == {"paid": True, "ref": "r-1"}
        sealed = plain.status(message_id)["result"]
        assert set(sealed) == {"sluice-sealed", "data"} and b"r-1" not in sealed["data"]
        assert client.queues() == []  # acked: nothing left in it


def test_put_and_wait_and_a_worker_see_plaintext(broker: BrokerProcess) -> None:
    seen: list[bytes] = []

    def handle(job: object) -> bytes:
        body = job.body  # type: ignore[attr-defined]
        seen.append(body)
        return body.upper()

    worker = Worker("rpc", handle, url=broker.url, body_key=KEY, poll_wait=0.2)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        with broker.client(body_key=KEY) as client:
            assert client.put_and_wait("rpc", b"hello", timeout=5) == b"HELLO"
    finally:
        worker.stop()
        thread.join(timeout=10)
    assert seen == [b"hello"]


def test_keys_rotate_and_a_missing_or_wrong_key_is_a_typed_error(broker: BrokerProcess) -> None:
    rotated = {"new": NEW_KEY, key_id(KEY): KEY}  # the first seals, every one opens
    with (
        broker.client(body_key=KEY) as old,
        broker.client(body_key=rotated) as both,
        broker.client(body_key={key_id(KEY): NEW_KEY}) as wrong,  # the id, not the key
    ):
        old.put("rotate", b"under the old key")
        both.put("rotate", b"under the new key")
        bodies = [item["body"] for item in both.peek("rotate", "ready", limit=2)]
        assert bodies == [b"under the old key", b"under the new key"]
        with pytest.raises(SealError, match="no body key 'new'"):
            old.peek("rotate", "ready", limit=2)
        with pytest.raises(SealError, match="does not open"):
            wrong.peek("rotate", "ready", limit=1)
        # A body that names the key but is no sealed body (too short for a nonce).
        with broker.client() as plain:
            plain.put("rotate.forged", b"x", headers={KEY_HEADER: key_id(KEY)})
        with pytest.raises(SealError, match="does not open"):
            old.peek("rotate.forged", "ready", limit=1)
    for bad in (b"short", {}, {"k": "not bytes"}):
        with pytest.raises(BadRequest, match="body_key"):
            Client(url=broker.url, body_key=bad)  # type: ignore[arg-type]


def test_the_asyncio_client_seals_too(broker: BrokerProcess) -> None:
    async def main() -> tuple[bytes, bytes]:
        async with AsyncClient(url=broker.url, body_key=KEY) as client:
            await client.put("async.vault", SECRET)
            [message] = await client.reserve("async.vault")
            async with AsyncClient(url=broker.url) as plain:
                [raw] = await plain.peek("async.vault", "reserved")
            return message.body, raw["body"]

    opened, raw = asyncio.run(main())
    assert opened == SECRET and raw != SECRET


def test_a_schedules_body_is_sealed_and_its_fires_open(broker: BrokerProcess) -> None:
    with broker.client(body_key=KEY) as client, broker.client() as plain:
        client.schedule("sealed.cron", "s", SECRET, cron="@yearly")
        assert plain.schedules("sealed.cron")[0]["body"] != SECRET
        client.trigger("sealed.cron", "s")
        [message] = client.reserve("sealed.cron")
        assert message.body == SECRET and message.headers["schedule"] == "s"


def test_no_key_means_the_cryptography_package_is_never_imported() -> None:
    code = "import sys, sluice; c = sluice.Client(); print('cryptography' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
