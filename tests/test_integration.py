"""Both clients against the real daemon: the lifecycle, ordering, timing and concurrency
rules of DESIGN.md, checked end to end.

Nothing here sleeps to let time pass: a test that needs the broker's clock to move waits
on a long-poll (``reserve(wait=...)``), whose reply is the event. The broker applies due
messages and lease expiries before it times a long-poll out, so an empty long-poll proves
that whatever was due by its deadline has happened.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from client import AsyncClient, Client, Message
from client.errors import BadRequest, ConnectionClosed, LeaseLost, NotFound
from tests.conftest import KEEP, BrokerProcess, frame, start_broker, stop_broker, wait_for_state

T = TypeVar("T")
EPSILON = 1e-6  # float slack when comparing broker timestamps


def arun(coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    """Run an async scenario, bounded so a lost reply fails instead of hanging."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


def no_backoff(client: Client, queue: str, **settings: Any) -> dict[str, Any]:
    """Retries (nack without delay, lease expiry) go straight back to ready."""
    return client.configure(queue, backoff={"type": "fixed", "delay": 0}, **settings)


async def start_waiting(client: AsyncClient, queues: str | list[str], **options: Any) -> Any:
    """Start a long-poll reserve and return its task once the broker has registered it.

    The task writes its request on its first step; the broker handles one connection's
    requests in order, so the ping's reply means the reserve has been handled."""
    task = asyncio.create_task(client.reserve(queues, **options))
    await asyncio.sleep(0)
    await client.ping()
    assert not task.done(), f"the long-poll returned at once: {task.result()!r}"
    return task


def counts(stats: dict[str, Any]) -> tuple[int, int, int, int]:
    return stats["ready"], stats["delayed"], stats["reserved"], stats["dead"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------- round trips


def test_sync_put_reserve_ack_round_trip(broker: BrokerProcess) -> None:
    with broker.client() as client:
        assert client.server_info["protocol"] == 1
        assert client.server_info["max_frame"] > 0
        client.configure("jobs", **KEEP)  # looked at once drained
        before = client.ping()
        message_id = client.put(
            "jobs", b"\x00payload\xff", priority=7, max_attempts=3, headers={"trace": "t1", "n": 2}
        )
        text_id = client.put("jobs", "héllo")
        empty_id = client.put("jobs", b"", priority=-1)
        assert len({message_id, text_id, empty_id}) == 3

        (message,) = client.reserve("jobs")
        assert message.id == message_id
        assert message.body == b"\x00payload\xff"
        assert (message.queue, message.priority, message.attempts) == ("jobs", 7, 1)
        assert message.max_attempts == 3
        assert message.headers == {"trace": "t1", "n": 2}
        assert message.enqueued_at >= before - EPSILON
        assert message.lease_deadline > message.enqueued_at
        status = client.status(message_id)
        assert (status["state"], status["attempts"], status["body_size"]) == ("reserved", 1, 9)

        assert client.ack(message) == 1
        with pytest.raises(NotFound):
            client.status(message_id)
        with pytest.raises(LeaseLost):
            client.ack(message)

        (text,) = client.reserve("jobs")
        assert text.body == "héllo".encode()
        assert client.ack((text.id, text.lease)) == 1
        (empty,) = client.reserve("jobs")
        assert (empty.id, empty.body) == (empty_id, b"")
        assert client.ack(empty) == 1
        assert client.reserve("jobs") == []
        stats = client.stats("jobs")
        assert counts(stats) == (0, 0, 0, 0)
        assert stats["totals"] == {
            "put": 3,
            "delivered": 3,
            "acked": 3,
            "nacked": 0,
            "expired": 0,
            "dead_lettered": 0,
        }


def test_async_put_reserve_ack_round_trip(broker: BrokerProcess) -> None:
    async def scenario() -> None:
        async with broker.async_client() as client:
            assert client.server_info["protocol"] == 1
            await client.configure("jobs", **KEEP)
            ids = await client.put_many("jobs", [b"a", b"b", b"c"], priority=2)
            assert len(set(ids)) == 3
            messages = await client.reserve("jobs", max_messages=10)
            assert [m.body for m in messages] == [b"a", b"b", b"c"]
            assert [m.id for m in messages] == ids
            assert all(m.attempts == 1 and m.priority == 2 for m in messages)
            assert len({m.enqueued_at for m in messages}) == 1  # one put, one time
            assert len({m.lease for m in messages}) == 3
            assert (await client.stats("jobs"))["reserved"] == 3
            assert await client.ack(messages) == 3
            for message_id in ids:
                with pytest.raises(NotFound):
                    await client.status(message_id)
            stats = await client.stats("jobs")
            assert counts(stats) == (0, 0, 0, 0)
            assert stats["totals"]["acked"] == 3

    arun(scenario())


def test_lease_outlives_its_connection(broker: BrokerProcess) -> None:
    with broker.client() as first:
        first.configure("jobs", **KEEP)
        first.put("jobs", b"x")
        (message,) = first.reserve("jobs")
    with broker.client() as second:
        assert second.ack((message.id, message.lease)) == 1
        assert second.stats("jobs")["totals"]["acked"] == 1


# ---------------------------------------------------------------------- ordering


def test_priority_first_then_fifo(broker: BrokerProcess) -> None:
    with broker.client() as client:
        plan = [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", -3), ("f", 2**31 - 1)]
        for body, priority in plan:
            client.put("jobs", body, priority=priority)
        order = [client.reserve("jobs")[0].body for _ in plan]
        assert order == [b"f", b"b", b"d", b"a", b"c", b"e"]
        assert client.reserve("jobs") == []

        # A batch reserve hands them out in the same order.
        for body, priority in plan:
            client.put("batch", body, priority=priority)
        batch = client.reserve("batch", max_messages=100)
        assert [m.body for m in batch] == [b"f", b"b", b"d", b"a", b"c", b"e"]


def test_retried_message_goes_behind_equal_priority_ready_ones(broker: BrokerProcess) -> None:
    with broker.client() as client:
        no_backoff(client, "jobs")
        client.put_many("jobs", [b"first", b"second"])
        (first,) = client.reserve("jobs")
        assert first.body == b"first"
        client.nack(first)  # ready again now, but after "second"
        client.put("jobs", b"third")
        order = [m.body for m in client.reserve("jobs", max_messages=3)]
        assert order == [b"second", b"first", b"third"]


def test_multi_queue_reserve_takes_best_across_queues(broker: BrokerProcess) -> None:
    with broker.client() as client:
        client.put("q-a", b"a1", priority=1)
        client.put("q-b", b"b0-early")
        client.put("q-a", b"a5", priority=5)
        client.put("q-b", b"b3", priority=3)
        client.put("q-b", b"b5", priority=5)
        client.put("q-a", b"a0-late")
        client.put("q-c", b"c9", priority=9)  # not named: never taken
        taken = client.reserve(["q-b", "q-a"], max_messages=10)
        assert [m.body for m in taken] == [b"a5", b"b5", b"b3", b"a1", b"b0-early", b"a0-late"]
        assert [m.queue for m in taken] == ["q-a", "q-b", "q-b", "q-a", "q-b", "q-a"]
        assert client.stats("q-c")["ready"] == 1

        client.put("q-b", b"x")
        client.put("q-a", b"y")
        assert client.reserve(["q-a", "q-b"])[0].body == b"x"
        assert client.reserve(["q-a", "q-b"])[0].body == b"y"


# ------------------------------------------------------------------ time: delays


def test_delayed_message_is_delivered_once_due(broker: BrokerProcess) -> None:
    delay, visibility = 1.0, 30.0  # long enough that no stall lets it come due early
    with broker.client() as client:
        delayed_id = client.put("jobs", b"later", delay=delay, priority=100)
        client.put("jobs", b"now")
        status = client.status(delayed_id)
        assert status["state"] == "delayed"
        assert status["due_at"] >= status["enqueued_at"] + delay - EPSILON

        (first,) = client.reserve("jobs")
        assert first.body == b"now"  # the higher-priority message is not due yet
        assert client.reserve("jobs", max_messages=10) == []
        assert counts(client.stats("jobs")) == (0, 1, 1, 0)

        (later,) = client.reserve("jobs", wait=5, visibility_timeout=visibility)
        assert (later.id, later.attempts) == (delayed_id, 1)
        # Reserved (by the broker's own clock) no earlier than it was due.
        assert later.lease_deadline - visibility >= status["due_at"] - EPSILON
        assert counts(client.stats("jobs")) == (0, 0, 2, 0)


def test_delayed_message_long_poll(broker: BrokerProcess) -> None:
    delay, visibility = 1.0, 30.0  # long enough that no stall lets it come due early

    async def scenario() -> None:
        async with broker.async_client() as client:
            delayed_id = await client.put("jobs", b"later", delay=delay, priority=100)
            await client.put("jobs", b"now")
            assert (await client.status(delayed_id))["state"] == "delayed"
            (first,) = await client.reserve("jobs")
            assert first.body == b"now"
            assert await client.reserve("jobs") == []
            assert (await client.stats("jobs"))["delayed"] == 1

            (later,) = await client.reserve("jobs", wait=5, visibility_timeout=visibility)
            assert later.id == delayed_id
            assert later.attempts == 1
            # Reserved (by the broker's own clock) no earlier than it was due.
            reserved_at = later.lease_deadline - visibility
            assert reserved_at >= later.enqueued_at + delay - EPSILON

    arun(scenario())


# ---------------------------------------------------------- time: leases, retries


def test_expired_lease_is_redelivered_with_attempt_counted(broker: BrokerProcess) -> None:
    with broker.client() as client:
        no_backoff(client, "jobs")
        message_id = client.put("jobs", b"slow")
        (first,) = client.reserve("jobs", visibility_timeout=0.3)
        assert first.attempts == 1

        (second,) = client.reserve("jobs", wait=5)
        assert second.id == message_id
        assert second.attempts == 2
        assert second.lease != first.lease
        assert second.lease_deadline > first.lease_deadline

        with pytest.raises(LeaseLost) as lost:
            client.ack(first)
        assert lost.value.details["failed"] == [message_id]
        status = client.status(message_id)
        assert (status["state"], status["attempts"]) == ("reserved", 2)
        assert status["last_error"] == "lease expired"

        assert client.ack(second) == 1
        totals = client.stats("jobs")["totals"]
        assert (totals["delivered"], totals["expired"], totals["acked"]) == (2, 1, 1)


def test_expired_lease_waits_for_the_default_backoff(broker: BrokerProcess) -> None:
    with broker.client() as client:
        message_id = client.put("jobs", b"slow")
        (first,) = client.reserve("jobs", visibility_timeout=0.2)
        # The lease expires during this wait; the default backoff (1 s +-10%) then holds
        # the message back, so (barring a long stall) the wait ends empty.
        retried = client.reserve("jobs", wait=0.5, visibility_timeout=30)
        status = client.status(message_id)
        assert status["last_error"] == "lease expired"
        if retried:
            (again,) = retried
            assert (again.id, again.attempts) == (message_id, 2)
            assert again.lease_deadline - 30 >= first.lease_deadline + 0.9 - EPSILON
        else:
            assert status["state"] == "delayed"
            assert status["due_at"] >= first.lease_deadline + 0.9 - EPSILON
            assert status["due_at"] <= first.lease_deadline + 1.1 + EPSILON


def test_attempts_used_up_dead_letters_the_message(broker: BrokerProcess) -> None:
    with broker.client() as client:
        no_backoff(client, "jobs", max_attempts=2)
        message_id = client.put("jobs", b"poison")
        (first,) = client.reserve("jobs")
        assert first.max_attempts == 2
        assert client.nack(first, error="first failure") == 1
        assert client.status(message_id)["state"] == "ready"

        (second,) = client.reserve("jobs", visibility_timeout=0.2)
        assert second.attempts == 2
        # Its lease runs out during this wait and it is dead-lettered, not redelivered.
        assert client.reserve("jobs", wait=0.6) == []

        status = client.status(message_id)
        assert (status["state"], status["attempts"]) == ("dead", 2)
        assert status["dead_reason"] == "max_attempts (2) used up"
        assert status["last_error"] == "lease expired"
        assert status["dead_at"] == second.lease_deadline  # applied as of the deadline
        (dead,) = client.dead_letters("jobs")
        assert dead["id"] == message_id
        assert dead["dead_reason"] == status["dead_reason"]
        stats = client.stats("jobs")
        assert counts(stats) == (0, 0, 0, 1)
        totals = stats["totals"]
        assert (totals["nacked"], totals["expired"], totals["dead_lettered"]) == (1, 1, 1)


def test_per_message_max_attempts_of_one_dead_letters_on_first_nack(
    broker: BrokerProcess,
) -> None:
    with broker.client() as client:
        no_backoff(client, "jobs")  # queue default max_attempts stays 5
        once_id = client.put("jobs", b"once", max_attempts=1)
        again_id = client.put("jobs", b"again")
        messages = client.reserve("jobs", max_messages=2)
        assert [m.max_attempts for m in messages] == [1, 5]
        assert client.nack(messages, error="boom") == 2
        assert client.status(once_id)["state"] == "dead"
        assert client.status(once_id)["last_error"] == "boom"
        assert client.status(again_id)["state"] == "ready"


def test_nack_with_delay_keeps_the_error(broker: BrokerProcess) -> None:
    with broker.client() as client:
        message_id = client.put("jobs", b"retry me")
        (message,) = client.reserve("jobs")
        nacked_after = client.ping()
        assert client.nack(message, delay=1.0, error="smtp 451") == 1
        status = client.status(message_id)
        assert status["state"] == "delayed"
        assert status["last_error"] == "smtp 451"
        assert status["due_at"] >= nacked_after + 1.0 - EPSILON
        assert status["lease_deadline"] is None
        assert client.reserve("jobs") == []

        (again,) = client.reserve("jobs", wait=5)
        assert (again.id, again.attempts) == (message_id, 2)
        with pytest.raises(LeaseLost):
            client.nack(message)  # the first delivery's lease is gone
        assert client.nack(again, delay=0) == 1  # no error text: the last one is kept
        status = client.status(message_id)
        assert (status["state"], status["last_error"]) == ("ready", "smtp 451")


def test_touch_extends_the_lease(broker: BrokerProcess) -> None:
    with broker.client() as client:
        no_backoff(client, "jobs")
        message_id = client.put("jobs", b"long job")
        (message,) = client.reserve("jobs", visibility_timeout=0.5)
        old_deadline = message.lease_deadline
        new_deadline = client.touch(message, seconds=30)
        assert new_deadline > old_deadline + 25
        assert message.lease_deadline == new_deadline
        assert client.status(message_id)["lease_deadline"] == new_deadline

        # Without the touch the lease would have run out 0.5 s in and this would get it.
        assert client.reserve("jobs", wait=0.8) == []
        status = client.status(message_id)
        assert (status["state"], status["attempts"]) == ("reserved", 1)

        shorter = client.touch(message, seconds=20)  # a deadline may also move earlier
        assert old_deadline < shorter < new_deadline - 5
        assert client.status(message_id)["lease_deadline"] == shorter
        stale = Message(id=message.id, queue="jobs", body=b"", lease=message.lease + 1000)
        with pytest.raises(LeaseLost):
            client.touch(stale, seconds=30)
        assert client.ack(message) == 1
        with pytest.raises(LeaseLost):
            client.touch(message)


def test_bury_dead_letters_with_reason(broker: BrokerProcess) -> None:
    with broker.client() as client:
        message_id = client.put("jobs", b"bad data")
        (message,) = client.reserve("jobs")
        assert client.bury(message, reason="unparseable") == 1
        status = client.status(message_id)
        assert (status["state"], status["dead_reason"], status["attempts"]) == (
            "dead",
            "unparseable",
            1,
        )
        with pytest.raises(LeaseLost):
            client.ack(message)
        with pytest.raises(LeaseLost):
            client.bury(message, reason="again")
        assert [d["id"] for d in client.dead_letters("jobs")] == [message_id]
        assert client.stats("jobs")["totals"]["dead_lettered"] == 1


def test_cancel_only_ready_or_delayed(broker: BrokerProcess) -> None:
    with broker.client() as client:
        ready_id = client.put("jobs", b"ready")
        delayed_id = client.put("jobs", b"delayed", delay=3600)
        reserved_id = client.put("jobs", b"reserved", priority=-1)

        assert client.cancel(ready_id) is True
        with pytest.raises(NotFound):
            client.status(ready_id)
        assert client.cancel(ready_id) is False
        assert client.cancel(delayed_id) is True
        with pytest.raises(NotFound):
            client.status(delayed_id)

        (reserved,) = client.reserve("jobs")
        assert reserved.id == reserved_id
        assert client.cancel(reserved_id) is False
        assert client.status(reserved_id)["state"] == "reserved"
        client.bury(reserved, reason="x")
        assert client.cancel(reserved_id) is False
        assert client.status(reserved_id)["state"] == "dead"
        assert client.cancel(10**9) is False
        assert counts(client.stats("jobs")) == (0, 0, 0, 1)


# ---------------------------------------------------------------- pause / resume


def test_paused_queue_accepts_puts_and_delivers_on_resume(broker: BrokerProcess) -> None:
    async def scenario() -> None:
        async with broker.async_client() as admin, broker.async_client() as consumer:
            settings = await admin.pause("jobs")
            assert settings["paused"] is True
            first_id = await admin.put("jobs", b"held")
            assert await admin.reserve("jobs") == []
            assert await admin.reserve(["jobs", "other"]) == []
            stats = await admin.stats("jobs")
            assert (stats["paused"], stats["ready"]) == (True, 1)

            waiting = await start_waiting(consumer, "jobs", wait=10)
            assert (await admin.stats("jobs"))["waiting"] == 1
            await admin.put("other", b"elsewhere")
            (other,) = await admin.reserve(["jobs", "other"])
            assert other.queue == "other"
            assert not waiting.done()

            assert (await admin.resume("jobs"))["paused"] is False
            (delivered,) = await asyncio.wait_for(waiting, 5)
            assert delivered.id == first_id
            stats = await admin.stats("jobs")
            assert (stats["paused"], stats["waiting"], stats["reserved"]) == (False, 0, 1)

    arun(scenario())


def test_paused_queue_still_ages_its_messages(broker: BrokerProcess) -> None:
    with broker.client() as client:
        no_backoff(client, "jobs")
        client.put("jobs", b"reserved")
        (reserved,) = client.reserve("jobs", visibility_timeout=0.2)
        client.pause("jobs")
        delayed_id = client.put("jobs", b"delayed", delay=0.2)
        # A long-poll on another queue is the clock: by its end both have come due.
        assert client.reserve("clock", wait=0.5) == []
        assert client.status(delayed_id)["state"] == "ready"
        status = client.status(reserved.id)
        assert (status["state"], status["last_error"]) == ("ready", "lease expired")
        assert client.reserve("jobs", max_messages=5) == []

        client.resume("jobs")
        again = client.reserve("jobs", max_messages=5)
        assert [m.id for m in again] == [reserved.id, delayed_id]  # expired first, due later


def test_each_way_of_becoming_ready_wakes_a_waiting_consumer(broker: BrokerProcess) -> None:
    async def scenario() -> None:
        async with broker.async_client() as admin, broker.async_client() as consumer:
            await admin.configure("jobs", backoff={"type": "fixed", "delay": 0}, max_attempts=3)
            message_id = await admin.put("jobs", b"m")
            (held,) = await admin.reserve("jobs")

            waiting = await start_waiting(consumer, "jobs", wait=20)
            await admin.nack(held)
            (message,) = await asyncio.wait_for(waiting, 5)
            assert (message.id, message.attempts) == (message_id, 2)

            assert await consumer.bury(message, reason="replay me") == 1
            waiting = await start_waiting(consumer, "jobs", wait=20)
            assert await admin.replay("jobs") == 1
            (message,) = await asyncio.wait_for(waiting, 5)
            assert (message.id, message.attempts) == (message_id, 1)
            await consumer.ack(message)

            # Resumed, a queue hands a waiter up to its max at once, best first.
            await admin.pause("jobs")
            for priority in (1, 3, 2):
                await admin.put("jobs", f"p{priority}".encode(), priority=priority)
            waiting = await start_waiting(consumer, "jobs", wait=20, max_messages=5)
            await admin.resume("jobs")
            batch = await asyncio.wait_for(waiting, 5)
            assert [m.body for m in batch] == [b"p3", b"p2", b"p1"]

    arun(scenario())


# ------------------------------------------------------------------ dead letters


def test_peek_returns_bodies_in_delivery_order_without_leasing(broker: BrokerProcess) -> None:
    with broker.client() as client:
        client.put("look", b"low", priority=1)
        client.put("look", b"high", priority=5)
        client.put("look", b"later", delay=60)
        assert [item["body"] for item in client.peek("look")] == [b"high", b"low"]
        assert [item["body"] for item in client.peek("look", "delayed")] == [b"later"]
        assert client.stats("look")["reserved"] == 0
        assert [m.body for m in client.reserve("look", max_messages=2)] == [b"high", b"low"]
        assert [item["state"] for item in client.peek("look", "reserved")] == ["reserved"] * 2
        with pytest.raises(BadRequest, match="state must be one of"):
            client.peek("look", "gone")
        with pytest.raises(NotFound):
            client.peek("never-used")


def test_dead_letters_paging_replay_and_purge(broker: BrokerProcess) -> None:
    with broker.client() as client:
        no_backoff(client, "jobs")
        ids = client.put_many("jobs", [f"m{i}".encode() for i in range(5)], max_attempts=1)
        messages = client.reserve("jobs", max_messages=5)
        assert client.nack(messages, error="bad") == 5
        assert client.stats("jobs")["dead"] == 5

        pages, after = [], None
        while page := client.dead_letters("jobs", limit=2, after=after):
            pages.append([item["id"] for item in page])
            after = page[-1]["id"]
        assert pages == [ids[0:2], ids[2:4], ids[4:5]]
        item = client.dead_letters("jobs", limit=1)[0]
        assert (item["state"], item["attempts"], item["last_error"]) == ("dead", 1, "bad")
        assert item["dead_reason"]

        assert client.replay("jobs", [ids[1], ids[3], 10**9]) == 2
        for message_id in (ids[1], ids[3]):
            status = client.status(message_id)
            assert (status["state"], status["attempts"], status["dead_reason"]) == (
                "ready",
                0,
                None,
            )
            assert (status["last_error"], status["max_attempts"]) == ("bad", 1)
        assert [d["id"] for d in client.dead_letters("jobs")] == [ids[0], ids[2], ids[4]]
        replayed = client.reserve("jobs", max_messages=5)
        assert [m.id for m in replayed] == [ids[1], ids[3]]
        assert all(m.attempts == 1 for m in replayed)
        client.ack(replayed)

        assert client.replay("jobs", [ids[1]]) == 0  # gone, not dead
        assert client.purge_dead("jobs") == 3
        assert client.dead_letters("jobs") == []
        for message_id in (ids[0], ids[2], ids[4]):
            with pytest.raises(NotFound):
                client.status(message_id)
        assert counts(client.stats("jobs")) == (0, 0, 0, 0)
        assert client.purge_dead("jobs") == 0


def test_replay_everything_resets_attempts(broker: BrokerProcess) -> None:
    with broker.client() as client:
        no_backoff(client, "jobs", max_attempts=1)
        ids = client.put_many("jobs", [b"a", b"b"])
        for message in client.reserve("jobs", max_messages=2):
            client.bury(message, reason="later")
        assert client.replay("jobs") == 2
        again = client.reserve("jobs", max_messages=2)
        assert [(m.id, m.attempts) for m in again] == [(ids[0], 1), (ids[1], 1)]


def test_purge_drops_ready_and_delayed_only(broker: BrokerProcess) -> None:
    with broker.client() as client:
        client.put("jobs", b"reserved", priority=9)
        (reserved,) = client.reserve("jobs")
        client.put("jobs", b"dead", priority=9)
        (dead,) = client.reserve("jobs")
        client.bury(dead, reason="x")
        ready_ids = client.put_many("jobs", [b"r1", b"r2", b"r3"])
        delayed_ids = client.put_many("jobs", [b"d1", b"d2"], delay=3600)
        client.put("other", b"untouched")

        assert client.purge("jobs") == 5
        for message_id in ready_ids + delayed_ids:
            with pytest.raises(NotFound):
                client.status(message_id)
        assert counts(client.stats("jobs")) == (0, 0, 1, 1)
        assert client.stats("other")["ready"] == 1
        assert client.ack(reserved) == 1
        assert client.purge("jobs") == 0


def test_dead_letters_expire_after_the_ttl_they_died_with(broker: BrokerProcess) -> None:
    with broker.client() as client:
        client.configure("jobs", dead_letter_ttl=0.2)
        first_id, second_id = client.put_many("jobs", [b"a", b"b"])
        (first,) = client.reserve("jobs")
        client.bury(first, reason="short ttl")
        client.configure("jobs", dead_letter_ttl=None)  # does not reach existing dead letters
        (second,) = client.reserve("jobs")
        client.bury(second, reason="kept")
        assert client.reserve("clock", wait=0.5) == []  # the clock: past the first's ttl
        with pytest.raises(NotFound):
            client.status(first_id)
        assert client.status(second_id)["state"] == "dead"
        assert [d["id"] for d in client.dead_letters("jobs")] == [second_id]
        assert counts(client.stats("jobs")) == (0, 0, 0, 1)


# ------------------------------------------------------------------------ stats


def test_stats_totals_and_queue_listing(broker: BrokerProcess) -> None:
    with broker.client() as client:
        with pytest.raises(NotFound):
            client.stats("never-used")
        no_backoff(client, "b-jobs", max_attempts=2)
        client.put_many("b-jobs", [b"1", b"2", b"3", b"4"])
        client.put("b-jobs", b"later", delay=3600)
        client.put("a-jobs", b"x")
        one, two, three = client.reserve("b-jobs", max_messages=3)
        client.ack(one)
        client.nack(two)  # back to ready, attempts 1 of 2
        client.bury(three, reason="r")
        (again,) = client.reserve("b-jobs")
        assert again.body == b"4"  # ready before the nacked "2" came back
        totals = client.stats("b-jobs")["totals"]
        assert totals == {
            "put": 5,
            "delivered": 4,
            "acked": 1,
            "nacked": 1,
            "expired": 0,
            "dead_lettered": 1,
        }
        listing = client.queues()
        assert [q["name"] for q in listing] == ["a-jobs", "b-jobs"]
        a_jobs, b_jobs = listing
        assert (a_jobs["ready"], a_jobs["delayed"], a_jobs["reserved"], a_jobs["dead"]) == (
            1,
            0,
            0,
            0,
        )
        assert (b_jobs["ready"], b_jobs["delayed"], b_jobs["reserved"], b_jobs["dead"]) == (
            1,
            1,
            1,
            1,
        )
        assert b_jobs["paused"] is False


def test_ops_on_a_missing_queue_are_not_found(broker: BrokerProcess) -> None:
    with broker.client() as client:
        for call in (
            client.stats,
            client.purge,
            client.dead_letters,
            client.replay,
            client.purge_dead,
        ):
            with pytest.raises(NotFound):
                call("nope")
        with pytest.raises(NotFound):
            client.status(12345)
        assert client.queues() == []  # none of them created the queue


# --------------------------------------------------------------------- long-polls


def test_waiting_consumers_are_served_first_come_first_served(broker: BrokerProcess) -> None:
    async def scenario() -> None:
        consumers = [broker.async_client(client_name=f"consumer-{i}") for i in range(4)]
        for consumer in consumers:
            await consumer.connect()
        async with broker.async_client() as producer:
            # Consumer 2 also listens on "side", which never gets a message.
            waits = []
            for index, consumer in enumerate(consumers):
                queues = ["jobs", "side"] if index == 2 else "jobs"
                waits.append(await start_waiting(consumer, queues, wait=20))
                assert (await producer.stats("jobs"))["waiting"] == index + 1

            pending = set(waits)
            for index in range(len(waits)):
                await producer.put("jobs", f"m{index}".encode())
                done, pending = await asyncio.wait(
                    pending, timeout=5, return_when=asyncio.FIRST_COMPLETED
                )
                assert done == {waits[index]}, f"message {index} went to the wrong consumer"
                (message,) = waits[index].result()
                assert message.body == f"m{index}".encode()
            stats = await producer.stats("jobs")
            assert (stats["waiting"], stats["reserved"], stats["ready"]) == (0, 4, 0)
            assert "side" not in {q["name"] for q in await producer.queues()}  # unused: gone
        for consumer in consumers:
            await consumer.close()

    arun(scenario())


def test_long_poll_ends_empty_at_its_deadline(broker: BrokerProcess) -> None:
    async def scenario() -> None:
        async with broker.async_client() as consumer, broker.async_client() as producer:
            await producer.put("jobs", b"seed")
            (seed,) = await producer.reserve("jobs")
            started = await consumer.ping()
            assert await consumer.reserve("jobs", wait=0.3) == []
            ended = await consumer.ping()
            assert ended >= started + 0.3 - EPSILON  # broker clock: not answered early
            # The timed-out wait is gone: it must not swallow the next message.
            assert (await producer.stats("jobs"))["waiting"] == 0  # (seed keeps the queue)
            message_id = await producer.put("jobs", b"after")
            assert (await producer.status(message_id))["state"] == "ready"
            (message,) = await consumer.reserve("jobs", wait=5)
            assert message.id == message_id
            await producer.ack([seed, message])

    arun(scenario())
    with broker.client() as client:
        assert client.reserve("sync-jobs", wait=0.2) == []
        assert client.queues() == []  # the wait was all it had: forgotten with it


def test_closed_connection_gives_up_its_long_poll(broker: BrokerProcess) -> None:
    async def scenario() -> None:
        client = broker.async_client()
        await client.connect()
        waiting = await start_waiting(client, "jobs", wait=20)
        await client.close()
        with pytest.raises(ConnectionClosed):
            await waiting

    arun(scenario())
    with broker.client() as client:
        wait_for_state(lambda: client.queues() == [])  # the wait was its only use
        message_id = client.put("jobs", b"for whoever comes next")
        assert client.status(message_id)["state"] == "ready"
        assert client.stats("jobs")["totals"]["delivered"] == 0


def test_long_poll_does_not_block_other_calls_on_its_connection(broker: BrokerProcess) -> None:
    async def scenario() -> None:
        async with broker.async_client() as client:
            waiting = await start_waiting(client, "slow", wait=20)
            await client.configure("fast", **KEEP)
            put_id = await client.put("fast", b"f")
            (fast,) = await client.reserve("fast")
            assert fast.id == put_id
            assert await client.ack(fast) == 1
            assert (await client.stats("slow"))["waiting"] == 1
            results = await asyncio.gather(client.ping(), client.stats("fast"), client.queues())
            assert results[1]["totals"]["acked"] == 1
            assert not waiting.done()
            slow_id = await client.put("slow", b"s")
            (slow,) = await asyncio.wait_for(waiting, 5)
            assert slow.id == slow_id

    arun(scenario())


# ------------------------------------------------------------------- concurrency


def test_many_concurrent_consumers_ack_every_message_exactly_once(
    broker: BrokerProcess,
) -> None:
    total, producers, consumers, batch = 2000, 4, 20, 25
    queue = "load"

    async def scenario() -> None:
        async with broker.async_client() as client:
            await client.configure(queue, **KEEP)  # else forgotten whenever it drains
        put_bodies: dict[int, bytes] = {}
        acked: list[int] = []
        acked_bodies: dict[int, bytes] = {}
        all_acked = asyncio.Event()

        async def produce(index: int) -> None:
            share = total // producers
            async with broker.async_client() as client:
                if index % 2:
                    for n in range(share):
                        body = f"p{index}-{n}".encode()
                        put_bodies[await client.put(queue, body)] = body
                else:
                    for start in range(0, share, batch):
                        bodies = [f"p{index}-{n}".encode() for n in range(start, start + batch)]
                        ids = await client.put_many(queue, bodies)
                        put_bodies.update(zip(ids, bodies, strict=True))

        async def consume(index: int) -> None:
            async with broker.async_client() as client:
                while not all_acked.is_set():
                    messages = await client.reserve(queue, max_messages=1 + index % 5, wait=0.5)
                    if not messages:
                        continue
                    assert await client.ack(messages) == len(messages)
                    for message in messages:
                        acked.append(message.id)
                        acked_bodies[message.id] = message.body
                    if len(acked) >= total:
                        all_acked.set()

        await asyncio.gather(
            *(consume(i) for i in range(consumers)), *(produce(i) for i in range(producers))
        )
        assert len(put_bodies) == total
        assert len(acked) == len(set(acked)), "a message was acked twice"
        assert set(acked) == set(put_bodies), "messages lost or invented"
        assert acked_bodies == put_bodies
        async with broker.async_client() as client:
            stats = await client.stats(queue)
        assert counts(stats) == (0, 0, 0, 0)
        assert stats["waiting"] == 0
        assert stats["totals"] == {
            "put": total,
            "delivered": total,
            "acked": total,
            "nacked": 0,
            "expired": 0,
            "dead_lettered": 0,
        }

    arun(scenario(), timeout=45)


def test_sync_client_shared_by_threads(broker: BrokerProcess) -> None:
    threads, per_thread = 8, 40
    with broker.client() as client:
        client.configure("jobs", **KEEP)

        def produce(index: int) -> list[int]:
            return [client.put("jobs", f"{index}-{n}".encode()) for n in range(per_thread)]

        def consume(_: int) -> list[tuple[int, bytes]]:
            taken = []
            while messages := client.reserve("jobs"):
                (message,) = messages
                client.ack(message)
                taken.append((message.id, message.body))
            return taken

        with ThreadPoolExecutor(threads) as pool:
            put_ids = [i for ids in pool.map(produce, range(threads)) for i in ids]
            taken = [t for part in pool.map(consume, range(threads)) for t in part]
        assert len(set(put_ids)) == threads * per_thread
        assert sorted(message_id for message_id, _ in taken) == sorted(put_ids)
        assert {body for _, body in taken} == {
            f"{i}-{n}".encode() for i in range(threads) for n in range(per_thread)
        }
        stats = client.stats("jobs")
        assert counts(stats) == (0, 0, 0, 0)
        assert stats["totals"]["acked"] == threads * per_thread


# ----------------------------------------------------------- connecting, shutdown


def test_from_url(broker: BrokerProcess) -> None:
    with Client.from_url(broker.url, timeout=5) as client:
        message_id = client.put("jobs", b"via url")

    async def scenario() -> int:
        async with AsyncClient.from_url(broker.url, timeout=5) as client:
            (message,) = await client.reserve("jobs")
            await client.ack(message)
            return message.id

    assert arun(scenario()) == message_id
    with pytest.raises(ValueError):
        Client.from_url(f"http://{broker.host}:{broker.port}")


def restart(broker: BrokerProcess, log_path: Path) -> BrokerProcess:
    """Stop ``broker`` and start another on the same port."""
    assert broker.stop() == 0
    return start_broker(log_path, "--port", str(broker.port))


def test_sync_client_reconnects_after_a_broker_restart(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    with broker.client() as client:
        assert client.ping() > 0
        restarted = restart(broker, tmp_path / "restarted.log")
        try:
            with pytest.raises(ConnectionClosed):
                client.ping()  # the old connection is gone...
            assert client.ping() > 0  # ...and the next call connects again
            assert client.put("jobs", b"after restart") == 1
        finally:
            stop_broker(restarted)


def test_async_client_reconnects_after_a_broker_restart(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    client = broker.async_client()

    async def retry_after_restart() -> float:
        # One loop turn: the loop reads the old connection's EOF and closes its transport;
        # connection_lost is only scheduled. (The broker closed it before this started.)
        await asyncio.sleep(0)
        try:
            return await client.ping()
        except ConnectionClosed:  # the loss may be noticed by this call...
            return await client.ping()  # ...but the next one must connect again

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(client.ping()) > 0
        restarted = restart(broker, tmp_path / "restarted.log")
        try:
            # (Not under wait_for: its extra task would add loop turns. The client's own
            # timeout bounds each call.)
            assert loop.run_until_complete(retry_after_restart()) > 0
            loop.run_until_complete(client.close())
        finally:
            stop_broker(restarted)
    finally:
        loop.close()


def test_pipelined_replies_that_need_no_commit_keep_their_order_and_never_wait(
    broker: BrokerProcess,
) -> None:
    """Pings need no commit, so they are answered in order and may overtake the put's
    reply, which waits for its commit; the reserve it woke delivers the message no
    earlier than the put is confirmed."""
    with broker.raw() as connection:
        put = {"queue": "jobs", "messages": [{"body": b"x"}]}
        connection.send_bytes(
            frame([5, "reserve", {"queues": ["jobs"], "wait": 10}])
            + b"".join(frame([n, "ping", {}]) for n in range(6, 11))
            + frame([11, "put", put])
            + frame([12, "ping", {}])
        )
        order = [connection.read_reply()[0] for _ in range(8)]
        assert sorted(order) == [5, 6, 7, 8, 9, 10, 11, 12]
        assert [n for n in order if n not in (5, 11)] == [6, 7, 8, 9, 10, 12]
        assert order.index(5) > order.index(11)  # delivered once the put is confirmed


def test_connection_refused_is_connection_closed() -> None:
    port = free_port()
    with pytest.raises(ConnectionClosed):
        Client("127.0.0.1", port, timeout=5).ping()

    async def scenario() -> None:
        with pytest.raises(ConnectionClosed):
            await AsyncClient("127.0.0.1", port, timeout=5).ping()

    arun(scenario())


def test_sigterm_answers_waiting_reserves_and_exits_zero(broker: BrokerProcess) -> None:
    sync_results: list[Any] = []
    observer = broker.client()
    sync_consumer = broker.client()
    sync_consumer.connect()

    def sync_wait() -> None:
        try:
            sync_results.append(sync_consumer.reserve("jobs", wait=30))
        except ConnectionClosed as error:
            sync_results.append(error)

    async def scenario() -> None:
        async with broker.async_client() as client:
            await client.put("jobs", b"stored")
            (held,) = await client.reserve("jobs")
            waiting = await start_waiting(client, "jobs", wait=30)
            thread = threading.Thread(target=sync_wait)
            thread.start()
            wait_for_state(lambda: observer.stats("jobs")["waiting"] == 2)
            observer.close()

            broker.process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(waiting, 10) == []
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 10)
            assert sync_results == [[]]
            with pytest.raises(ConnectionClosed):
                await client.ack(held)

    arun(scenario())
    assert broker.process.wait(timeout=10) == 0
    sync_consumer.close()
    with pytest.raises(ConnectionClosed):
        Client(broker.host, broker.port, timeout=5).ping()


def test_sigint_also_stops_the_broker_cleanly(broker: BrokerProcess) -> None:
    with broker.client() as client:
        client.put("jobs", b"x")
        broker.process.send_signal(signal.SIGINT)
        assert broker.process.wait(timeout=10) == 0
        with pytest.raises(ConnectionClosed):
            client.ping()


def _steep_backoff_message(client: Client, attempts: int) -> Message:
    """A message delivered ``attempts`` times on a queue whose backoff is capped at 0.05 s
    but grows by 100x per attempt."""
    client.configure(
        "jobs",
        max_attempts=None,
        backoff={"type": "exponential", "base": 1.0, "factor": 100.0, "cap": 0.05},
    )
    client.put("jobs", b"flaky")
    for _ in range(attempts - 1):
        (message,) = client.reserve("jobs")
        client.nack(message, delay=0)  # an explicit delay skips the backoff
    (message,) = client.reserve("jobs")
    assert message.attempts == attempts
    return message


def test_nack_after_many_attempts_with_steep_backoff_is_capped(broker: BrokerProcess) -> None:
    with broker.client() as client:
        message = _steep_backoff_message(client, 160)
        client.nack(message)  # the queue's backoff: capped at 0.05 s
        (again,) = client.reserve("jobs", wait=5)
        assert (again.id, again.attempts) == (message.id, 161)


def test_lease_expiry_after_many_attempts_with_steep_backoff(broker: BrokerProcess) -> None:
    # Were the timer to die on an error, even this long-poll's deadline would never fire:
    # the short client timeout bounds the wait.
    with broker.client(timeout=1) as client:
        message = _steep_backoff_message(client, 159)
        client.touch(message, seconds=0.1)
        (again,) = client.reserve("jobs", wait=2)
        assert (again.id, again.attempts) == (message.id, 160)


def test_a_connection_pipelining_thousands_of_puts_gets_every_reply(broker: BrokerProcess) -> None:
    """More puts in flight than a connection may have waiting for commits, and more than
    one turn answers: reading pauses and resumes, and no reply is lost or stuck."""
    count = 5000
    with broker.raw() as connection:
        put = {"queue": "flood", "messages": [{"body": b"f" * 100}]}
        connection.send_bytes(b"".join(frame([n, "put", put]) for n in range(1, count + 1)))
        replies = [connection.read_reply() for _ in range(count)]
    assert sorted(reply[0] for reply in replies) == list(range(1, count + 1))
    assert all(reply[1] for reply in replies), [r for r in replies if not r[1]][:3]
    ids = [reply[2]["ids"][0] for reply in sorted(replies)]
    assert ids == sorted(ids) and len(set(ids)) == count
    with broker.client() as client:
        assert client.stats("flood")["ready"] == count


def test_a_half_closed_connection_gets_a_reply_to_every_pipelined_request(
    broker: BrokerProcess,
) -> None:
    """More requests than one turn answers, then a half-close: the buffered ones are still
    answered before the broker closes."""
    with broker.raw() as connection:
        put = {"queue": "half", "messages": [{"body": b"h"}]}
        requests = [
            frame([n, "ping" if n % 2 else "put", {} if n % 2 else put]) for n in range(1, 301)
        ]
        connection.send_bytes(b"".join(requests))
        connection.sock.shutdown(socket.SHUT_WR)
        replies = connection.read_until_closed()
    assert sorted(reply[0] for reply in replies) == list(range(1, 301))
    assert all(reply[1] for reply in replies)
