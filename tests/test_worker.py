"""The worker runtime (``client.worker``) against a real broker, in both forms.

``Worker`` (threads) and ``AsyncWorker`` (asyncio) run in a thread of the test process, or
as ``python -m client.worker`` in a subprocess for the signal tests. Handlers that must
stay running block on a gate the test opens; every wait is a bounded poll of the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from client import AsyncWorker, Fail, Retry, Worker
from client._worker_common import (
    CLIENT_REPORTS_PROGRESS,
    CLIENT_SENDS_RESULTS,
    HANDED_BACK_ERROR,
    LeaseClock,
    WorkerSettings,
    can_report_progress,
    can_send_result,
)
from client._worker_job import MAX_ERROR_TEXT, error_text
from client.errors import BadRequest, NotFound
from client.worker import AsyncJob, Job, load_handler, main
from tests.conftest import KEEP, REPO_ROOT, BrokerProcess, start_broker, stop_broker

KINDS = ["threads", "asyncio"]
STOP_TIMEOUT = 15.0  # seconds for a stopped worker to return
_queue_numbers = itertools.count()

AnyWorker = Worker | AsyncWorker


def fresh_queue(prefix: str) -> str:
    return f"{prefix}-{next(_queue_numbers)}"


def fast(broker: BrokerProcess) -> dict[str, Any]:
    """Worker options for ``broker`` with short long-polls, so that ``stop()`` (which waits
    for the reserve in flight) returns quickly."""
    return {"url": broker.url, "poll_wait": 0.2}


def poll_until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Ask ``check`` (a broker query, usually) every 10 ms until it holds; fail after
    ``timeout`` seconds saying ``what`` never happened."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def acked(client: Any, message_id: int) -> bool:
    """Whether the message was acked: gone, or kept as done (with its result) where the
    broker stores results."""
    try:
        return bool(client.status(message_id)["state"] == "done")
    except NotFound:
        return True


class Gate:
    """Holds handlers until the test opens it; works from threads and from asyncio."""

    def __init__(self) -> None:
        self.opened = threading.Event()

    def wait(self) -> None:
        assert self.opened.wait(30), "the test never opened the gate"

    async def wait_async(self) -> None:
        while not self.opened.is_set():
            await asyncio.sleep(0.01)


def worker_of(kind: str, queue_name: str, logic: Callable[[Any], Any], **options: Any) -> AnyWorker:
    """A worker of ``kind`` whose handler is ``logic(job)`` (which must not block)."""
    if kind == "threads":
        return Worker(queue_name, logic, **options)

    async def handler(job: AsyncJob) -> Any:
        return logic(job)

    return AsyncWorker(queue_name, handler, **options)


def gated_worker_of(kind: str, queue_name: str, gate: Gate, **options: Any) -> AnyWorker:
    """A worker of ``kind`` whose handler waits for ``gate`` and then returns."""
    if kind == "threads":
        return Worker(queue_name, lambda job: gate.wait(), **options)

    async def handler(job: AsyncJob) -> None:
        await gate.wait_async()

    return AsyncWorker(queue_name, handler, **options)


@contextlib.contextmanager
def running(worker: AnyWorker) -> Iterator[AnyWorker]:
    """Run ``worker`` in a thread for the block; stop it (gracefully) on the way out and
    re-raise anything its run raised."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            if isinstance(worker, AsyncWorker):
                asyncio.run(worker.run())
            else:
                worker.run()
        except BaseException as error:
            failures.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(STOP_TIMEOUT)
        assert not thread.is_alive(), "the worker did not return after stop()"
    if failures:
        raise failures[0]


# ------------------------------------------------------------------ throughput


@pytest.mark.parametrize("kind", KINDS)
def test_concurrency_16_drains_2000_jobs_each_acked_once(
    shared_broker: BrokerProcess, kind: str
) -> None:
    name = fresh_queue("drain")
    bodies = [str(i).encode() for i in range(2000)]
    seen: list[bytes] = []
    running_now, peak, lock = [0], [0], threading.Lock()

    def record(job: Job) -> None:
        with lock:
            running_now[0] += 1
            peak[0] = max(peak[0], running_now[0])
        seen.append(job.body)
        with lock:
            running_now[0] -= 1

    with shared_broker.client() as client:
        client.configure(name, **KEEP)  # else forgotten whenever it drains: totals read
        client.put_many(name, bodies[:1000])
        client.put_many(name, bodies[1000:])
        worker = worker_of(kind, name, record, concurrency=16, **fast(shared_broker))
        with running(worker):
            poll_until(lambda: client.stats(name)["totals"]["acked"] == 2000, "all acked", 60)
        stats = client.stats(name)
    assert sorted(seen) == sorted(bodies)
    assert stats["totals"]["delivered"] == 2000, "some job was delivered more than once"
    assert (stats["ready"], stats["reserved"], stats["delayed"], stats["dead"]) == (0, 0, 0, 0)
    assert worker.counts.acked == 2000
    assert peak[0] <= 16


# ------------------------------------------------------------------ outcomes


def test_raising_handler_retried_with_growing_delays_then_dead_lettered(
    shared_broker: BrokerProcess,
) -> None:
    name = fresh_queue("backoff")
    raised_at: dict[int, float] = {}

    def always_fails(job: Job) -> None:
        raised_at[job.attempts] = time.time()  # same host, same clock as the broker
        raise ValueError(f"boom on attempt {job.attempts}")

    backoff = {"type": "exponential", "base": 0.2, "factor": 2, "jitter": 0, "cap": 60}
    due_at: dict[int, float] = {}
    with shared_broker.client() as client:
        client.configure(name, max_attempts=4, backoff=backoff)
        message_id = client.put(name, b"doomed")

        def dead() -> bool:
            status = client.status(message_id)
            if status["state"] == "delayed":
                due_at[status["attempts"]] = status["due_at"]
            return bool(status["state"] == "dead")

        with running(Worker(name, always_fails, **fast(shared_broker))):
            poll_until(dead, "the message is dead-lettered")
        (letter,) = client.dead_letters(name)
    assert sorted(due_at) == [1, 2, 3], "a retry was not seen waiting out its backoff"
    delays = [due_at[attempt] - raised_at[attempt] for attempt in (1, 2, 3)]
    assert delays[0] < delays[1] < delays[2], f"backoff delays did not grow: {delays}"
    assert letter["attempts"] == 4
    assert letter["dead_reason"] == "max_attempts (4) used up"
    headline, *frames = letter["last_error"].splitlines()
    assert headline == "ValueError: boom on attempt 4"
    assert frames and "in always_fails" in frames[-1] and "raise ValueError" in frames[-1]


def _steer(job: Job | AsyncJob) -> Any:
    if job.body == b"retry":
        raise Retry(delay=30, reason="come back later")
    if job.body == b"fail":
        raise Fail("bad input")
    if job.body == b"unencodable":
        return object()  # acked all the same, without a result
    return {"done": job.body.decode()}


@pytest.mark.parametrize("kind", KINDS)
def test_retry_fail_and_return_steer_the_message(shared_broker: BrokerProcess, kind: str) -> None:
    name = fresh_queue("steer")
    reported: list[bool] = []
    retried_at: list[float] = []

    def handler(job: Job) -> Any:
        if job.body == b"progress":
            reported.append(job.progress(50, "half way"))
        if job.body == b"retry":
            retried_at.append(time.time())
        return _steer(job)

    async def async_handler(job: AsyncJob) -> Any:
        if job.body == b"progress":
            reported.append(await job.progress(50, "half way"))
        if job.body == b"retry":
            retried_at.append(time.time())
        return _steer(job)

    bodies = [b"retry", b"fail", b"result", b"progress", b"unencodable"]
    worker: AnyWorker
    if kind == "threads":
        worker = Worker(name, handler, concurrency=4, **fast(shared_broker))
    else:
        worker = AsyncWorker(name, async_handler, concurrency=4, **fast(shared_broker))
    with shared_broker.client() as client:
        ids = dict(zip(bodies, client.put_many(name, bodies), strict=True))
        with running(worker):
            poll_until(
                lambda: (
                    client.stats(name)["totals"]["acked"] == 3
                    and client.stats(name)["delayed"] == 1
                    and client.stats(name)["dead"] == 1
                ),
                "every message is settled",
            )
        retry, fail = client.status(ids[b"retry"]), client.status(ids[b"fail"])
        done = [acked(client, ids[b]) for b in (b"result", b"progress", b"unencodable")]
    assert retry["state"] == "delayed" and retry["attempts"] == 1
    assert retry["due_at"] >= retried_at[0] + 30  # Retry's own delay, not the queue's backoff
    assert retry["last_error"] == "Retry: come back later"
    assert (fail["state"], fail["dead_reason"], fail["attempts"]) == ("dead", "bad input", 1)
    assert done == [True, True, True]
    # Where the broker records no progress, progress() says so rather than failing.
    with shared_broker.client() as client:
        client.ping()
        assert reported == [can_report_progress(client.server_info)]
    counts = worker.counts
    assert (counts.acked, counts.nacked, counts.buried) == (3, 1, 1)


def test_results_and_progress_are_sent_only_where_both_sides_support_them() -> None:
    offered = {"features": ["ack", "progress", "result"]}
    assert can_send_result(offered) == CLIENT_SENDS_RESULTS
    assert can_report_progress(offered) == CLIENT_REPORTS_PROGRESS
    for info in ({"features": ["ack", "touch"]}, {}):  # a broker that offers neither
        assert not can_send_result(info) and not can_report_progress(info)


def _flat_values(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [v for item in value.values() for v in _flat_values(item)]
    return [value]


@pytest.mark.parametrize("kind", KINDS)
def test_progress_and_result_reach_a_broker_that_offers_them(
    shared_broker: BrokerProcess, kind: str
) -> None:
    with shared_broker.client() as client:
        client.ping()
        info = client.server_info
    if not (can_report_progress(info) and can_send_result(info)):
        pytest.skip("pending the broker side: it offers no 'progress' and 'result' yet")
    name, gate = fresh_queue("result"), Gate()
    reported: list[bool] = []

    def handler(job: Job) -> dict[str, int]:
        reported.append(job.progress(50, "half way"))
        gate.wait()
        return {"sent": 1}

    async def async_handler(job: AsyncJob) -> dict[str, int]:
        reported.append(await job.progress(50, "half way"))
        await gate.wait_async()
        return {"sent": 1}

    worker: AnyWorker = (
        Worker(name, handler, **fast(shared_broker))
        if kind == "threads"
        else AsyncWorker(name, async_handler, **fast(shared_broker))
    )
    with shared_broker.client() as client, running(worker):
        message_id = client.put(name, b"report")
        try:
            poll_until(lambda: reported == [True], "progress is reported")
            assert "half way" in _flat_values(client.status(message_id))
        finally:
            gate.opened.set()
        assert cast(Any, client).result(message_id, wait=5) == {"sent": 1}


# ------------------------------------------------------------------ leases and timeouts


@pytest.mark.parametrize("kind", KINDS)
def test_handler_running_3x_the_visibility_timeout_keeps_its_lease(
    shared_broker: BrokerProcess, kind: str
) -> None:
    name, visibility, gate = fresh_queue("long"), 0.3, Gate()
    deadlines: list[float] = []
    with shared_broker.client() as client:
        client.configure(name, visibility_timeout=visibility)
        message_id = client.put(name, b"long job")

        def lease_kept_3x() -> bool:
            status = client.status(message_id)
            assert status["state"] == "reserved" and status["attempts"] == 1, status
            if not deadlines or status["lease_deadline"] != deadlines[-1]:
                deadlines.append(status["lease_deadline"])
            return deadlines[-1] - deadlines[0] >= 3 * visibility

        worker = gated_worker_of(kind, name, gate, **fast(shared_broker))
        with running(worker):
            poll_until(lambda: client.stats(name)["reserved"] == 1, "the job is reserved")
            try:
                poll_until(lease_kept_3x, "the lease was extended past 3x its timeout")
            finally:
                gate.opened.set()
            poll_until(lambda: acked(client, message_id), "the job is acked")
        totals = client.stats(name)["totals"]
    assert len(deadlines) >= 4, "the deadline should have moved at least three times"
    assert deadlines == sorted(deadlines)
    assert (totals["delivered"], totals["expired"], totals["acked"]) == (1, 0, 1)


def test_thread_handler_past_its_timeout_is_nacked_and_keeps_its_slot(
    shared_broker: BrokerProcess,
) -> None:
    name, gate = fresh_queue("timeout-threads"), Gate()
    handled: list[bytes] = []

    def handler(job: Job) -> None:
        if job.body == b"slow":
            gate.wait()
        handled.append(job.body)

    with shared_broker.client() as client:
        client.configure(name, backoff={"type": "fixed", "delay": 60})
        slow = client.put(name, b"slow")
        worker = Worker(name, handler, concurrency=1, timeout=0.2, **fast(shared_broker))
        with running(worker):
            poll_until(lambda: client.status(slow)["state"] == "delayed", "the slow job is nacked")
            quick = client.put(name, b"fast")
            # The abandoned handler still holds the only thread, so nothing is reserved.
            assert worker.busy == 1
            assert client.status(quick)["state"] == "ready"
            gate.opened.set()
            poll_until(lambda: acked(client, quick), "the fast job is acked")
        status = client.status(slow)
    assert handled == [b"slow", b"fast"]
    assert status["state"] == "delayed" and status["attempts"] == 1  # late return discarded
    assert status["last_error"] == "timeout after 0.2s"
    assert (worker.counts.timed_out, worker.counts.nacked, worker.counts.acked) == (1, 1, 1)


def test_async_handler_past_its_timeout_is_cancelled_and_nacked(
    shared_broker: BrokerProcess,
) -> None:
    name = fresh_queue("timeout-async")
    cancelled: list[int] = []

    async def never_finishes(job: AsyncJob) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(job.id)
            raise

    with shared_broker.client() as client:
        client.configure(name, backoff={"type": "fixed", "delay": 60})
        message_id = client.put(name, b"stuck")
        worker = AsyncWorker(name, never_finishes, timeout=0.2, **fast(shared_broker))
        with running(worker):
            poll_until(lambda: client.status(message_id)["state"] == "delayed", "it is nacked")
        status = client.status(message_id)
    assert cancelled == [message_id]
    assert status["last_error"] == "timeout after 0.2s" and status["attempts"] == 1
    assert worker.counts.timed_out == 1


# ------------------------------------------------------------------ stopping


@pytest.mark.parametrize("kind", KINDS)
def test_stop_hands_back_unfinished_jobs_for_immediate_redelivery(
    shared_broker: BrokerProcess, kind: str
) -> None:
    name, gate = fresh_queue("stop"), Gate()
    with shared_broker.client() as client:
        client.configure(name, visibility_timeout=600, max_attempts=None)
        client.put_many(name, [b"a", b"b", b"c"])
        worker = gated_worker_of(kind, name, gate, concurrency=3, grace=0.2, **fast(shared_broker))
        try:
            with running(worker):
                poll_until(lambda: client.stats(name)["reserved"] == 3, "all three are reserved")
        finally:
            gate.opened.set()
        stats = client.stats(name)
        ready = client.peek(name, "ready", limit=10)
    # Ready at once: nothing is left to wait out its 600 s lease.
    assert (stats["reserved"], stats["ready"], stats["totals"]["acked"]) == (0, 3, 0)
    assert {item["body"] for item in ready} == {b"a", b"b", b"c"}
    assert all(item["last_error"] == HANDED_BACK_ERROR for item in ready)
    assert worker.counts.handed_back == 3


class WorkerProcess:
    """``python -m client.worker`` with a handler from tests/worker_handlers.py."""

    def __init__(self, broker: BrokerProcess, gates: Path, *args: str) -> None:
        self.gates = gates
        self.process = subprocess.Popen(
            [sys.executable, "-m", "client.worker", *args, "--url", broker.url],
            cwd=REPO_ROOT,
            env={**os.environ, "SLUICE_TEST_GATES": str(gates)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for_line(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.log):
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                line = ""
            assert line is not None, f"worker exited before logging {text!r}: {self.log}"
            self.log.append(line)
            assert time.monotonic() < deadline or text in line, f"no {text!r} in {self.log}"

    def release(self, body: str) -> None:
        (self.gates / f"release-{body}").touch()

    def finish(self, timeout: float = STOP_TIMEOUT) -> int:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"the worker did not exit; log so far: {self.log}")
        while (line := self.lines.get(timeout=5)) is not None:
            self.log.append(line)
        return code


@pytest.mark.parametrize(
    "handler", ["block_until_released", "block_until_released_async"], ids=KINDS
)
def test_sigterm_lets_handlers_finish_then_hands_back_the_rest_and_exits_0(
    shared_broker: BrokerProcess, tmp_path: Path, handler: str
) -> None:
    name = fresh_queue("sigterm")
    bodies = ["0", "1", "2", "3", "4", "5"]
    with shared_broker.client() as client:
        client.configure(name, visibility_timeout=600, max_attempts=None)
        client.put_many(name, bodies)
        worker = WorkerProcess(
            shared_broker,
            tmp_path,
            f"tests.worker_handlers:{handler}",
            *("--queue", name, "--concurrency", "6", "--grace", "60"),
        )
        try:
            poll_until(
                lambda: all((tmp_path / f"started-{b}").exists() for b in bodies),
                "all six handlers are running",
            )
            worker.process.send_signal(signal.SIGTERM)
            worker.wait_for_line("stopping: no longer reserving")
            for body in bodies[:3]:  # these finish within the grace period
                worker.release(body)
            poll_until(lambda: client.stats(name)["totals"]["acked"] == 3, "three are acked")
            worker.process.send_signal(signal.SIGTERM)  # a second signal: no more waiting
            code = worker.finish()
        finally:
            if worker.process.poll() is None:
                worker.process.kill()
        stats = client.stats(name)
        ready = client.peek(name, "ready", limit=10)
    log = "".join(worker.log)
    assert code == 0, log
    assert (stats["reserved"], stats["ready"], stats["totals"]["acked"]) == (0, 3, 3), log
    assert sorted(item["body"] for item in ready) == [b"3", b"4", b"5"]
    assert all(item["attempts"] == 1 for item in ready)
    assert "worker started" in log and "SIGTERM again" in log
    assert "worker stopped: 3 acked" in log and "3 handed back" in log
    assert "Traceback" not in log


# ------------------------------------------------------------------ broker outages


@pytest.mark.parametrize("kind", KINDS)
def test_worker_carries_on_after_the_broker_is_killed_and_restarted(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sluice.worker")
    name, gate = fresh_queue("restart"), Gate()
    handled: list[bytes] = []

    def handler(job: Job) -> None:
        if job.body == b"in-flight":
            gate.wait()
        handled.append(job.body)

    async def async_handler(job: AsyncJob) -> None:
        if job.body == b"in-flight":
            await gate.wait_async()
        handled.append(job.body)

    data = str(tmp_path / "data")  # both brokers use it, whether they keep state or not
    first = start_broker(tmp_path / "first.log", "--data-dir", data)
    second: BrokerProcess | None = None
    # Concurrency 2: one slot holds the in-flight job while the other long-polls.
    options: dict[str, Any] = {**fast(first), "concurrency": 2, "grace": 5}
    worker: AnyWorker = (
        Worker(name, handler, **options)
        if kind == "threads"
        else AsyncWorker(name, async_handler, **options)
    )
    try:
        with running(worker), contextlib.ExitStack() as stack:
            stack.callback(gate.opened.set)  # before the worker stops, not after
            with first.client() as client:
                before = client.put(name, b"before")
                poll_until(lambda: acked(client, before), "it is acked")
                in_flight = client.put(name, b"in-flight", visibility_timeout=600)
                poll_until(lambda: client.status(in_flight)["state"] == "reserved", "reserved")
            first.process.kill()  # kill -9, with a handler running
            first.process.wait()
            poll_until(lambda: "unreachable" in caplog.text, "the worker notices the outage")
            second = start_broker(
                tmp_path / "second.log", "--port", str(first.port), "--data-dir", data
            )
            with second.client() as client:
                after = client.put(name, b"after")
                poll_until(lambda: acked(client, after), "the new job is acked")
                gate.opened.set()  # the lease survived the restart, so this ack lands
                poll_until(lambda: acked(client, in_flight), "in-flight acked")
    finally:
        gate.opened.set()
        if first.process.poll() is None:
            first.process.kill()
            first.process.wait()
        if second is not None:
            stop_broker(second)
    assert handled == [b"before", b"after", b"in-flight"]
    assert (worker.counts.acked, worker.counts.lease_lost, worker.counts.unsettled) == (3, 0, 0)
    messages = [record.getMessage() for record in caplog.records]
    assert len([m for m in messages if "unreachable" in m]) == 1, messages
    assert len([m for m in messages if "reachable again" in m]) == 1, messages


# ------------------------------------------------------------------ pieces


def test_error_text_is_type_message_and_innermost_frames_bounded() -> None:
    def fail_deep(depth: int) -> None:
        if depth == 0:
            raise KeyError("x" * 10_000)
        fail_deep(depth - 1)

    try:
        fail_deep(20)
    except KeyError as error:
        text = error_text(error)
    headline, *frames = text.splitlines()
    assert len(text) <= MAX_ERROR_TEXT
    assert headline.startswith("KeyError: 'xxx") and headline.endswith("...")
    assert 1 <= len(frames) <= 4 and "in fail_deep" in frames[-1] and "raise KeyError" in frames[-1]
    assert error_text(RuntimeError()).startswith("RuntimeError")


def test_lease_clock_touches_at_a_third_measured_locally() -> None:
    # The broker's clock is 1000 s ahead of ours; only durations matter.
    clock = LeaseClock.at_reserve(lease_deadline=1030.0, broker_now=1000.0, received_at=5.0)
    assert (clock.duration, clock.expires, clock.next_touch) == (30.0, 35.0, 15.0)
    clock.touched(sent_at=15.5)
    assert (clock.expires, clock.next_touch) == (45.5, 25.5)
    clock.touch_failed(now=26.0)
    assert clock.next_touch == 31.0


def test_options_are_checked_with_a_message_that_says_what_to_do() -> None:
    with pytest.raises(ValueError, match="concurrency must be at least 1"):
        WorkerSettings(queues=("q",), concurrency=0)
    with pytest.raises(ValueError, match="grace must be >= 0"):
        WorkerSettings(queues=("q",), grace=-1)
    with pytest.raises(BadRequest, match="invalid queue name"):
        Worker("no spaces allowed", lambda job: None)
    with pytest.raises(ValueError, match="sluice://"):
        Worker("q", lambda job: None, url="http://localhost")
    with pytest.raises(ValueError, match="Retry delay"):
        Retry(delay=-1)

    async def coroutine(job: AsyncJob) -> None:
        pass

    with pytest.raises(TypeError, match="AsyncWorker"):
        Worker("q", coroutine)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="run it with Worker"):
        AsyncWorker("q", lambda job: None)  # type: ignore[arg-type,return-value]


def test_load_handler_names_what_is_wrong() -> None:
    assert load_handler("tests.worker_handlers:block_until_released").__name__ == (
        "block_until_released"
    )
    for spec, problem in [
        ("tests.worker_handlers", "expected module:function"),
        ("no_such_module_here:f", "cannot import"),
        ("tests.worker_handlers:missing", "'missing' not found"),
        ("tests.worker_handlers:POLL", "not a function"),
    ]:
        with pytest.raises(ValueError, match=problem):
            load_handler(spec)


def test_cli_help_explains_with_an_example_and_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for text in ("--queue", "--concurrency", "--timeout", "--grace", "--async", "SIGTERM"):
        assert text in out
    assert "python -m client.worker tasks:send_email --queue emails" in out
    with pytest.raises(SystemExit) as done:
        main(["tests.worker_handlers:block_until_released", "--queue", "q", "--async"])
    assert done.value.code == 2
    assert "--async needs an async def handler" in capsys.readouterr().err


# ------------------------------------------------------------------ README


def readme_worker_blocks() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("\n## Workers\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```py\n(.*?)```", section, flags=re.DOTALL)


def test_readme_worker_examples_run_as_written(
    shared_broker: BrokerProcess, tmp_path: Path
) -> None:
    tasks, embedded = readme_worker_blocks()
    (tmp_path / "tasks.py").write_text(tasks)
    embedded = embedded.replace("sluice://127.0.0.1:7700", shared_broker.url)
    embedded = embedded.replace(
        '"127.0.0.1", 7700', f'"{shared_broker.host}", {shared_broker.port}'
    )

    def run_example() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", embedded],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT)])},
            capture_output=True,
            text=True,
            timeout=60,
        )

    done = run_example()
    assert done.returncode == 0, done.stderr
    sent = sorted(line for line in done.stderr.splitlines() if line.startswith("tasks: "))
    assert sent == [
        "tasks: sending to ada@example.com, attempt 1",
        "tasks: sending to grace@flaky.example, attempt 1",
        "tasks: sending to grace@flaky.example, attempt 2",
    ]
    assert "sluice.worker: worker stopped" in done.stderr
    assert done.stdout.splitlines() == [
        "2 acked, 1 nacked, 1 buried",
        "dead: not an email address: 'nobody'",
    ]
    # Run again on the same broker: it waits on its own counts, not the queue's totals.
    again = run_example()
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == "2 acked, 1 nacked, 1 buried"
