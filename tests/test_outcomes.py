"""Dedup keys, job results, ``put_and_wait`` and progress against the real daemon.

Nothing here sleeps to let time pass: where the broker's clock must move on (a dedup window
running out), the test waits on a long-poll ``reserve(wait=...)`` of an empty queue, whose
empty reply is the event. Every concurrent scenario is bounded by ``arun``'s timeout.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from client import AsyncClient, Client
from client.errors import BadRequest, JobFailed, LeaseLost, NotFound, Timeout
from tests.conftest import KEEP, BrokerProcess, error_code, start_broker, stop_broker

T = TypeVar("T")
CLOCK = "clock"  # never has messages: a long-poll on it is how a test lets time pass
CALLERS = 100
WORKERS = 8


def arun(coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    """Run an async scenario, bounded so a lost reply fails instead of hanging."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


def let_time_pass(client: Client, seconds: float) -> None:
    """Return once the broker's clock has moved on by at least ``seconds``."""
    assert client.reserve(CLOCK, wait=seconds) == []


async def started(client: AsyncClient, coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """Start a waiting call and return its task once the broker has registered the wait:
    the broker handles a connection's requests in order, so a ping's reply after it means
    the call has been handled (and found nothing to return yet)."""
    task = asyncio.create_task(coroutine)
    await asyncio.sleep(0)
    await client.ping()
    assert not task.done(), f"the call returned at once: {task.result()!r}"
    return task


# ---------------------------------------------------------------------- dedup


def test_concurrent_puts_with_one_key_create_one_message_until_the_window_ends(
    broker: BrokerProcess,
) -> None:
    window = 0.5
    with broker.client() as client:
        client.configure("orders", dedup_window=window)
        barrier = threading.Barrier(20)
        ids: list[int] = []
        duplicates: list[bool] = []
        lock = threading.Lock()

        def put_order(_: int) -> None:
            with broker.client() as own:
                own.connect()
                barrier.wait(timeout=10)
                message_id = own.put("orders", b"order 42", key="order-42")
            with lock:
                ids.append(message_id)
                duplicates.append(message_id.duplicate)

        threads = [threading.Thread(target=put_order, args=(n,)) for n in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=20)
        assert len(ids) == 20, "a putter did not finish"
        assert len(set(ids)) == 1 and sorted(duplicates) == [False] + [True] * 19
        stats = client.stats("orders")
        assert (stats["ready"], stats["totals"]["put"]) == (1, 1)

        (message,) = client.reserve("orders")
        assert message.id == ids[0]
        before_ack = client.ping()
        client.ack(message)
        again = client.put("orders", b"order 42", key="order-42")
        if client.ping() < before_ack + window:  # (else too slow a machine to tell)
            assert again == ids[0] and again.duplicate
        let_time_pass(client, window)  # started after the ack: the window is over by its end
        fresh = client.put("orders", b"order 42", key="order-42")
        assert not fresh.duplicate and fresh > ids[0]
        assert client.put("orders", b"order 42", key="order-42") == fresh
        assert client.stats("orders")["ready"] == 1


# -------------------------------------------------------------- put_and_wait


async def _serve(port: int, host: str, queue: str) -> int:
    """A worker: answers each request with a result computed from its body, until it
    reserves a ``stop`` message. Returns how many requests it answered."""
    answered = 0
    async with AsyncClient(host, port, timeout=10) as worker:
        while True:
            for message in await worker.reserve(queue, wait=10):
                if message.body == b"stop":
                    await worker.ack(message)
                    return answered
                number = int(message.body)
                await worker.ack(message, result={"square": number * number, "of": number})
                answered += 1


def test_put_and_wait_round_trip_under_load(broker: BrokerProcess) -> None:
    async def call(number: int) -> Any:
        async with broker.async_client(timeout=10) as caller:
            return await caller.put_and_wait("rpc", str(number), timeout=20)

    async def scenario() -> None:
        async with broker.async_client() as admin:
            await admin.configure("rpc", **KEEP)  # its totals are read once it is drained
        workers = [
            asyncio.create_task(_serve(broker.port, broker.host, "rpc")) for _ in range(WORKERS)
        ]
        answers = await asyncio.gather(*(call(n) for n in range(CALLERS)))
        assert answers == [{"square": n * n, "of": n} for n in range(CALLERS)]
        async with broker.async_client() as admin:
            await admin.put_many("rpc", [b"stop"] * WORKERS)
            answered = await asyncio.gather(*workers)
            assert sum(answered) == CALLERS
            stats = await admin.stats("rpc")
        assert (stats["ready"], stats["reserved"], stats["totals"]["acked"]) == (
            0,
            0,
            CALLERS + WORKERS,
        )

    arun(scenario())


def test_put_and_wait_times_out_cleanly_and_the_job_stays_queued(broker: BrokerProcess) -> None:
    with broker.client() as client:
        with pytest.raises(Timeout) as timed_out:
            client.put_and_wait("rpc", b"7", timeout=0.2)
        assert "stays queued" in str(timed_out.value)
        assert client.ping() > 0  # the same connection carries on
        (job,) = client.peek("rpc")
        assert job["body"] == b"7" and job["state"] == "ready"
        (message,) = client.reserve("rpc")
        client.ack(message, result=49)
        assert client.result(job["id"]) == 49


def test_put_and_wait_reports_dead_lettered_jobs_as_failures(broker: BrokerProcess) -> None:
    async def scenario() -> None:
        async with broker.async_client() as caller, broker.async_client() as worker:
            buried = await started(caller, caller.put_and_wait("rpc", b"bad", timeout=10))
            (message,) = await worker.reserve("rpc", wait=5)
            await worker.bury(message, reason="no such seat")
            with pytest.raises(JobFailed) as failed:
                await buried
            assert (failed.value.state, failed.value.reason) == ("dead", "no such seat")
            assert failed.value.id == message.id and "no such seat" in str(failed.value)

            nacked = await started(
                caller, caller.put_and_wait("rpc", b"flaky", timeout=10, max_attempts=1)
            )
            (message,) = await worker.reserve("rpc", wait=5)
            await worker.nack(message, error="ValueError: row 99")
            with pytest.raises(JobFailed) as failed:
                await nacked
            assert failed.value.reason == "max_attempts (1) used up"
            assert failed.value.last_error == "ValueError: row 99"

    arun(scenario())


def test_put_and_wait_with_a_key_answers_a_repeated_request_with_the_first_result(
    broker: BrokerProcess,
) -> None:
    async def scenario() -> None:
        async with broker.async_client() as caller, broker.async_client() as worker:
            first = await started(
                caller, caller.put_and_wait("rpc", b"3", timeout=10, key="request-1")
            )
            repeat = await started(
                caller, caller.put_and_wait("rpc", b"3", timeout=10, key="request-1")
            )
            (message,) = await worker.reserve("rpc", wait=5)
            await worker.ack(message, result="three")
            assert [await first, await repeat] == ["three", "three"]
            assert await caller.put_and_wait("rpc", b"3", timeout=1, key="request-1") == "three"
            # One put only: the repeats found the key (the emptied queue was forgotten,
            # its dedup window was not).
            assert await caller.queues() == []

    arun(scenario())


@pytest.mark.parametrize("ending", ["acked without a result", "cancelled"])
def test_put_and_wait_on_the_key_of_a_job_that_ended_without_a_result(
    broker: BrokerProcess, ending: str
) -> None:
    """Within the dedup window a repeated request is the first one; when that ended
    without a kept result, put_and_wait should still answer as its contract says (None
    for an ack without a result, JobFailed for a removed job), not NotFound."""
    with broker.client() as client:
        first = client.put("rpc", b"1", key="request-1", delay=60 if ending == "cancelled" else 0)
        if ending == "cancelled":
            assert client.cancel(first)
            with pytest.raises(JobFailed) as failed:
                client.put_and_wait("rpc", b"1", timeout=1, key="request-1")
            assert failed.value.state == "gone"
        else:
            (message,) = client.reserve("rpc")
            client.ack(message)
            assert client.put_and_wait("rpc", b"1", timeout=1, key="request-1") is None


def test_a_caller_that_goes_away_leaves_the_job_to_finish(broker: BrokerProcess) -> None:
    with broker.raw() as raw:
        raw.send_request("put_and_wait", {"queue": "rpc", "message": {"body": b"x"}, "timeout": 30})
        raw.call("ping", {})  # handled in order: the put is in and the wait registered
    with broker.client() as client:
        (message,) = client.reserve("rpc", wait=5)
        client.ack(message, result="nobody listening")
        assert client.result(message.id) == "nobody listening"
        assert client.queues() == []  # acked: nothing left in it
    broker.assert_alive()


# ------------------------------------------------------------ results, status


def test_result_waits_for_the_ack_then_is_kept(broker: BrokerProcess) -> None:
    async def scenario() -> None:
        async with broker.async_client() as caller, broker.async_client() as worker:
            message_id = await caller.put("jobs", b"resize")
            with pytest.raises(Timeout):
                await caller.result(message_id)  # pending, and no wait asked for
            waiting = await started(caller, caller.result(message_id, wait=10))
            (message,) = await worker.reserve("jobs")
            await worker.ack(message, result={"width": 640, "thumb": b"\x89PNG"})
            assert await waiting == {"width": 640, "thumb": b"\x89PNG"}
            assert await caller.result(message_id, wait=10) == {"width": 640, "thumb": b"\x89PNG"}
            status = await caller.status(message_id)
            assert status["state"] == "done" and status["queue"] == "jobs"
            assert status["result"] == {"width": 640, "thumb": b"\x89PNG"}
            assert status["done_at"] >= message.enqueued_at

    arun(scenario())


def test_result_of_a_cancelled_unknown_or_resultless_job(broker: BrokerProcess) -> None:
    async def scenario() -> None:
        async with broker.async_client() as caller, broker.async_client() as admin:
            delayed = await caller.put("jobs", b"later", delay=60)
            waiting = await started(caller, caller.result(delayed, wait=10))
            assert await admin.cancel(delayed) is True
            with pytest.raises(JobFailed) as failed:
                await waiting
            assert failed.value.state == "gone" and failed.value.reason is None
            with pytest.raises(NotFound):
                await caller.result(10**9)
            plain = await caller.put("jobs", b"no result")
            (message,) = await admin.reserve("jobs")
            await admin.ack(message)
            with pytest.raises(NotFound):
                await caller.result(plain, wait=1)

    arun(scenario())


def test_result_ttl_zero_keeps_no_result(broker: BrokerProcess) -> None:
    with broker.client() as client:
        client.configure("jobs", result_ttl=0)
        message_id = client.put("jobs", b"x")
        (message,) = client.reserve("jobs")
        client.ack(message, result="kept?")
        with pytest.raises(NotFound):
            client.status(message_id)


def test_progress_is_shown_in_status_and_needs_the_current_lease(broker: BrokerProcess) -> None:
    with broker.client() as client:
        client.configure("jobs", backoff={"type": "fixed", "delay": 0})
        message_id = client.put("jobs", b"video")
        (stale,) = client.reserve("jobs")
        client.progress(stale, 25, "decoding")
        assert client.status(message_id)["progress"] == {"percent": 25, "note": "decoding"}
        client.touch(stale, seconds=0.1)  # the lease runs out soon...
        (current,) = client.reserve("jobs", wait=10)  # ...and the message comes back
        assert current.id == message_id and current.attempts == 2
        with pytest.raises(LeaseLost):
            client.progress(stale, 50, "too late")
        client.progress(current, 75.5)
        assert client.status(message_id)["progress"] == {"percent": 75.5, "note": ""}
        client.ack(current)
        with pytest.raises(LeaseLost):
            client.progress(current, 100, "after the ack")


# ---------------------------------------------------------------- durability


def test_results_progress_and_dedup_keys_survive_kill_9(tmp_path: Path) -> None:
    first = start_broker(tmp_path / "first.log")
    try:
        with first.client() as client:
            client.configure("jobs", dedup_window=3600, result_ttl=3600)
            done = client.put("jobs", b"done", key="order-1")
            held = client.put("jobs", b"held", key="order-2")
            waiting = client.put("jobs", b"waiting", key="order-3")
            cancelled = client.put("jobs", b"cancelled", key="order-4")
            assert client.cancel(cancelled)
            finished, holding = client.reserve("jobs", max_messages=2)
            client.ack(finished, result={"seat": "12C"})
            client.progress(holding, 40, "printing")
    finally:
        first.process.kill()
        first.process.wait()
    restarted = start_broker(tmp_path / "restarted.log")
    try:
        with restarted.client() as client:
            assert client.result(done) == {"seat": "12C"}
            assert client.status(held)["progress"] == {"percent": 40, "note": "printing"}
            client.progress(holding, 60, "lease survived")
            for key, message_id in [
                ("order-1", done),
                ("order-2", held),
                ("order-3", waiting),
                ("order-4", cancelled),
            ]:
                again = client.put("jobs", b"again", key=key)
                assert (again, again.duplicate) == (message_id, True), key
            assert client.stats("jobs")["totals"]["put"] == 4
    finally:
        stop_broker(restarted)


# ----------------------------------------------------------------- bad input


BAD_REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("put", {"queue": "jobs", "messages": [{"body": b"x", "key": 5}]}),
    ("put", {"queue": "jobs", "messages": [{"body": b"x", "key": ""}]}),
    ("put", {"queue": "jobs", "messages": [{"body": b"x", "key": "k" * 257}]}),
    ("put", {"queue": "jobs", "messages": [{"body": b"x", "key": b"bytes"}]}),
    ("put_and_wait", {"queue": "jobs", "message": {"body": b"x"}, "timeout": "1"}),
    ("put_and_wait", {"queue": "jobs", "message": {"body": b"x"}, "timeout": 0}),
    ("put_and_wait", {"queue": "jobs", "message": {"body": b"x"}, "timeout": 1e9}),
    ("put_and_wait", {"queue": "jobs", "message": {"body": b"x"}}),
    ("put_and_wait", {"queue": "jobs", "message": {"body": b"x", "delay": 5}, "timeout": 1}),
    ("put_and_wait", {"queue": "jobs", "message": {"body": b"x", "key": 1}, "timeout": 1}),
    ("put_and_wait", {"queue": "jobs", "message": b"x", "timeout": 1}),
    ("put_and_wait", {"queue": "jobs", "message": {"body": b"x"}, "timeout": 1, "wait": 1}),
    ("result", {"id": "1"}),
    ("result", {"id": 1, "wait": "soon"}),
    ("result", {"id": 1, "wait": -1}),
    ("result", {"id": 1, "timeout": 1}),
    ("progress", {"id": 1, "lease": 1, "percent": "50"}),
    ("progress", {"id": 1, "lease": 1, "percent": 101}),
    ("progress", {"id": 1, "lease": 1, "percent": True}),
    ("progress", {"id": 1, "lease": 1, "percent": 5, "note": 5}),
    ("progress", {"id": 1, "lease": 1, "percent": 5, "eta": 9}),
    ("progress", {"id": 1, "percent": 5}),
    ("configure", {"queue": "jobs", "settings": {"dedup_window": -1}}),
    ("configure", {"queue": "jobs", "settings": {"dedup_window": "5m"}}),
    ("configure", {"queue": "jobs", "settings": {"result_ttl": None}}),
]


def test_bad_arguments_get_bad_request_and_the_broker_keeps_serving(
    broker: BrokerProcess,
) -> None:
    with broker.client() as client, broker.raw() as raw:
        message_id = client.put("jobs", b"x", key="kept")
        (message,) = client.reserve("jobs")
        for op, args in BAD_REQUESTS:
            assert error_code(raw.request(op, args)) == "BAD_REQUEST", (op, args)
        too_big = [[message.id, message.lease, b"r" * (1024 * 1024)]]
        assert error_code(raw.request("ack", {"items": too_big})) == "BAD_REQUEST"
        with pytest.raises(BadRequest):
            client.put("jobs", b"x", key=["not", "a", "str"])  # type: ignore[arg-type]
        with pytest.raises(BadRequest):
            client.ack(message, result=b"r" * (1024 * 1024))
        # Nothing changed: the lease is still good and the key still taken.
        assert client.status(message_id)["state"] == "reserved"
        assert client.put("jobs", b"x", key="kept").duplicate
        client.ack(message, result=b"r" * 1000)
        assert client.result(message_id) == b"r" * 1000
        assert raw.call("ping", {})["time"] > 0
    broker.assert_alive()


def test_a_bad_put_and_wait_message_is_named_as_such(broker: BrokerProcess) -> None:
    with broker.raw() as raw:
        reply = raw.request(
            "put_and_wait", {"queue": "rpc", "message": {"body": "text"}, "timeout": 1}
        )
        assert error_code(reply) == "BAD_REQUEST"
        assert reply[2]["message"].startswith("put_and_wait: message: body must be bytes")
