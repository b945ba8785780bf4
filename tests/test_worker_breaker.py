"""The worker's circuit breaker: its states with a fake clock, and both worker forms
against a real broker, where an open breaker reserves nothing (no attempt is spent)."""

from __future__ import annotations

import threading

import pytest

from client._worker_common import Breaker
from client._worker_job import Outcome, raised, returned, timed_out
from sluice import Client, Fail, Retry

from .conftest import BrokerProcess
from .test_worker import KINDS, fresh_queue, poll_until, running, worker_of

FAILED = raised(RuntimeError("downstream is down"))


def test_breaker_opens_after_failures_in_a_row_then_lets_one_trial_through() -> None:
    breaker = Breaker(3, cooldown=10.0)
    assert breaker.quota(0.0) == (None, 0.0)
    assert breaker.record(FAILED, 1.0) is None
    assert breaker.record(returned("ok"), 1.5) is None  # a success resets the count
    assert breaker.record(FAILED, 2.0) is None
    assert breaker.record(timed_out(5), 2.5) is None  # a timeout is a failure too
    assert breaker.record(raised(Retry(1)), 2.7) is None  # the handler's own decisions:
    assert breaker.record(raised(Fail("bad")), 2.8) is None  # neither success nor failure
    assert breaker.record(FAILED, 3.0) == "opened"
    assert breaker.quota(3.0) == (0, 10.0)
    assert breaker.quota(12.5) == (0, 0.5)
    assert breaker.quota(13.0) == (1, 0.0)  # half-open: one job
    breaker.trying()
    assert breaker.quota(13.1)[0] == 0  # while the trial runs, nothing more
    assert breaker.record(FAILED, 14.0) == "opened"  # the trial failed: open again
    assert breaker.quota(20.0) == (0, 4.0)
    assert breaker.quota(24.0) == (1, 0.0)
    breaker.trying()
    assert breaker.record(returned(None), 24.5) == "closed"
    assert breaker.quota(24.6) == (None, 0.0)
    assert breaker.record(FAILED, 25.0) is None  # counting from zero again


@pytest.mark.parametrize("setting", [(0, 1.0), (2, 0), (2, -1.0), (True, 1.0), (2,), "3,1"])
def test_breaker_settings_are_checked(setting: object) -> None:
    with pytest.raises(ValueError, match="breaker"):
        Breaker.of(setting)  # type: ignore[arg-type]


def test_an_outcome_says_whether_the_handler_failed() -> None:
    assert FAILED.failure and timed_out(1).failure
    assert not any(o.failure for o in (returned(1), raised(Retry()), raised(Fail("x"))))
    assert Outcome("ack").failure is False


@pytest.mark.parametrize("kind", KINDS)
def test_an_open_breaker_spends_no_attempts_and_a_trial_closes_it(
    shared_broker: BrokerProcess, kind: str
) -> None:
    queue = fresh_queue("breaker")
    failing = threading.Event()
    failing.set()
    calls: list[int] = []

    def handle(job: object) -> str:
        calls.append(job.id)  # type: ignore[attr-defined]
        if failing.is_set():
            raise RuntimeError("the mail server is down")
        return "sent"

    with Client(url=shared_broker.url) as client:
        client.configure(queue, backoff={"type": "fixed", "delay": 0}, max_attempts=10)
        ids = client.put_many(queue, [b"m"] * 10)
        worker = worker_of(
            kind, queue, handle, url=shared_broker.url, poll_wait=0.2, breaker=(3, 1.5)
        )
        with running(worker):
            poll_until(
                lambda: (
                    worker.counts.breaker_opened == 1
                    and client.stats(queue)["totals"]["nacked"] == 3
                ),
                "the breaker opened and the third failure was nacked",
            )
            stats = client.stats(queue)  # open: nothing more is reserved
            assert (stats["reserved"], stats["totals"]["delivered"]) == (0, 3), stats
            attempts = [m["attempts"] for m in client.peek(queue, "ready", limit=10)]
            assert sorted(attempts) == [0] * 7 + [1] * 3
            failing.clear()
            poll_until(
                lambda: client.stats(queue)["totals"]["acked"] == 10, "every message is acked"
            )
        assert worker.counts.breaker_opened == 1
        assert (worker.counts.acked, worker.counts.nacked) == (10, 3)
        assert sorted(set(calls)) == sorted(ids) and len(calls) == 13


def test_the_worker_command_takes_a_breaker(capsys: pytest.CaptureFixture[str]) -> None:
    from client.worker import _make_worker, _parser

    args = _parser().parse_args(["tasks:send", "-q", "emails", "--breaker", "5,30"])
    assert args.breaker == (5, 30.0)
    worker = _make_worker(lambda job: None, args)
    assert worker._breaker is not None and worker._breaker.failures == 5
    assert _parser().parse_args(["tasks:send", "-q", "emails"]).breaker is None
    for bad in ("0,30", "5,0", "five,30", "5"):
        with pytest.raises(SystemExit) as exited:
            _parser().parse_args(["tasks:send", "-q", "emails", "--breaker", bad])
        assert exited.value.code == 2
        assert "for example 5,30" in capsys.readouterr().err
