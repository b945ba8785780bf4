"""The Celery app that tests/test_celery.py runs in a real Celery worker over Sluice.

Every task appends one line per run to a file in $CELERY_RUNS (the worker process's own
file, so lines never interleave), which is how the tests count runs."""

from __future__ import annotations

import os
import time

from celery import Celery

import sluice.celery  # noqa: F401 - registers sluice:// with kombu

app = Celery(
    "celery_app",
    broker=os.environ["SLUICE_URL"],
    backend="file://" + os.environ["CELERY_RESULTS"],
)
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    worker_enable_remote_control=False,  # needs broadcast, which the transport has not
    broker_connection_retry_on_startup=True,
    result_extended=True,
)


def _ran(task: str, arg: int) -> None:
    path = os.path.join(os.environ["CELERY_RUNS"], f"{os.getpid()}.log")
    with open(path, "a") as runs:
        runs.write(f"{task} {arg} {time.time():.6f}\n")


@app.task
def echo(n: int) -> int:
    _ran("echo", n)
    return n


@app.task(bind=True, max_retries=5)
def flaky(self: object, n: int) -> str:
    _ran("flaky", n)
    retries = self.request.retries  # type: ignore[attr-defined]
    if retries < 2:
        raise self.retry(countdown=0.2)  # type: ignore[attr-defined]
    return f"ok after {retries} retries"


@app.task
def slow(n: int) -> int:
    _ran("slow-start", n)
    time.sleep(0.5)
    _ran("slow-done", n)
    return n


@app.task(bind=True, autoretry_for=(ConnectionError,), retry_kwargs={"countdown": 0.1})
def shaky(self: object, n: int) -> int:
    _ran("shaky", n)
    if self.request.retries < 2:  # type: ignore[attr-defined]
        raise ConnectionError("the network blinked")
    return n
