"""The worker runtime: run a handler over the messages of one or more queues.

``Worker`` runs a plain function on threads, ``AsyncWorker`` an ``async def`` as asyncio
tasks; both ack on return, nack on an exception, honour ``Retry`` and ``Fail``, keep leases
alive while a handler runs and stop gracefully. From the shell (or as ``sluice-worker``):

    python -m client.worker tasks:send_email --queue emails --concurrency 8

``main()`` is that command; ``--help`` explains every option.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import uvloop

from protocol import SluiceError

from ._common import DEFAULT_URL, add_tls_options, cli_tls
from ._worker_async import AsyncWorker
from ._worker_common import Breaker, WorkerCounts
from ._worker_job import AsyncJob, Fail, Job, Retry, is_async
from ._worker_sync import Worker

__all__ = ["AsyncJob", "AsyncWorker", "Fail", "Job", "Retry", "Worker", "WorkerCounts", "main"]

log = logging.getLogger("sluice.worker")

DESCRIPTION = """\
Run a handler over the messages of one or more Sluice queues until SIGTERM or SIGINT.

The handler is a function taking one job (job.body, job.id, job.queue, job.attempts,
job.headers, job.progress(percent, note)). Returning acks the message; raising
sluice.Retry(delay=...) retries it after that delay; raising sluice.Fail(reason)
dead-letters it at once; any other exception retries it after the queue's backoff, with the
error and a traceback summary kept as its last error. An async def handler runs on asyncio
tasks, a plain one on threads.

On SIGTERM or SIGINT the worker stops reserving, lets running handlers finish for up to
--grace seconds, hands the rest back for immediate redelivery and exits 0 (a second signal
skips the rest of the grace period). If the broker goes away it retries with backoff and
carries on when it returns."""

EPILOG = """\
example:
  # tasks.py, in the current directory
  from sluice import Fail

  def send_email(job):
      address = job.body.decode()
      if "@" not in address:
          raise Fail("not an email address")
      ...  # send it; returning acks the message

  python -m client.worker tasks:send_email --queue emails --concurrency 8 --timeout 60

exit status: 0 after a signal, 1 if the broker refused the worker for good (for example a
wrong auth token), 2 for a usage error."""


def main(argv: Sequence[str] | None = None) -> int:
    """The ``python -m client.worker`` / ``sluice-worker`` command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        handler = load_handler(args.handler)
    except ValueError as error:
        parser.error(str(error))
    if args.use_async and not is_async(handler):
        parser.error(f"--async needs an async def handler; {args.handler} is a plain function")
    try:
        worker = _make_worker(handler, args)
    except (TypeError, ValueError, SluiceError) as error:  # SluiceError: a bad queue name
        parser.error(str(error))
    try:
        if isinstance(worker, AsyncWorker):
            uvloop.run(worker.run_forever())
        else:
            worker.run_forever()
    except SluiceError as error:
        log.error("the broker refused the worker: %s (check --url and --auth-token)", error)
        return 1
    return 0


def load_handler(spec: str) -> Callable[..., Any]:
    """The callable named by ``module:function`` (``module:object.method`` also works),
    importing the module from the current directory if need be. ValueError says what is
    wrong otherwise."""
    module_name, _, path = spec.partition(":")
    if not module_name or not path:
        raise ValueError(f"expected module:function (for example tasks:send_email), got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import {module_name!r}: {error}") from None
    for name in path.split("."):
        try:
            target = getattr(target, name)
        except AttributeError:
            raise ValueError(f"{spec}: {name!r} not found in {module_name!r}") from None
    if not callable(target):
        raise ValueError(f"{spec} is a {type(target).__name__}, not a function")
    return target  # type: ignore[no-any-return]


def _make_worker(handler: Callable[..., Any], args: argparse.Namespace) -> Worker | AsyncWorker:
    options: dict[str, Any] = {
        "concurrency": args.concurrency,
        "url": args.url,
        "auth_token": args.auth_token,
        "tls": cli_tls(args.tls_ca, args.tls_cert, args.tls_key),
        "timeout": args.timeout,
        "grace": args.grace,
        "visibility_timeout": args.visibility_timeout,
        "poll_wait": args.poll_wait,
        "breaker": args.breaker,
    }
    if is_async(handler):
        return AsyncWorker(args.queue, handler, **options)
    return Worker(args.queue, handler, **options)


def _breaker(text: str) -> tuple[int, float]:
    """``--breaker FAILURES,SECONDS``, checked as the worker checks it."""
    failures, comma, seconds = text.partition(",")
    try:
        setting = (int(failures), float(seconds))
        Breaker.of(setting)
    except ValueError as error:
        reason = str(error) if comma else "give it as FAILURES,SECONDS"
        raise argparse.ArgumentTypeError(f"{text!r}: {reason} (for example 5,30)") from None
    return setting


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m client.worker",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("handler", metavar="module:function", help="the handler to run, e.g. tasks:send_email")
    add(
        "-q",
        "--queue",
        action="append",
        required=True,
        help="queue to reserve from; repeat for several (best message across them first)",
    )
    add(
        "-c",
        "--concurrency",
        type=int,
        default=1,
        help="handlers running at once (threads, or tasks for async def); default 1",
    )
    add(
        "--url",
        default=os.environ.get("SLUICE_URL", DEFAULT_URL),
        help=f"broker address, sluice://HOST:PORT (env SLUICE_URL; default {DEFAULT_URL})",
    )
    add(
        "--auth-token",
        default=os.environ.get("SLUICE_AUTH_TOKEN"),
        help="token the broker requires, if any (env SLUICE_AUTH_TOKEN)",
    )
    add_tls_options(add)
    add(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="nack a job whose handler runs longer (async: cancelled; threads: abandoned, "
        "its thread stays busy until the handler returns); default none",
    )
    add(
        "--grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long running handlers may finish; default 30",
    )
    add(
        "--visibility-timeout",
        type=float,
        metavar="SECONDS",
        help="lease length to ask for (default: the queue's); leases are touched while a "
        "handler runs, so this only bounds how soon a crashed worker's jobs come back",
    )
    add(
        "--poll-wait",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="long-poll of each reserve; also the longest a stop waits on one; default 1",
    )
    add(
        "--breaker",
        type=_breaker,
        metavar="FAILURES,SECONDS",
        help="circuit breaker: after FAILURES handler failures in a row, reserve nothing for "
        "SECONDS, then try one job; e.g. 5,30; default off",
    )
    add(
        "--async",
        dest="use_async",
        action="store_true",
        help="require an async def handler (an async def one runs on asyncio anyway)",
    )
    add(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level on stderr; default info",
    )
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
