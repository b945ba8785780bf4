"""--max-connections and --hello-timeout against a real broker."""

from __future__ import annotations

import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.errors import Quota
from tests.conftest import REPO_ROOT, BrokerProcess, RawConnection, start_broker, stop_broker


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[BrokerProcess]:
    args = ("--in-memory", "--max-connections", "3", "--hello-timeout", "0.5")
    running = start_broker(tmp_path / "broker.log", *args)
    yield running
    stop_broker(running)


def test_the_connection_over_the_limit_gets_quota_and_a_close(gated: BrokerProcess) -> None:
    first, second, third = (gated.raw() for _ in range(3))
    with RawConnection(gated.host, gated.port) as over:
        (refusal,) = over.read_until_closed()
        assert refusal[0] is None and refusal[1] is False and refusal[2]["code"] == "QUOTA"
        assert "3 connections" in refusal[2]["message"]
    assert "refused connection from" in gated.log()
    assert first.call("ping", {})["time"] > 0
    first.close()
    # Once one closes, the next is let in (the broker may see the close a moment later).
    for _ in range(50):
        with RawConnection(gated.host, gated.port) as again:
            reply = again.request("hello", {"version": 1})
            if reply[1] is True:
                break
            assert reply[2]["code"] == "QUOTA"
    else:
        pytest.fail("a closed connection's place was never given to a new one")
    second.close()
    third.close()


def test_a_connection_without_hello_is_closed(gated: BrokerProcess) -> None:
    greeted = gated.raw()  # opened first: its own deadline passes before the silent one's
    with RawConnection(gated.host, gated.port) as silent:
        (last,) = silent.read_until_closed(timeout=5)
        assert last[0] is None and last[2]["code"] == "BAD_REQUEST"
        assert "no hello within 0.5s" in last[2]["message"]
    assert greeted.call("ping", {})["time"] > 0  # said hello: no deadline
    greeted.close()


def test_many_silent_sockets_are_all_closed(tmp_path: Path) -> None:
    running = start_broker(tmp_path / "broker.log", "--in-memory", "--hello-timeout", "0.5")
    try:
        silent = [RawConnection(running.host, running.port) for _ in range(200)]
        with running.raw() as working:
            assert working.call("ping", {})["time"] > 0
        for connection in silent:
            (last,) = connection.read_until_closed(timeout=5)
            assert last[2]["code"] == "BAD_REQUEST"
            connection.close()
    finally:
        stop_broker(running)


def test_the_broker_raises_its_open_files_limit_and_logs_the_room(tmp_path: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip("needs a finite hard limit on open files above 256")

    def low_limit() -> None:  # in the child, before the broker starts
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    log_path = tmp_path / "broker.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "broker", "--port", "0", "--in-memory", "--http-port", "0"],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            preexec_fn=low_limit,
        )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("sluice listening on ")
        limits = Path(f"/proc/{process.pid}/limits").read_text()
        [line] = [row for row in limits.splitlines() if row.startswith("Max open files")]
        assert line.split()[3] == str(hard), line  # the soft limit, raised to the hard one
        assert f"open files limit {hard}: room for about {hard - 64} connections" in (
            log_path.read_text()
        )
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_max_queues_refuses_a_new_queue_with_quota_and_changes_nothing(
    tmp_path: Path,
) -> None:
    broker = start_broker(tmp_path / "broker.log", "--max-queues", "3")
    try:
        with broker.client() as client:
            client.put("q.1", b"x")
            client.put("q.2", b"x")
            client.configure("q.3", max_attempts=2)
            before = client.queues()
            for create in (
                lambda: client.put("q.4", b"x"),
                lambda: client.reserve(["q.1", "q.5"]),  # one new name: nothing reserved
                lambda: client.configure("q.6", max_attempts=1),
                lambda: client.schedule("q.7", "s", b"x", every=60),
                lambda: client.bind("orders.*", "q.8"),  # a binding makes its queue
            ):
                with pytest.raises(Quota, match="--max-queues"):
                    create()
            assert client.queues() == before
            assert client.stats("q.1")["ready"] == 1  # the refused reserve took nothing
            assert len(client.reserve(["q.1", "q.2"], max_messages=5)) == 2  # existing: fine
    finally:
        stop_broker(broker)
