"""Celery over Sluice: a real Celery worker (prefork pool) against a real broker, the app
in tests/celery_app.py, results in Celery's file-system backend."""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sluice import Client

from .conftest import KEEP, REPO_ROOT, BrokerProcess, start_broker, stop_broker

celery = pytest.importorskip("celery")

RESULT_TIMEOUT = 60.0
# No worker-to-worker chatter: it needs broadcast, which the transport does not have.
QUIET = ("-c", "2", "--without-mingle", "--without-gossip", "--without-heartbeat", "-l", "info")


class CeleryRun:
    """A broker, the directories the app uses, and the Celery workers started on them."""

    def __init__(self, broker: BrokerProcess, root: Path) -> None:
        self.broker = broker
        self.results, self.runs = root / "results", root / "runs"
        self.results.mkdir()
        self.runs.mkdir()
        self.env = {
            **os.environ,
            "SLUICE_URL": broker.url,
            "CELERY_RESULTS": str(self.results),
            "CELERY_RUNS": str(self.runs),
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests"), str(REPO_ROOT)]),
        }
        self.workers: list[subprocess.Popen[bytes]] = []
        self.root = root

    def start_worker(self, *options: str) -> subprocess.Popen[bytes]:
        log = open(self.root / f"worker-{len(self.workers)}.log", "wb")  # noqa: SIM115
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "celery_app", "worker", *QUIET, *options],
            env=self.env,
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its pool processes share its process group
        )
        self.workers.append(worker)
        return worker

    def kill(self, worker: subprocess.Popen[bytes]) -> None:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)

    def app(self) -> Any:
        """The app, imported here as the producer side (configured by the environment)."""
        os.environ.update({k: self.env[k] for k in ("CELERY_RESULTS", "CELERY_RUNS")})
        os.environ["SLUICE_URL"] = self.broker.url
        sys.path.insert(0, str(REPO_ROOT / "tests"))
        import celery_app

        return celery_app

    def runs_of(self, task: str) -> collections.Counter[int]:
        counts: collections.Counter[int] = collections.Counter()
        for path in self.runs.iterdir():
            for line in path.read_text().splitlines():
                name, arg, _ = line.split()
                if name == task:
                    counts[int(arg)] += 1
        return counts

    def run_times(self, task: str) -> dict[int, float]:
        times: dict[int, float] = {}
        for path in self.runs.iterdir():
            for line in path.read_text().splitlines():
                name, arg, at = line.split()
                if name == task:
                    times[int(arg)] = float(at)
        return times

    def stop(self) -> None:
        """The tests are done with the workers: kill them (a shutdown is not under test)."""
        for worker in self.workers:
            if worker.poll() is None:
                self.kill(worker)


def settled(run: CeleryRun, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The "celery" queue's stats once ``done(stats)`` holds (polled; bounded)."""
    deadline = time.monotonic() + RESULT_TIMEOUT
    with Client(url=run.broker.url) as client:
        while not done(stats := client.stats("celery")):
            assert time.monotonic() < deadline, f"the queue never settled: {stats}"
            time.sleep(0.05)
    return stats


@pytest.fixture
def celery_run(tmp_path: Path) -> Iterator[CeleryRun]:
    broker = start_broker(tmp_path / "broker.log", "--in-memory")
    with Client(url=broker.url) as client:
        client.configure("celery", **KEEP)  # its stats are read once drained
    run = CeleryRun(broker, tmp_path)
    try:
        yield run
    finally:
        run.stop()
        producer = sys.modules.pop("celery_app", None)
        if producer is not None:
            producer.app.close()  # the test's own broker connections
        stop_broker(broker)


def test_500_tasks_run_once_each_with_their_results(celery_run: CeleryRun) -> None:
    app = celery_run.app()
    celery_run.start_worker()
    results = [app.echo.delay(n) for n in range(500)]
    assert [r.get(timeout=RESULT_TIMEOUT) for r in results] == list(range(500))
    runs = celery_run.runs_of("echo")
    assert sorted(runs) == list(range(500)) and set(runs.values()) == {1}
    # acks_late: a result is stored before its task's ack reaches the broker.
    stats = settled(celery_run, lambda stats: stats["totals"]["acked"] == 500)
    assert stats["ready"] == stats["reserved"] == 0


def test_a_task_that_retries_twice_then_succeeds(celery_run: CeleryRun) -> None:
    app = celery_run.app()
    celery_run.start_worker()
    result = app.flaky.delay(7)
    assert result.get(timeout=RESULT_TIMEOUT) == "ok after 2 retries"
    assert celery_run.runs_of("flaky") == {7: 3}


def test_autoretry_for_and_routing_to_another_queue(celery_run: CeleryRun) -> None:
    app = celery_run.app()
    celery_run.start_worker()  # the default queue only
    shaky = app.shaky.delay(3)
    assert shaky.get(timeout=RESULT_TIMEOUT) == 3
    assert celery_run.runs_of("shaky") == {3: 3}  # two automatic retries, then done
    routed = app.echo.apply_async((41,), queue="reports")
    with Client(url=celery_run.broker.url) as client:
        assert client.stats("reports")["totals"]["put"] == 1  # its own Sluice queue
    celery_run.start_worker("-Q", "reports")
    assert routed.get(timeout=RESULT_TIMEOUT) == 41


def test_countdown_tasks_wait_in_the_broker_and_run_no_earlier_than_due(
    celery_run: CeleryRun,
) -> None:
    app = celery_run.app()
    celery_run.start_worker()
    sent = time.time()
    delayed = [app.echo.apply_async((n,), countdown=1.5) for n in range(5)]
    with Client(url=celery_run.broker.url) as client:
        assert client.stats("celery")["delayed"] == 5  # held by the broker, not a worker
    assert [r.get(timeout=RESULT_TIMEOUT) for r in delayed] == list(range(5))
    times = celery_run.run_times("echo")
    assert all(times[n] >= sent + 1.5 for n in range(5)), (sent, times)


def test_a_killed_worker_loses_no_acks_late_task(celery_run: CeleryRun) -> None:
    app = celery_run.app()
    with Client(url=celery_run.broker.url) as client:
        client.configure("celery", visibility_timeout=2)  # a dead worker's leases: 2 s
    first = celery_run.start_worker()
    results = [app.slow.delay(n) for n in range(12)]
    deadline = time.monotonic() + RESULT_TIMEOUT
    while not celery_run.runs_of("slow-done"):  # killed in the middle of the batch
        assert time.monotonic() < deadline, "no task finished on the first worker"
        time.sleep(0.05)
    celery_run.kill(first)
    celery_run.start_worker()
    assert sorted(r.get(timeout=RESULT_TIMEOUT) for r in results) == list(range(12))
    done = celery_run.runs_of("slow-done")
    assert sorted(done) == list(range(12))  # every task completed, none lost
    stats = settled(celery_run, lambda stats: stats["reserved"] == 0)
    assert stats["ready"] == stats["dead"] == 0


def test_the_scheme_resolves_to_the_transport() -> None:
    from kombu import Connection

    import sluice.celery

    assert Connection("sluice://127.0.0.1:7700").transport_cls == "sluice"
    assert Connection("sluice://127.0.0.1:7700").transport.__class__ is sluice.celery.Transport
    assert sluice.celery.queue_name("celery@host.celery.pidbox") == "celery_host.celery.pidbox"


def test_the_readme_celery_app_runs_as_written(celery_run: CeleryRun) -> None:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("\n## Using Sluice from Celery\n", 1)[1].split("\n## ", 1)[0]
    (app,) = re.findall(r"```py\n(.*?)```", section, flags=re.DOTALL)
    (shell,) = re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)
    app = app.replace("sluice://127.0.0.1:7700", celery_run.broker.url)
    app = app.replace("file:///tmp/celery-results", f"file://{celery_run.results}")
    (celery_run.root / "celeryapp.py").write_text(app)
    worker_line, producer_line = shell.strip().splitlines()
    env = {**celery_run.env, "PYTHONPATH": f"{celery_run.root}{os.pathsep}{REPO_ROOT}"}
    worker_args = worker_line.split()[1:]
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", *worker_args],
        env=env,
        cwd=celery_run.root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    celery_run.workers.append(worker)
    code = producer_line.split("'")[1]
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=celery_run.root,
        capture_output=True,
        text=True,
        timeout=RESULT_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "5"


def test_the_url_password_is_the_brokers_auth_token() -> None:
    from kombu import Connection

    connection = Connection("sluice://:s3cret@127.0.0.1:1")  # nothing listens: never used
    channel = connection.channel()
    try:
        assert channel.client.auth_token == "s3cret" and channel.client.port == 1
    finally:
        channel.close()
        connection.release()


def test_a_sluices_url_connects_with_tls() -> None:
    import ssl

    from kombu import Connection

    import sluice.celery  # noqa: F401  (registers the schemes)

    connection = Connection("sluices://:s3cret@127.0.0.1:1")  # nothing listens: never used
    channel = connection.channel()
    given = ssl.create_default_context()
    with_context = Connection("sluices://127.0.0.1:1", ssl=given)
    other = with_context.channel()
    try:
        assert isinstance(channel.client.tls, ssl.SSLContext)
        assert channel.client.auth_token == "s3cret" and channel.client.port == 1
        assert other.client.tls is given
    finally:
        channel.close()
        other.close()
        connection.release()
        with_context.release()
    plain = Connection("sluice://127.0.0.1:1")
    try:
        assert plain.channel().client.tls is None
    finally:
        plain.release()
