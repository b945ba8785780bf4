"""``AsyncWorker``: an ``async def`` handler run as asyncio tasks, fed by batched long-poll
reserves, over one multiplexed connection.

One task reserves; each job runs in a task of its own, with a companion task that touches
its lease while the handler runs. A handler past its timeout is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from protocol import LeaseLost, SluiceError

from ._async import AsyncClient
from ._common import Tls, broker_address, broker_tls, format_url
from ._message import Message
from ._sealing import BodyKey
from ._worker_common import (
    HAND_BACK_TRIES,
    HANDED_BACK_ERROR,
    MAX_BATCH,
    OUTAGE_ERRORS,
    Backoff,
    Breaker,
    Delivery,
    LeaseClock,
    Outage,
    SettleAttempts,
    WorkerCounts,
    WorkerSettings,
    batches,
    breaker_changed,
    can_report_progress,
    can_send_result,
    dropped_result_warning,
    hand_back_gave_up,
    handed_back_despite,
    lease_lost_warning,
    log,
    queue_names,
    touch_failed,
)
from ._worker_job import (
    AsyncJob,
    Outcome,
    encodable_result,
    is_async,
    raised,
    returned,
    timed_out,
)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
CANCEL_WAIT = 5.0  # seconds to let cancelled handlers unwind at shutdown


class AsyncWorker:
    """Runs ``await handler(job)`` for the messages of ``queues``, up to ``concurrency``
    at a time, as asyncio tasks. The same contract and options as ``Worker``, except:

    - the handler is an ``async def`` and gets an ``AsyncJob`` (``await job.progress()``);
    - a handler past its ``timeout`` is cancelled (its slot is free again at once), and its
      message nacked with "timeout after Xs";
    - at shutdown, handlers still running after ``grace`` are cancelled before their
      messages are handed back;
    - ``stop()`` may be called from any thread; ``run_forever()`` handles SIGTERM/SIGINT
      through the running loop.
    """

    def __init__(
        self,
        queues: str | Sequence[str],
        handler: Callable[[AsyncJob], Awaitable[Any]],
        *,
        concurrency: int = 1,
        url: str | None = None,
        host: str | None = None,
        port: int | None = None,
        auth_token: str | None = None,
        tls: Tls = None,
        timeout: float | None = None,
        grace: float = 30.0,
        visibility_timeout: float | None = None,
        poll_wait: float = 1.0,
        breaker: tuple[int, float] | None = None,
        body_key: BodyKey | None = None,
    ) -> None:
        if not is_async(handler):
            raise TypeError(f"{handler!r} is not an async def function: run it with Worker")
        tls_used = self._tls = broker_tls(tls, url, host, port)
        self.settings = WorkerSettings(
            queues=queue_names(queues),
            concurrency=concurrency,
            url=format_url(*broker_address(url, host, port), tls_used is not None),
            auth_token=auth_token,
            timeout=timeout,
            grace=grace,
            visibility_timeout=visibility_timeout,
            poll_wait=poll_wait,
        )
        self.handler = handler
        self.counts = WorkerCounts()
        self._breaker = Breaker.of(breaker)
        self._client = AsyncClient(
            self.settings.host,
            self.settings.port,
            auth_token=auth_token,
            client_name="sluice-worker-async",
            tls=self._tls,
            body_key=body_key,
        )
        self._active: dict[tuple[int, int], Delivery] = {}  # reserved and not yet settled
        self._tasks: dict[tuple[int, int], asyncio.Task[None]] = {}
        self._changed = asyncio.Event()  # a slot freed up, or stop() was called
        self._stopping = asyncio.Event()
        self._hurry = asyncio.Event()  # the grace period is over
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clock_offset: float | None = None  # broker clock minus ours, once measured
        self._outage = Outage(self.settings.url)

    def stop(self) -> None:
        """Ask ``run()`` to finish: stop reserving, let running handlers finish for up to
        ``grace`` seconds, then cancel and hand back the rest. A second call ends the grace
        period at once. Safe from any thread; returns at once."""
        loop = self._loop
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if loop is None or loop is current:
            self._request_stop()
        else:
            loop.call_soon_threadsafe(self._request_stop)

    def _request_stop(self) -> None:
        if self._stopping.is_set():
            self._hurry.set()
        self._stopping.set()
        self._changed.set()

    async def run(self) -> WorkerCounts:
        """Reserve and handle messages until ``stop()``, then finish as ``stop`` says and
        return the counts. Installs no signal handlers (``run_forever`` does)."""
        self._begin()
        try:
            await self._reserve_loop()
        finally:
            self._stopping.set()
            await self._drain()
            await self._client.close()
            log.info("worker stopped: %s", self.counts.summary())
        return self.counts

    async def run_forever(self) -> WorkerCounts:
        """``run()`` until SIGTERM or SIGINT: the first signal stops the worker gracefully,
        a second one ends the grace period at once."""
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            return await self.run()
        finally:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        again = self._stopping.is_set()
        log.info("%s%s", sig.name, " again: ending the grace period now" if again else ": stopping")
        self._request_stop()

    # ------------------------------------------------------------------ reserving

    def _begin(self) -> None:
        if self._loop is not None:
            raise RuntimeError("an AsyncWorker runs once; make a new one to run again")
        self._loop = asyncio.get_running_loop()
        settings = self.settings
        log.info(
            "worker started: queues %s, concurrency %d (asyncio), broker %s",
            ",".join(settings.queues),
            settings.concurrency,
            settings.url,
        )

    async def _reserve_loop(self) -> None:
        backoff = Backoff()
        while not self._stopping.is_set():
            self._changed.clear()
            free = self.settings.concurrency - len(self._active)
            if free <= 0:
                await self._changed.wait()
                continue
            trial = False
            if self._breaker is not None:
                allowed, wait = self._breaker.quota(time.monotonic())
                if allowed == 0:  # a trial's outcome sets _changed, as any settle does
                    await _wait(self._changed, wait)
                    continue
                trial = allowed == 1
                free = 1 if trial else free
            try:
                messages, received_at, broker_now = await self._reserve(free)
            except OUTAGE_ERRORS as error:
                self._outage.failed(error, time.monotonic())
                self._clock_offset = None  # it may be another broker when it comes back
                await _wait(self._stopping, backoff.next_delay())
                continue
            self._outage.recovered(time.monotonic())
            backoff.reset()
            if trial and messages and self._breaker is not None:
                self._breaker.trying()
            await self._dispatch(messages, received_at, broker_now)

    async def _reserve(self, free: int) -> tuple[list[Message], float, float]:
        """Messages, when they arrived (monotonic), and the broker's time then (estimated)."""
        if self._clock_offset is None:
            before = time.time()
            broker_time = await self._client.ping()
            self._clock_offset = broker_time - (before + time.time()) / 2
        settings = self.settings
        messages = await self._client.reserve(
            settings.queues,
            max_messages=min(free, MAX_BATCH),
            wait=settings.poll_wait,
            visibility_timeout=settings.visibility_timeout,
        )
        return messages, time.monotonic(), time.time() + self._clock_offset

    async def _dispatch(
        self, messages: list[Message], received_at: float, broker_now: float
    ) -> None:
        deliveries = [
            Delivery(m, LeaseClock.at_reserve(m.lease_deadline, broker_now, received_at))
            for m in messages
        ]
        if self._stopping.is_set():  # arrived after stop(): give them straight back
            for delivery in deliveries:
                delivery.owner = "shutdown"
            await self._hand_back(deliveries)
            return
        for delivery in deliveries:
            self._active[delivery.key] = delivery
            self._tasks[delivery.key] = asyncio.create_task(self._execute(delivery))

    # ------------------------------------------------------------------ handling

    async def _execute(self, delivery: Delivery) -> None:
        try:
            keeper = asyncio.create_task(self._keep_lease(delivery))
            try:
                outcome = await self._call_handler(delivery)
            finally:
                keeper.cancel()
            if self._claim(delivery, "handler"):
                await self._settle(delivery, outcome, patient=True)
            else:
                log.info(
                    "message %d: its handler returned after the message was handed back; "
                    "outcome discarded",
                    delivery.message.id,
                )
        finally:
            self._active.pop(delivery.key, None)
            self._tasks.pop(delivery.key, None)
            self._changed.set()

    async def _call_handler(self, delivery: Delivery) -> Outcome:
        limit = self.settings.timeout
        scope = asyncio.timeout(limit)
        try:
            async with scope:
                value = await self.handler(AsyncJob(delivery.message, self._report_progress))
        except TimeoutError as error:
            if scope.expired():
                return self._timed_out(delivery)
            return raised(error)
        except Exception as error:
            return raised(error)
        if scope.expired():  # the handler swallowed its cancellation: still a timeout
            return self._timed_out(delivery)
        return returned(value)

    def _timed_out(self, delivery: Delivery) -> Outcome:
        limit = self.settings.timeout or 0.0
        self._count("timed_out")
        log.warning(
            "message %d: handler cancelled after its %gs timeout", delivery.message.id, limit
        )
        return timed_out(limit)

    def _claim(self, delivery: Delivery, owner: str) -> bool:
        """Make ``owner`` the one that settles ``delivery``; False if someone already is."""
        if delivery.owner is not None:
            return False
        delivery.owner = owner
        delivery.lease.stop()
        return True

    async def _report_progress(self, message: Message, percent: float, note: str) -> bool:
        if not can_report_progress(self._client.server_info):
            return False
        try:
            await cast(Any, self._client).progress(message, percent, note)  # once it exists
        except SluiceError as error:
            log.debug("message %d: progress not recorded: %s", message.id, error)
            return False
        return True

    # ------------------------------------------------------------------ settling

    async def _settle(self, delivery: Delivery, outcome: Outcome, *, patient: bool) -> None:
        """Send ``outcome`` unless the lease is known lost, retrying as ``SettleAttempts``
        says."""
        if self._breaker is not None:
            change = self._breaker.record(outcome, time.monotonic())
            breaker_changed(self._breaker, change, self.counts)
        attempts = SettleAttempts(delivery, outcome.action, self._outage, self._count, patient)
        while not attempts.lease_already_lost():
            try:
                await self._apply(delivery.message, outcome)
            except (SluiceError, OSError) as error:
                delay = attempts.after_failure(error, hurried=self._hurry.is_set())
                if delay is None:
                    return
                await _wait(self._hurry, delay)
            else:
                attempts.succeeded()
                return

    def _count(self, name: str) -> None:
        setattr(self.counts, name, getattr(self.counts, name) + 1)

    async def _apply(self, message: Message, outcome: Outcome) -> None:
        if outcome.action == "ack":
            await self._ack(message, outcome.result)
        elif outcome.action == "nack":
            await self._client.nack(message, delay=outcome.delay, error=outcome.text)
        else:
            await self._client.bury(message, reason=outcome.text or "Fail")

    async def _ack(self, message: Message, value: Any) -> None:
        """Ack, with ``value`` as the result where it can be sent and the broker keeps it."""
        sendable, result = encodable_result(value)
        if value is not None and not sendable:
            dropped_result_warning(message, value)
        if sendable and can_send_result(self._client.server_info):
            ack_with_result: Any = self._client.ack  # takes result= once results exist
            await ack_with_result(message, result=result)
        else:
            await self._client.ack(message)

    # ------------------------------------------------------------------ leases

    async def _keep_lease(self, delivery: Delivery) -> None:
        """Touch the lease each time a third of it has passed, until cancelled or lost."""
        lease = delivery.lease
        while delivery.owner is None:
            await asyncio.sleep(max(lease.next_touch - time.monotonic(), 0.0))
            if delivery.owner is not None or time.monotonic() < lease.next_touch:
                continue
            sent_at = time.monotonic()
            try:
                await self._client.touch(delivery.message)
            except LeaseLost:
                if delivery.owner is None:
                    delivery.lease_lost = True
                    lease.stop()
                    lease_lost_warning(delivery)
                return
            except (SluiceError, OSError) as error:
                touch_failed(error, delivery, self._outage)
            else:
                self._outage.recovered(time.monotonic())
                lease.touched(sent_at)

    # ------------------------------------------------------------------ stopping

    async def _drain(self) -> None:
        """Wait up to ``grace`` for running handlers (a second ``stop()`` cuts it short),
        then cancel and hand back those still running."""
        grace = self.settings.grace
        log.info(
            "stopping: no longer reserving; waiting up to %gs for %d running handlers",
            grace,
            len(self._active),
        )
        deadline = time.monotonic() + grace
        while self._active and not self._hurry.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._changed.clear()
            await _wait(self._changed, remaining)
        self._hurry.set()
        unfinished = [d for d in self._active.values() if self._claim(d, "shutdown")]
        for delivery in unfinished:
            self._tasks[delivery.key].cancel()
        await self._hand_back(unfinished)
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=CANCEL_WAIT)

    async def _hand_back(self, deliveries: list[Delivery]) -> None:
        """Nack deliveries whose handlers did not finish, with delay 0: ready again at once."""
        for batch in batches(deliveries):
            handed = await self._nack_now(batch)
            self.counts.handed_back += handed
            self.counts.unsettled += len(batch) - handed

    async def _nack_now(self, batch: list[Delivery]) -> int:
        """How many of ``batch`` the broker took back (a few quick tries in an outage)."""
        backoff, messages = Backoff(), [delivery.message for delivery in batch]
        for _ in range(HAND_BACK_TRIES):
            try:
                return await self._client.nack(messages, delay=0, error=HANDED_BACK_ERROR)
            except (SluiceError, OSError) as error:
                handed = handed_back_despite(error, len(batch), self._outage)
                if handed is not None:
                    return handed
                await asyncio.sleep(backoff.next_delay())
        hand_back_gave_up(len(batch))
        return 0


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Until ``event`` is set or ``timeout`` seconds pass, whichever is first."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)
