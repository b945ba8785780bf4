"""``Worker``: a blocking handler run on a pool of threads, fed by batched long-poll reserves.

Threads: the one in ``run()`` reserves; ``concurrency`` handler threads each run one job at
a time and send its outcome; one keeper thread touches the leases of running handlers and
abandons those past their timeout. Each of them talks over a connection of its own: a long
poll never delays an ack or a touch, and acks from many threads reach the broker together,
so it commits them as one group rather than one by one.
"""

from __future__ import annotations

import math
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, TypeVar, cast

from protocol import LeaseLost, SluiceError

from ._common import Tls, broker_address, broker_tls, format_url
from ._message import Message
from ._sealing import BodyKey
from ._sync import Client
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
    Job,
    Outcome,
    encodable_result,
    is_async,
    raised,
    returned,
    timed_out,
)
from .errors import ConnectionClosed

T = TypeVar("T")


class Worker:
    """Runs ``handler(job)`` for the messages of ``queues`` on ``concurrency`` threads.

    - Reserves in batches of up to its idle threads, long-polling ``poll_wait`` seconds.
    - The handler gets a ``Job`` (``body``, ``id``, ``queue``, ``attempts``, ``headers``,
      ``message``, ``progress(percent, note)``). If it returns, the message is acked (the
      return value is sent as the result when it is bytes or msgpack-able and the broker
      stores results). If it raises ``Retry(delay)``, it is nacked with that delay;
      ``Fail(reason)``, buried with that reason; anything else, nacked with the error text
      and a traceback summary, and the queue's backoff picks the delay.
    - While a handler runs, its lease is touched each time a third of it has passed; the
      touching stops when the handler ends. If a touch finds the lease lost, the outcome
      is not sent (the message is, or will be, delivered again) and that is logged.
    - ``timeout``: a handler still running after that many seconds is abandoned: its
      message is nacked ("timeout after Xs") and no longer touched, and what the handler
      returns later is discarded. A thread cannot be stopped, so its slot stays busy (and
      is not reserved for) until the handler really returns.
    - ``stop()`` (or SIGTERM/SIGINT under ``run_forever``) stops reserving, lets running
      handlers finish for up to ``grace`` seconds, then nacks the rest with delay 0 so they
      are ready again at once instead of after their lease. Their attempt still counts.
    - When the broker goes away, every call is retried with backoff (0.1 s doubling to
      5 s); the outage is logged once when it starts and once when it ends.

    The broker is ``url``, or ``host`` and ``port``, or ``SLUICE_URL``, or else
    sluice://127.0.0.1:7700, as for ``Client``; so is ``tls``. ``visibility_timeout``
    overrides the lease length asked for at reserve (None: the message's or queue's own).
    ``counts`` tallies what happened to each message.

    ``breaker=(failures, cooldown)`` turns on a circuit breaker (off by default): after
    that many handler failures in a row (exceptions other than ``Retry`` and ``Fail``,
    and timeouts) nothing is reserved for ``cooldown`` seconds, so no message spends an
    attempt on a handler that keeps failing; then one trial job runs, and its success
    closes the breaker (its failure opens it again). Logged, and counted in
    ``counts.breaker_opened``.
    """

    def __init__(
        self,
        queues: str | Sequence[str],
        handler: Callable[[Job], Any],
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
        if is_async(handler):
            raise TypeError(f"{handler!r} is a coroutine function: run it with AsyncWorker")
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {handler!r}")
        tls_used = self._tls = broker_tls(tls, url, host, port)
        self._body_key = body_key
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
        self._reserver = self._new_client()
        self._control = self._new_client()  # the keeper's touches, and the hand-back
        self._own = threading.local()  # .client: a handler thread's own connection
        self._lock = threading.RLock()
        self._slots_changed = threading.Condition(self._lock)
        self._schedule_changed = threading.Condition(self._lock)
        self._active: dict[tuple[int, int], Delivery] = {}  # reserved and not yet settled
        self._busy = 0  # handler threads running a handler, abandoned ones included
        self._inbox: queue.SimpleQueue[Delivery | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._hurry = threading.Event()  # the grace period is over
        self._closed = False
        self._started = False
        self._clock_offset: float | None = None  # broker clock minus ours, once measured
        self._outage = Outage(self.settings.url)
        self._keeper: threading.Thread | None = None

    def _new_client(self) -> Client:
        settings = self.settings
        return Client(
            settings.host,
            settings.port,
            auth_token=settings.auth_token,
            client_name="sluice-worker",
            tls=self._tls,
            body_key=self._body_key,
        )

    @property
    def busy(self) -> int:
        """Handler threads in use, abandoned (timed-out) ones included."""
        with self._lock:
            return self._busy

    def stop(self) -> None:
        """Ask ``run()`` to finish: stop reserving, let running handlers finish for up to
        ``grace`` seconds, hand back the rest. A second call ends the grace period at once.
        Thread-safe; returns at once."""
        if self._stopping.is_set():
            self._hurry.set()
        self._stopping.set()
        with self._lock:
            self._slots_changed.notify_all()

    def run(self) -> WorkerCounts:
        """Reserve and handle messages until ``stop()``, then finish as ``stop`` says and
        return the counts. Installs no signal handlers (``run_forever`` does). An error the
        broker will not get over (a wrong auth token, say) stops the worker the same way,
        then is raised."""
        self._begin()
        try:
            self._reserve_loop()
        finally:
            self._stopping.set()
            self._drain()
            self._end()
        return self.counts

    def run_forever(self) -> WorkerCounts:
        """``run()`` until SIGTERM or SIGINT: the first signal stops the worker gracefully,
        a second one ends the grace period at once. Call it from the main thread; the
        previous signal handlers are back in place when it returns."""
        failure: list[BaseException] = []

        def run_catching() -> None:
            try:
                self.run()
            except BaseException as error:
                failure.append(error)

        runner = threading.Thread(target=run_catching, name="sluice-worker")
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _STOP_SIGNALS}
        try:
            runner.start()
            runner.join()  # signals interrupt the join, run their handler, and it resumes
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if failure:
            raise failure[0]
        return self.counts

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._stopping.is_set():
            log.info("%s again: ending the grace period now", name)
        else:
            log.info("%s: stopping", name)
        self.stop()

    # ------------------------------------------------------------------ reserving

    def _begin(self) -> None:
        if self._started:
            raise RuntimeError("a Worker runs once; make a new one to run again")
        self._started = True
        for number in range(self.settings.concurrency):
            name = f"sluice-handler-{number}"
            threading.Thread(target=self._serve, name=name, daemon=True).start()
        self._keeper = threading.Thread(target=self._keep_leases, name="sluice-keeper")
        self._keeper.daemon = True
        self._keeper.start()
        settings = self.settings
        log.info(
            "worker started: queues %s, concurrency %d (threads), broker %s",
            ",".join(settings.queues),
            settings.concurrency,
            settings.url,
        )

    def _reserve_loop(self) -> None:
        backoff = Backoff()
        while (free := self._wait_for_free_slots()) > 0:
            trial = False
            if self._breaker is not None:
                allowed, wait = self._breaker.quota(time.monotonic())
                if allowed == 0:
                    with self._lock:  # a trial's outcome notifies, as any settle does
                        self._slots_changed.wait(wait)
                    continue
                trial = allowed == 1
                free = 1 if trial else free
            try:
                messages, received_at, broker_now = self._reserve(free)
            except OUTAGE_ERRORS as error:
                self._outage.failed(error, time.monotonic())
                self._clock_offset = None  # it may be another broker when it comes back
                self._stopping.wait(backoff.next_delay())
                continue
            self._outage.recovered(time.monotonic())
            backoff.reset()
            if trial and messages and self._breaker is not None:
                self._breaker.trying()
            self._dispatch(messages, received_at, broker_now)

    def _wait_for_free_slots(self) -> int:
        """Idle handler threads, once there is one; 0 once stopping."""
        with self._lock:
            while not self._stopping.is_set() and self._busy >= self.settings.concurrency:
                self._slots_changed.wait()
            return 0 if self._stopping.is_set() else self.settings.concurrency - self._busy

    def _reserve(self, free: int) -> tuple[list[Message], float, float]:
        """Messages, when they arrived (monotonic), and the broker's time then (estimated)."""
        if self._clock_offset is None:
            before = time.time()
            broker_time = self._reserver.ping()
            self._clock_offset = broker_time - (before + time.time()) / 2
        settings = self.settings
        messages = self._reserver.reserve(
            settings.queues,
            max_messages=min(free, MAX_BATCH),
            wait=settings.poll_wait,
            visibility_timeout=settings.visibility_timeout,
        )
        return messages, time.monotonic(), time.time() + self._clock_offset

    def _dispatch(self, messages: list[Message], received_at: float, broker_now: float) -> None:
        deliveries = [
            Delivery(m, LeaseClock.at_reserve(m.lease_deadline, broker_now, received_at))
            for m in messages
        ]
        if self._stopping.is_set():  # arrived after stop(): give them straight back
            for delivery in deliveries:
                delivery.owner = "shutdown"
            self._hand_back(deliveries)
            return
        with self._lock:
            for delivery in deliveries:
                self._active[delivery.key] = delivery
                self._busy += 1
                self._inbox.put(delivery)

    # ------------------------------------------------------------------ handling

    def _serve(self) -> None:
        """A handler thread: run jobs until told to stop (None)."""
        self._own.client = client = self._new_client()
        try:
            while (delivery := self._inbox.get()) is not None:
                self._execute(delivery)
        finally:
            client.close()

    def _client(self) -> Client:
        """The calling thread's connection: its own for a handler thread, else the keeper's."""
        client: Client = getattr(self._own, "client", self._control)
        return client

    def _execute(self, delivery: Delivery) -> None:
        limit = self.settings.timeout
        with self._lock:
            delivery.deadline = time.monotonic() + limit if limit is not None else math.inf
            self._schedule_changed.notify()
        outcome = self._call_handler(delivery)
        if self._claim(delivery, "handler"):
            self._settle(delivery, outcome, patient=True)
        else:
            log.info(
                "message %d: its handler returned after the message was %s; outcome discarded",
                delivery.message.id,
                "nacked at its timeout" if delivery.owner == "timeout" else "handed back",
            )
        with self._lock:
            self._busy -= 1
            self._slots_changed.notify_all()

    def _call_handler(self, delivery: Delivery) -> Outcome:
        try:
            return returned(self.handler(Job(delivery.message, self._report_progress)))
        except BaseException as error:  # the thread outlives any one handler, even sys.exit
            return raised(error)

    def _claim(self, delivery: Delivery, owner: str) -> bool:
        """Make ``owner`` the one that settles ``delivery``; False if someone already is."""
        with self._lock:
            if delivery.owner is not None:
                return False
            delivery.owner = owner
            delivery.lease.stop()
            return True

    @staticmethod
    def _fresh_once(call: Callable[[], T]) -> T:
        """``call()``; if its connection went stale (the broker restarted since it was last
        used), tried once more on a fresh one before it counts as an outage."""
        try:
            return call()
        except ConnectionClosed:
            return call()

    def _report_progress(self, message: Message, percent: float, note: str) -> bool:
        if self._closed or not can_report_progress(self._reserver.server_info):
            return False
        report = cast(Any, self._client()).progress  # the client gains it with the broker side
        try:
            self._fresh_once(lambda: report(message, percent, note))
        except SluiceError as error:
            log.debug("message %d: progress not recorded: %s", message.id, error)
            return False
        return True

    # ------------------------------------------------------------------ settling

    def _settle(self, delivery: Delivery, outcome: Outcome, *, patient: bool) -> None:
        """Send ``outcome`` unless the lease is known lost, retrying as ``SettleAttempts``
        says, and forget the delivery."""
        if self._breaker is not None:
            change = self._breaker.record(outcome, time.monotonic())
            with self._lock:
                breaker_changed(self._breaker, change, self.counts)
        attempts = SettleAttempts(delivery, outcome.action, self._outage, self._count, patient)
        try:
            while not attempts.lease_already_lost():
                try:
                    self._fresh_once(lambda: self._apply(delivery.message, outcome))
                except (SluiceError, OSError) as error:
                    delay = attempts.after_failure(error, hurried=self._hurry.is_set())
                    if delay is None:
                        return
                    self._hurry.wait(delay)
                else:
                    attempts.succeeded()
                    return
        finally:
            with self._lock:
                self._active.pop(delivery.key, None)
                self._slots_changed.notify_all()

    def _apply(self, message: Message, outcome: Outcome) -> None:
        if outcome.action == "ack":
            self._ack(message, outcome.result)
        elif outcome.action == "nack":
            self._client().nack(message, delay=outcome.delay, error=outcome.text)
        else:
            self._client().bury(message, reason=outcome.text or "Fail")

    def _ack(self, message: Message, value: Any) -> None:
        """Ack, with ``value`` as the result where it can be sent and the broker keeps it."""
        sendable, result = encodable_result(value)
        if value is not None and not sendable:
            dropped_result_warning(message, value)
        if sendable and can_send_result(self._reserver.server_info):
            ack_with_result: Any = self._client().ack  # takes result= once results exist
            ack_with_result(message, result=result)
        else:
            self._client().ack(message)

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self.counts, name, getattr(self.counts, name) + 1)

    # ------------------------------------------------------------------ leases

    def _keep_leases(self) -> None:
        """The keeper thread: touch leases on time, abandon handlers past their timeout."""
        while (due := self._wait_for_due()) is not None:
            for delivery in due:
                if time.monotonic() >= delivery.deadline:
                    self._abandon(delivery)
                else:
                    self._touch(delivery)

    def _wait_for_due(self) -> list[Delivery] | None:
        """Running deliveries that need a touch or passed their timeout, once there are
        some; None once the worker has closed."""
        with self._lock:
            while not self._closed:
                now = time.monotonic()
                running = [d for d in self._active.values() if d.owner is None]
                due = [d for d in running if min(d.lease.next_touch, d.deadline) <= now]
                if due:
                    return due
                wake = min((min(d.lease.next_touch, d.deadline) for d in running), default=math.inf)
                self._schedule_changed.wait(None if math.isinf(wake) else wake - now)
            return None

    def _touch(self, delivery: Delivery) -> None:
        sent_at = time.monotonic()
        try:
            self._fresh_once(lambda: self._control.touch(delivery.message))
        except LeaseLost:
            self._lease_lost(delivery)
        except (SluiceError, OSError) as error:  # an outage (ConnectionClosed...) or a refusal
            with self._lock:
                touch_failed(error, delivery, self._outage)
        else:
            self._outage.recovered(time.monotonic())
            with self._lock:
                if delivery.owner is None:
                    delivery.lease.touched(sent_at)

    def _lease_lost(self, delivery: Delivery) -> None:
        with self._lock:
            if delivery.owner is not None:  # settled meanwhile: the touch simply came late
                return
            delivery.lease_lost = True
            delivery.lease.stop()
        lease_lost_warning(delivery)

    def _abandon(self, delivery: Delivery) -> None:
        if not self._claim(delivery, "timeout"):
            return
        self._count("timed_out")
        limit = self.settings.timeout or 0.0
        log.warning(
            "message %d: handler still running after its %gs timeout; nacked it and left the "
            "handler running (its thread stays busy until it returns)",
            delivery.message.id,
            limit,
        )
        self._settle(delivery, timed_out(limit), patient=False)

    # ------------------------------------------------------------------ stopping

    def _drain(self) -> None:
        """Wait up to ``grace`` for running handlers (a second ``stop()`` cuts it short),
        then hand back those still running."""
        grace = self.settings.grace
        deadline = time.monotonic() + grace
        with self._lock:
            log.info(
                "stopping: no longer reserving; waiting up to %gs for %d running handlers",
                grace,
                len(self._active),
            )
            while self._active and not self._hurry.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._slots_changed.wait(remaining)
            self._hurry.set()
            unfinished = [d for d in self._active.values() if self._claim(d, "shutdown")]
        self._hand_back(unfinished)

    def _hand_back(self, deliveries: list[Delivery]) -> None:
        """Nack deliveries whose handlers did not finish, with delay 0: ready again at once."""
        for batch in batches(deliveries):
            handed = self._nack_now(batch)
            with self._lock:
                self.counts.handed_back += handed
                self.counts.unsettled += len(batch) - handed
                for delivery in batch:
                    self._active.pop(delivery.key, None)
                self._slots_changed.notify_all()

    def _nack_now(self, batch: list[Delivery]) -> int:
        """How many of ``batch`` the broker took back (a few quick tries in an outage)."""
        backoff, messages = Backoff(), [delivery.message for delivery in batch]
        for _ in range(HAND_BACK_TRIES):
            try:
                return self._fresh_once(
                    lambda: self._control.nack(messages, delay=0, error=HANDED_BACK_ERROR)
                )
            except (SluiceError, OSError) as error:
                handed = handed_back_despite(error, len(batch), self._outage)
                if handed is not None:
                    return handed
                time.sleep(backoff.next_delay())
        hand_back_gave_up(len(batch))
        return 0

    def _end(self) -> None:
        with self._lock:
            self._closed = True
            self._schedule_changed.notify_all()
        for _ in range(self.settings.concurrency):
            self._inbox.put(None)
        if self._keeper is not None:
            self._keeper.join()  # its last touch is bounded by the client's timeout
        self._reserver.close()
        self._control.close()
        log.info("worker stopped: %s", self.counts.summary())


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
