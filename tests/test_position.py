"""A ready message's place in its queue (``status`` → ``position``, ``eta_s``): the core's
index against a brute-force count under random operations, the estimate, and the field
through both clients and the API of a real broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

from broker import Core, State
from broker._message import PutSpec
from protocol import LeaseLost
from tests.conftest import start_broker, stop_broker

T0 = 1_000.0


def expected_positions(core: Core, now: float, queue: str) -> dict[int, int]:
    """Each ready message's place, from peek's delivery order (a full scan)."""
    ready = core.peek(now, queue, State.READY, 10**6)
    return {message.id: index for index, message in enumerate(ready)}


def test_positions_follow_every_way_into_and_out_of_ready() -> None:
    rng = random.Random(15)
    core = Core(random=rng.random)
    now = T0
    core.put(now, "q", [PutSpec(body=b"seed")])
    core.status(now, 1)  # builds the index, from here on kept in step
    leases: list[tuple[int, int]] = []
    for step in range(1500):
        now += rng.random() * 0.2
        action = rng.random()
        if action < 0.4:
            specs = [
                PutSpec(body=b"x", priority=rng.choice((0, 0, 1, 5)), delay=rng.choice((0, 0, 0.5)))
                for _ in range(rng.randint(1, 3))
            ]
            core.put(now, "q", specs)
        elif action < 0.6:
            for message in core.reserve(now, ["q"], rng.randint(1, 3)):
                leases.append((message.id, message.lease_token or 0))
        elif action < 0.85 and leases:
            # Leases also run out as time goes on (ready again): the settle may be too late.
            message_id, lease = leases.pop(rng.randrange(len(leases)))
            with contextlib.suppress(LeaseLost):
                if action < 0.7:
                    core.nack(now, [(message_id, lease)], delay=0)  # ready again
                elif action < 0.75:
                    core.bury(now, message_id, lease, "no")
                else:
                    core.ack(now, [(message_id, lease)])
        elif action < 0.88:
            core.replay(now, "q")
        elif action < 0.95:
            core.cancel(now, rng.choice(list(core.messages)))
        elif action > 0.99:
            core.purge(now, "q")
        expected = expected_positions(core, now, "q")
        for message_id, position in expected.items():
            assert core.status(now, message_id)["position"] == position, (step, message_id)
        queue = core.queues["q"]
        assert queue.ranks is not None and len(queue.ranks) == queue.counts[State.READY]


def test_only_ready_messages_have_a_position() -> None:
    core = Core()
    (later,) = core.put(T0, "q", [PutSpec(body=b"x", delay=60)])
    (ready,) = core.put(T0, "q", [PutSpec(body=b"y")])
    assert "position" not in core.status(T0, later)
    assert core.status(T0, ready)["position"] == 0
    core.reserve(T0, ["q"], 1)
    assert "position" not in core.status(T0, ready)


def test_eta_comes_from_the_deliveries_between_asks() -> None:
    core = Core()
    ids = core.put(T0, "q", [PutSpec(body=b"x") for _ in range(10)])
    last = ids[-1]
    assert core.status(T0, last) == core.status(T0, last) | {"position": 9}
    assert "eta_s" not in core.status(T0, last)  # no deliveries seen yet
    core.reserve(T0 + 1, ["q"], 4)  # 4 deliveries in the 2 s until the next ask
    place = core.status(T0 + 2, last)
    assert place["position"] == 5 and place["eta_s"] == (5 + 1) / (4 / 2)
    core.configure(T0 + 2, "q", {"paused": True})
    place = core.status(T0 + 100, last)  # no delivery in the last window: no estimate
    assert place["position"] == 5 and "eta_s" not in place


def test_status_reports_position_through_clients_cli_and_api(tmp_path: Path) -> None:
    running = start_broker(tmp_path / "broker.log", http=True)
    try:
        with running.client() as client:
            ids = client.put_many("booking", [b"a", b"b", b"c"])
            client.put("booking", b"vip", priority=5)
            assert client.status(ids[2])["position"] == 3  # the vip goes first
            client.reserve("booking")
            assert client.status(ids[2])["position"] == 2

        async def from_async() -> int:
            async with running.async_client() as async_client:
                return int((await async_client.status(ids[2]))["position"])

        assert asyncio.run(from_async()) == 2
        cli = subprocess.run(
            [sys.executable, "-m", "client.cli", "--url", running.url, "status", str(ids[2])],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert cli.returncode == 0 and re.search(r"position\s+2\n", cli.stdout), cli
        url = f"{running.http}/api/v1/messages/{ids[1]}"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert json.loads(response.read())["position"] == 1
    finally:
        stop_broker(running)
