"""The pure queue core: every queue, heap, lease and dead letter, and no I/O.

Contract: every public method takes ``now`` (wall-clock seconds) and first applies
everything due by then (delays, lease expiries, long-poll timeouts, dead-letter expiry) in
time order. ``next_deadline()`` says when the next such thing is due; the server sleeps until
then and calls ``tick(now)``. Long-poll results are not returned by the call that causes
them: they are queued and collected with ``take_completions()`` after each call.
Errors are raised as protocol errors (``LeaseLost``, ``NotFound``, ``TooLarge``...) before
anything changes, except batch ack/nack, which applies the good items and then raises
``LeaseLost`` naming the rest.

A queue exists while it is in use, as a beanstalkd tube does: an op naming a queue makes
it, and the moment it becomes unused (``Queue.unused``: no message, default settings, no
schedule, binding or waiter) it is forgotten, its totals with it. Each op checks only the
queues it may have left unused (the one a message left, the ones a waiter left, the ones
it made), so the check costs O(1) per change.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random as _random
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from protocol import BadRequest, LeaseLost, NotFound, Quota, TooLarge, pack, shown

from ._bindings import Binding, Bindings
from ._events import EventRing, cut
from ._lazyheap import Entry, LazyHeap
from ._lifecycle import (
    ACK,
    BURY,
    CANCEL,
    DEAD,
    DELAYED,
    DELETE,
    DUE,
    EXHAUST,
    EXPIRE_DEAD,
    PURGE,
    PURGE_DEAD,
    PUT_DELAYED,
    PUT_READY,
    READY,
    RELEASE,
    REPLAY,
    RESERVE,
    RESERVED,
    RETRY_LATER,
    RETRY_NOW,
    Event,
    State,
    advance_state,
)
from ._message import Message, PutSpec
from ._outcomes import NO_RESULT, DedupEntry, DedupKeys, Results, StoredResult
from ._position import ReadyRanks, delivery_key
from ._queue import TOTALS, Queue, Waiter
from ._ready import delivery_order
from ._schedules import Schedule, ScheduleSpec, fire_spec
from ._settings import DEFAULT_SETTINGS, QueueSettings

# A long-poll's answer: the messages a reserve got, or the outcome map of a result wait.
Completion = tuple[Hashable, "list[Message] | dict[str, Any]"]
FINAL_STATES = frozenset({"done", "dead", "gone"})
MAX_SCHEDULES = 10_000  # per broker
LATE = 1.0  # seconds: a slot fired later than this counts as missed
ScheduleKey = tuple[str, str]  # (queue, schedule name)


class PutIds(list[int]):
    """The ids a put returns, in order, and the indexes of the messages that were
    duplicates (their dedup key was taken: the id is the existing message's)."""

    def __init__(self) -> None:
        super().__init__()
        self.duplicates: list[int] = []


@dataclass(slots=True)
class Changes:
    """What changed since the last ``take_changes()``, for the store to write: messages whose
    record changed (a message in state GONE is to be deleted), queues whose settings or
    totals changed, queues forgotten (their records are to be deleted), and the id and
    lease counters (never reused, so persisted too). (Not frozen: a frozen dataclass sets
    each field through ``object.__setattr__``, and the core makes one per commit.)"""

    messages: list[Message]
    queues: list[Queue]
    next_id: int
    next_token: int
    results: dict[int, StoredResult | None]  # None: delete
    dedup: dict[tuple[str, str], DedupEntry | None]  # ended keys only; None: delete
    schedules: dict[ScheduleKey, Schedule | None]  # None: delete
    bindings: dict[Binding, bool] = field(default_factory=dict)  # False: delete
    forgotten: list[str] = field(default_factory=list)  # queue names, not also in queues
    next_event: int = 1  # the seq of the next job event (never reused either)


LEASE_EXPIRED = "lease expired"
# The job event of a ready or delayed message removed by each lifecycle event.
_REMOVED_WAITING = {CANCEL: "cancelled", PURGE: "purged", DELETE: "deleted"}


class Core:
    def __init__(
        self,
        *,
        random: Callable[[], float] = _random.random,
        max_delivery_bytes: int | None = None,
        max_body_limit: int | None = None,
        track_changes: bool = False,
        on_dead: Callable[[Message, str], None] | None = None,
        admit_fire: Callable[[PutSpec], bool] | None = None,
        max_queues: int | None = None,
        events: EventRing | None = None,
    ) -> None:
        """``random`` draws backoff jitter from [0, 1). ``max_delivery_bytes`` bounds the
        bodies handed out by one reserve (at least one message is always handed out).
        ``track_changes`` keeps the set of changed messages and queues for a store to take
        with ``take_changes()``; without a store, leave it off. ``on_dead(message,
        reason)`` is called as each message is dead-lettered; it must not raise.
        ``max_body_limit``: configure refuses a larger ``max_body`` (None: the settings'
        own limit only). ``admit_fire(spec)``: whether a schedule's fire may store its
        message (False: the store is full; the slot is skipped); None admits all.
        ``max_queues``: an op that would create a queue beyond this many raises ``Quota``
        before changing anything (recovery loads whatever is stored). ``events``: where
        each lifecycle change is recorded (see ``_events``); a ring of the default size if
        None."""
        self.events = EventRing() if events is None else events
        self.messages: dict[int, Message] = {}
        self.on_dead = on_dead
        self.admit_fire = admit_fire
        self.max_queues = max_queues
        self.max_delivery_bytes = max_delivery_bytes
        self.max_body_limit = max_body_limit  # the largest max_body configure may set
        self.queues: dict[str, Queue] = {}
        # The totals of the queues forgotten or deleted since start, so that sums over all
        # queues (the broker-wide counters of /metrics) never go down. In memory only.
        self.forgotten_totals = dict.fromkeys(TOTALS, 0)
        self._random = random
        self._next_id = 1
        self._next_token = 1
        self._seq = 0
        self._delayed = LazyHeap(self._live_checker(DELAYED))  # (due_at, seq, id)
        self._leases = LazyHeap(self._live_checker(RESERVED))  # (deadline, seq, id)
        self._dead_expiry = LazyHeap(self._live_checker(DEAD))  # (expires_at, seq, id)
        self._waiters: dict[Hashable, Waiter] = {}
        self._waiter_deadlines = LazyHeap(self._waiter_live)  # (deadline, seq, key)
        # When a rate-limited queue with waiters gets its next token: (time, seq, queue).
        self._throttle_wakes = LazyHeap(self._wake_live)
        self.schedules: dict[ScheduleKey, Schedule] = {}
        self._schedule_due = LazyHeap(self._schedule_live)  # (next_at, seq, key)
        self._changed_schedules: dict[ScheduleKey, Schedule | None] = {}
        self._completions: list[Completion] = []
        self._changed: dict[int, Message] | None = {} if track_changes else None
        self.results = Results(track_changes)
        self.dedup = DedupKeys(track_changes)
        self.bindings = Bindings(track_changes)  # durable fan-out; not on the messages path
        # Waits for a message's outcome (result, put_and_wait): key -> (message id, seq),
        # and message id -> keys. Their deadlines share the long-polls' heap.
        self._result_waits: dict[Hashable, tuple[int, int]] = {}
        self._result_waiters: dict[int, list[Hashable]] = {}
        self._changed_queues: dict[str, Queue | None] = {}  # None: forgotten
        # A lower bound on every deadline heap's top: nothing is due before it, so tick()
        # can return at once. Lowered by each push, made exact again by next_deadline().
        self._due_hint = math.inf

    # ----------------------------------------------------------------- time

    def tick(self, now: float) -> None:
        """Apply everything due at or before ``now``."""
        self.results.prune(now)
        self.dedup.prune(now)
        if now < self._due_hint:
            return
        self._apply_due_events(now)
        self._expire_dead_letters(now)
        self.next_deadline()  # makes the hint exact again

    @property
    def due_hint(self) -> float:
        """A time at or before the next deadline (``math.inf`` if there may be none):
        nothing becomes due earlier. Cheap; ``next_deadline()`` gives the exact time."""
        return self._due_hint

    def next_deadline(self) -> float | None:
        """The earliest time at which ``tick`` has something to do, or None."""
        earliest = math.inf
        for heap in (
            self._delayed,
            self._leases,
            self._dead_expiry,
            self._waiter_deadlines,
            self._throttle_wakes,
            self._schedule_due,
        ):
            top = heap.peek()
            if top is not None and top[0] < earliest:
                earliest = top[0]
        self._due_hint = earliest
        return None if earliest == math.inf else earliest

    def take_completions(self) -> list[Completion]:
        """Long-polls answered since the last call: ``(waiter key, messages)``, where an
        empty list means the wait timed out."""
        completions, self._completions = self._completions, []
        return completions

    # ------------------------------------------------------------ changes

    @property
    def has_changes(self) -> bool:
        """True if something changed since the last ``take_changes()`` (when tracking)."""
        return bool(
            self._changed
            or self._changed_queues
            or self.results.changed
            or self.dedup.changed
            or self._changed_schedules
            or self.bindings.changed
        )

    def take_changes(self) -> Changes:
        """Hand over (and forget) what changed since the last call. Each changed message is
        listed once, in its current state; its queue is listed with it."""
        changed = self._changed
        if changed is None:
            raise RuntimeError("this core was made without track_changes")
        messages = list(changed.values())
        queues = self._changed_queues
        for message in messages:  # (a queue noted forgotten, or made anew, stays so)
            if message.queue.name not in queues:
                queues[message.queue.name] = message.queue
        self._changed, self._changed_queues = {}, {}
        kept = [queue for queue in queues.values() if queue is not None]
        forgotten = [name for name, queue in queues.items() if queue is None]
        # Each rarely changed kind is handed over, and replaced, only when it changed.
        results = self.results.changed
        if results:
            self.results.changed = {}
        dedup = self.dedup.changed
        if dedup:
            self.dedup.changed = {}
        schedules = self._changed_schedules
        if schedules:
            self._changed_schedules = {}
        bindings = self.bindings.changed
        if bindings:
            bindings = self.bindings.take_changes()
        return Changes(
            messages,
            kept,
            self._next_id,
            self._next_token,
            results or {},
            dedup or {},
            schedules or {},
            bindings or {},
            forgotten,
            self.events.next_seq,
        )

    @property
    def counters(self) -> tuple[int, int, int]:
        """The next id, lease token and event seq this core will hand out."""
        return self._next_id, self._next_token, self.events.next_seq

    def _changed_message(self, message: Message) -> None:
        if self._changed is not None:
            self._changed[message.id] = message

    # ----------------------------------------------------------- recovery

    def recover(
        self,
        now: float,
        queues: Iterable[tuple[str, QueueSettings, dict[str, int]]],
        messages: Iterable[tuple[str, Message]],
        *,
        next_id: int,
        next_token: int,
        next_event: int = 1,
        results: Iterable[tuple[int, StoredResult]] = (),
        dedup: Iterable[tuple[str, str, DedupEntry]] = (),
        schedules: Iterable[Schedule] = (),
        bindings: Iterable[Binding] = (),
    ) -> None:
        """Rebuild every index from stored records, on an empty core. Each message comes
        with its queue's name and its state, ordering ``seq``, deadlines and in-memory
        times already set (``decode_message``; ``Message.queue`` is filled in here).
        Then applies what fell due while the broker was down: a lease whose deadline
        passed expires now, its attempt counted, and a schedule whose slots came due
        catches up as its ``catchup`` says."""
        if self.messages or self.queues:
            raise RuntimeError("recover() needs an empty core")
        for name, settings, totals in queues:
            queue = self._queue(name)
            queue.apply(settings, now)
            queue.totals.update(totals)
        entries: dict[LazyHeap, list[Entry]] = {}
        ready_of: dict[Queue, list[Message]] = {}
        highest_seq = highest_token = 0
        by_name = self.queues
        known = self.messages
        ready_state = READY
        for queue_name, message in messages:
            queue = by_name.get(queue_name) or self._queue(queue_name)
            message.queue = queue
            known[message.id] = message
            if message.seq > highest_seq:
                highest_seq = message.seq
            if message.state is ready_state:  # the common case, counted below
                ready = ready_of.get(queue)
                if ready is None:
                    ready = ready_of[queue] = []
                ready.append(message)
            else:
                heap, entry = self._index_of(message)
                if message.state is DEAD:
                    queue.add_dead(message)
                if message.lease_token is not None and message.lease_token > highest_token:
                    highest_token = message.lease_token
                loaded = entries.get(heap)
                if loaded is None:
                    loaded = entries[heap] = []
                loaded.append(entry)
                queue.counts[message.state] += 1
        for heap, loaded in entries.items():
            heap.load(loaded)
        for queue, ready in ready_of.items():
            queue.ready.load(ready)
            queue.counts[ready_state] += len(ready)
        highest_id = max(known, default=0)
        for message_id, result in results:
            self.results.keep(message_id, result)
        for queue_name, dedup_key, ended in dedup:  # ended keys; live ones follow
            self.dedup.restore(queue_name, dedup_key, ended)
        for message in self.messages.values():
            rare = message.rare  # (read directly: this runs once per message)
            if rare is not None and rare.key is not None and message.state is not DEAD:
                self.dedup.live(message.queue.name, rare.key, message.id)
        self.results.changed = {} if self._changed is not None else None
        self.dedup.changed = {} if self._changed is not None else None
        self._seq = highest_seq
        restored = list(bindings)
        self.bindings.restore(restored)
        for _, bound_queue in restored:
            self._queue(bound_queue).anchors += 1
        for schedule in schedules:
            self._queue(schedule.queue).anchors += 1
            self.schedules[schedule.key] = schedule
            schedule.seq = self._next_seq()
            if schedule.next_at is not None:
                self._schedule_due.push((schedule.next_at, schedule.seq, schedule.key))
        self._next_id = max(next_id, highest_id + 1)
        self._next_token = max(next_token, highest_token + 1)
        self.events.next_seq = max(self.events.next_seq, next_event)
        self._due_hint = -math.inf  # recompute from the loaded heaps
        self.tick(now)
        for queue in list(self.queues.values()):  # (stored by a version that kept them)
            self._drop_if_unused(queue)

    def _index_of(self, message: Message) -> tuple[LazyHeap, Entry]:
        """The heap a recovered message that is not ready belongs in, and its entry."""
        state = message.state
        deadline = message.deadline
        if state is DELAYED and deadline is not None:
            return self._delayed, (deadline, message.seq, message.id)
        if state is RESERVED and deadline is not None:
            return self._leases, (deadline, message.seq, message.id)
        if state is DEAD:
            expires_at = message.dead_expires_at
            return self._dead_expiry, (
                math.inf if expires_at is None else expires_at,
                message.seq,
                message.id,
            )
        raise ValueError(f"message {message.id}: cannot recover state {state} without its time")

    # ----------------------------------------------------------- producing

    def put(self, now: float, queue_name: str, specs: list[PutSpec]) -> PutIds:
        """Store ``specs`` in order; all or nothing. Returns the new ids. A spec whose dedup
        key is taken (a live message, or one that ended less than the queue's dedup window
        ago) adds nothing: its id is the existing message's, and its index is listed in
        ``duplicates``."""
        self.tick(now)
        max_body = self._settings_of(queue_name).max_body
        for index, spec in enumerate(specs):
            if len(spec.body) > max_body:
                raise TooLarge(
                    f"message {index}: body of {len(spec.body)} bytes exceeds "
                    f"{queue_name}'s max_body of {max_body}"
                )
        self.make_room((queue_name,))
        queue = self._queue(queue_name)
        ids = PutIds()
        seq = self._next_seq()  # one for the whole put: its messages' ids order them
        for index, spec in enumerate(specs):
            message_id, duplicate = self._put_one(queue, spec, now, seq)
            ids.append(message_id)
            if duplicate:
                ids.duplicates.append(index)
        self._serve_waiters(queue, now)
        if ids.duplicates or not specs:  # perhaps nothing stored in a queue made for it
            self._drop_if_unused(queue)
        return ids

    def _put_one(self, queue: Queue, spec: PutSpec, now: float, seq: int) -> tuple[int, bool]:
        """Store one message; returns its id and False, or, if its dedup key is taken,
        the existing message's id and True (nothing is stored then)."""
        if spec.key is not None:
            existing = self.dedup.find(queue.name, spec.key, now)
            if existing is not None:
                return existing, True
            self.dedup.live(queue.name, spec.key, self._next_id)
        message = Message(self._next_id, queue, spec, now)
        self._next_id += 1
        self.messages[message.id] = message
        if spec.delay > 0:
            self._make_delayed(message, PUT_DELAYED, now + spec.delay, seq)
        else:
            self._make_ready(message, PUT_READY, now, seq)
        queue.totals["put"] += 1
        plain = not spec.priority and not spec.delay  # (its fields are the defaults)
        fields = None if plain else {"priority": spec.priority, "delay": spec.delay}
        self.events.emit(now, "put", queue.name, message.id, 0, fields)
        return message.id, False

    def cancel(self, now: float, message_id: int) -> bool:
        """Remove a ready or delayed message. False if it is reserved, dead or unknown."""
        self.tick(now)
        message = self.messages.get(message_id)
        if message is None or message.state not in (READY, DELAYED):
            return False
        self._discard_waiting(message, CANCEL, now)
        return True

    # ----------------------------------------------------------- consuming

    def reserve(
        self,
        now: float,
        queue_names: Iterable[str],
        max_messages: int,
        *,
        visibility_timeout: float | None = None,
        wait: float = 0.0,
        waiter_key: Hashable = None,
    ) -> list[Message]:
        """Lease up to ``max_messages``, best first across the named queues.

        If none is ready and ``wait > 0``, registers a long-poll under ``waiter_key`` (which
        must be unique among live waiters) and returns []; its result arrives later through
        ``take_completions()``."""
        self.tick(now)
        names = list(dict.fromkeys(queue_names))
        self.make_room(names)
        queues = [self._queue(name) for name in names]
        messages = self._take_best(queues, max_messages, now, visibility_timeout)
        if not messages and wait > 0:
            self._add_waiter(waiter_key, queues, max_messages, visibility_timeout, now + wait)
            for queue in queues:
                if queue.limits is not None and queue.counts[READY] > 0:
                    queue.limits.parked += 1  # (a paused queue holds nothing back here)
                    self._note_held_back(queue, now)
        elif not messages or len(queues) > 1:  # a queue it found empty may be one it made
            for queue in queues:
                self._drop_if_unused(queue)
        return messages

    def cancel_wait(self, waiter_key: Hashable) -> None:
        """Forget a long-poll (its connection went away). No-op if already answered."""
        if waiter_key in self._result_waits:
            self._end_result_wait(waiter_key)
            self._waiter_deadlines.discard()
            return
        waiter = self._waiters.get(waiter_key)
        if waiter is None:
            return
        self._unregister_waiter(waiter)
        self._waiter_deadlines.discard()

    def time_out_all_waits(self) -> None:
        """Answer every long-poll now with no messages (broker shutting down)."""
        for waiter in list(self._waiters.values()):
            self._time_out_waiter(waiter)
            self._waiter_deadlines.discard()
        for key in list(self._result_waits):
            self._time_out_result_wait(key)
            self._waiter_deadlines.discard()

    def release(self, now: float, messages: list[Message]) -> None:
        """Put leased messages that never reached their consumer (its connection closed
        before the reply went out) back to ready, with that attempt uncounted."""
        self.tick(now)
        touched: dict[str, Queue] = {}
        for message in messages:
            if message.state is not RESERVED or message.lease_token is None:
                continue
            self._end_lease(message)
            message.attempts -= 1
            message.queue.totals["delivered"] -= 1
            self._make_ready(message, RELEASE, now)
            self._emit(now, "released", message)
            touched[message.queue.name] = message.queue
        self._serve_waiters_of(touched.values(), now)

    def ack(
        self, now: float, deliveries: list[tuple[int, int]], results: list[Any] | None = None
    ) -> int:
        """Finish each ``(id, lease)``. Returns how many were acked; raises ``LeaseLost``
        (details: ``failed`` ids, ``done`` count) if any lease was not current.
        ``results``, parallel to ``deliveries`` (``NO_RESULT`` where none), are kept for
        the queue's result TTL."""
        self.tick(now)
        by_id = {d[0]: r for d, r in zip(deliveries, results, strict=True)} if results else {}

        def finish(message: Message) -> None:  # its lease has ended by now
            self._finish(message, now, by_id.get(message.id, NO_RESULT))

        done, failed = self._settle(deliveries, finish)
        self._serve_capped(done, now)
        _raise_if_failed(failed, len(done))
        return len(done)

    def nack(
        self,
        now: float,
        deliveries: list[tuple[int, int]],
        *,
        delay: float | None = None,
        error: str | None = None,
    ) -> int:
        """Give each ``(id, lease)`` back for a retry after ``delay`` (None: the queue's
        backoff), or dead-letter it if its attempts are used up. Failures as in ``ack``."""
        self.tick(now)

        def give_back(message: Message) -> None:
            message.queue.totals["nacked"] += 1
            self._retry(message, now, delay, error, "nacked")

        done, failed = self._settle(deliveries, give_back)
        self._serve_waiters_of({m.queue.name: m.queue for m in done}.values(), now)
        _raise_if_failed(failed, len(done))
        return len(done)

    def touch(self, now: float, message_id: int, lease: int, seconds: float | None = None) -> float:
        """Extend a live lease to ``now + seconds`` (default: the lease's own duration).
        Returns the new deadline."""
        self.tick(now)
        message = self._require_lease(message_id, lease)
        deadline = now + (message.lease_duration if seconds is None else seconds)
        self._push_lease(message, deadline)
        self._leases.discard()  # the old entry, stale now that the message has a new seq
        return deadline

    def progress(self, now: float, message_id: int, lease: int, percent: float, note: str) -> None:
        """Record how far the current delivery's handler has got; ``status`` shows it."""
        self.tick(now)
        message = self._require_lease(message_id, lease)
        message.progress = (percent, note)
        self._changed_message(message)
        self._emit(now, "progress", message, {"progress": percent, "note": cut(note)})

    def wait_result(
        self,
        now: float,
        message_id: int,
        wait: float,
        waiter_key: Hashable,
        dedup_key: tuple[str, str] | None = None,
    ) -> dict[str, Any] | None:
        """The outcome of a message: ``done`` (with its result), ``dead`` (reason, last
        error), ``gone`` (cancelled or purged), or its current state if still pending. If
        pending and ``wait > 0``, registers a wait under ``waiter_key`` and returns None;
        the outcome then arrives through ``take_completions()``, at the latest at
        ``now + wait``. Raises ``NotFound`` if there is neither a message nor a result,
        nor (given the ``(queue, key)`` that named it) a dedup entry saying how it ended."""
        self.tick(now)
        outcome = self._outcome(message_id, now, dedup_key)
        if outcome["state"] in FINAL_STATES or wait <= 0:
            return outcome
        if waiter_key is None or waiter_key in self._waiters or waiter_key in self._result_waits:
            raise ValueError(f"waiter key {waiter_key!r} is missing or already waiting")
        seq = self._next_seq()
        self._result_waits[waiter_key] = (message_id, seq)
        self._result_waiters.setdefault(message_id, []).append(waiter_key)
        self._schedule(self._waiter_deadlines, (now + wait, seq, waiter_key))
        return None

    def bury(self, now: float, message_id: int, lease: int, reason: str) -> None:
        """Dead-letter a reserved message now, whatever its attempts."""
        self.tick(now)
        message = self._require_lease(message_id, lease)
        self._end_lease(message)
        self._kill(message, BURY, now, reason)
        self._serve_capped((message,), now)

    # ------------------------------------------------------------ inspecting

    def status(self, now: float, message_id: int) -> dict[str, Any]:
        self.tick(now)
        message = self.messages.get(message_id)
        if message is not None:
            if message.state is READY:
                return message.status() | self._place(message, now)
            return message.status()
        result = self.results.get(message_id, now)
        if result is None:
            if message_id >= self._next_id:
                raise NotFound(
                    f"no message {message_id}: no put has made it yet (the ids so far go up "
                    f"to {self._next_id - 1})"
                )
            raise NotFound(
                f"no message {message_id}: it was acked (its result, if any, is past the "
                "queue's result_ttl), cancelled or purged"
            )
        return _done(message_id, result)

    def _place(self, message: Message, now: float) -> dict[str, Any]:
        """A ready message's ``position`` in its queue, and ``eta_s`` when known. The
        first ask in a queue indexes its ready messages (see ``_position``)."""
        queue = message.queue
        if queue.ranks is None:
            keys = (delivery_key(m.priority, m.seq, m.id) for m in queue.ready.in_order())
            queue.ranks = ReadyRanks(keys)
        return queue.ranks.place(
            message.priority, message.seq, message.id, now, queue.totals["delivered"]
        )

    def stats(self, now: float, queue_name: str) -> dict[str, Any]:
        self.tick(now)
        return self._existing(queue_name).stats(now)

    def list_queues(self, now: float) -> list[dict[str, Any]]:
        self.tick(now)
        return [self.queues[name].summary() for name in sorted(self.queues)]

    def dead_letters(
        self, now: float, queue_name: str, limit: int, after: int | None = None
    ) -> list[Message]:
        """Up to ``limit`` dead letters in id order, starting after id ``after``."""
        self.tick(now)
        queue = self._existing(queue_name)
        ids = queue.dead.irange(minimum=after, inclusive=(False, True))
        page: list[Message] = []
        for message_id in ids:
            if len(page) == limit:
                break
            page.append(queue.dead[message_id])
        return page

    def peek(
        self, now: float, queue_name: str, state: State, limit: int, after: int | None = None
    ) -> list[Message]:
        """Up to ``limit`` messages of the queue in ``state``, without changing anything:
        ready in delivery order, delayed by due time, reserved by lease deadline, dead by
        id; with ``after``, those that come after that message (which must still be in
        ``state`` in this queue). O(n log limit) over the queue's ready messages or the
        broker's delayed or reserved ones: an admin look, not a hot path."""
        self.tick(now)
        queue = self._existing(queue_name)
        if state is DEAD:
            ids = queue.dead.irange(minimum=after, inclusive=(False, True))
            return [queue.dead[message_id] for message_id in itertools.islice(ids, limit)]
        cursor = None
        if after is not None:
            cursor = self.messages.get(after)
            if cursor is None or cursor.queue is not queue or cursor.state is not state:
                raise BadRequest(
                    f"peek: message {after} is no longer {state.value} in {queue_name}; "
                    "start again from the first page"
                )
        if state is READY:
            ordered: Iterable[Message] = queue.ready.in_order()
            if cursor is not None:
                start = delivery_order(cursor)
                ordered = (m for m in ordered if delivery_order(m) > start)
            return list(itertools.islice(ordered, limit))
        heap = self._delayed if state is DELAYED else self._leases
        entries = [e for e in heap.live_entries() if self.messages[e[-1]].queue is queue]
        if cursor is not None:
            start_entry = self._index_of(cursor)[1]
            entries = [entry for entry in entries if entry > start_entry]
        return [self.messages[entry[-1]] for entry in heapq.nsmallest(limit, entries)]

    # -------------------------------------------------------------- admin

    def configure(self, now: float, queue_name: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply setting changes (all or nothing); returns the queue's full settings."""
        self.tick(now)
        existing = self.queues.get(queue_name)
        settings = (existing.settings if existing else DEFAULT_SETTINGS).updated(changes)
        limit = self.max_body_limit
        if "max_body" in changes and limit is not None and settings.max_body > limit:
            raise BadRequest(
                f"max_body must be at most {limit} bytes here: a put of a larger body could "
                "never fit in a frame (the broker's --max-frame)"
            )
        self.make_room((queue_name,))
        queue = existing or self._queue(queue_name)  # created only once the changes are valid
        old_limits, was_paused = queue.limits, queue.settings.paused
        queue.apply(settings, now)
        self._emit_configured(now, queue.name, changes, was_paused)
        if old_limits not in (None, queue.limits) and old_limits.wake_at is not None:
            self._throttle_wakes.discard()  # the old bucket's wake goes stale
        if self._changed is not None:
            self._changed_queues[queue.name] = queue
        self._serve_waiters(queue, now)
        self._drop_if_unused(queue)  # settings back to the defaults on an empty queue
        return queue.settings.to_wire()

    def _emit_configured(
        self, now: float, queue: str, changes: dict[str, Any], was_paused: bool
    ) -> None:
        """``paused`` or ``resumed`` when that flips, ``configured`` (naming the settings
        given) when any other setting is given."""
        paused = changes.get("paused", was_paused)
        if paused != was_paused:
            self.events.emit(now, "paused" if paused else "resumed", queue, None, 0)
        others = sorted(name for name in changes if name != "paused")
        if others:
            self.events.emit(now, "configured", queue, None, 0, {"settings": others})

    def purge(self, now: float, queue_name: str) -> int:
        """Drop every ready and delayed message of the queue. O(ready + all delayed)."""
        self.tick(now)
        queue = self._existing(queue_name)
        doomed = list(queue.ready.in_order())
        doomed += [
            message
            for entry in self._delayed.live_entries()
            if (message := self.messages[entry[-1]]).queue is queue
        ]
        for message in doomed:
            self._discard_waiting(message, PURGE, now)
        return len(doomed)

    def replay(self, now: float, queue_name: str, ids: list[int] | None = None) -> int:
        """Move dead letters (all, or those of ``ids`` that are dead in this queue) back to
        ready in id order, with attempts reset to 0. Returns how many moved."""
        self.tick(now)
        queue = self._existing(queue_name)
        if ids is None:
            chosen = list(queue.dead.keys())
        else:
            chosen = sorted(message_id for message_id in set(ids) if message_id in queue.dead)
        for message_id in chosen:
            message = queue.dead.pop(message_id)
            message.attempts = 0
            message.dead_reason = message.dead_at = message.dead_expires_at = None
            if message.key is not None:
                if self.dedup.find(queue.name, message.key, now) in (None, message.id):
                    self.dedup.live(queue.name, message.key, message.id)
                else:  # another message holds the key now: this one gives it up for good
                    message.key = None
            self._make_ready(message, REPLAY, now)
            self._dead_expiry.discard()
            self._emit(now, "replayed", message)
        self._serve_waiters(queue, now)
        return len(chosen)

    def delete_queue(self, now: float, queue_name: str, force: bool = False) -> dict[str, Any]:
        """Remove a queue: its settings, the bindings into it, its waiters (answered with
        no messages) and, with ``force``, its messages in every state (a leased one's
        later ack gets ``LeaseLost``, as after a purge), its dead letters and schedules.
        Without ``force``, a queue holding any message or schedule raises ``BadRequest``
        (details: the counts) and nothing changes. ``NotFound`` if there is no such
        queue. O(the broker's delayed, reserved and schedules): an admin op."""
        self.tick(now)
        queue = self._existing(queue_name)
        schedules = [s for s in self.schedules.values() if s.queue == queue_name]
        held = {state.value: count for state, count in queue.counts.items()}
        if not force and (any(held.values()) or schedules):
            raise BadRequest(
                f"delete_queue: queue {shown(queue_name)} is not empty ({held['ready']} ready, "
                f"{held['delayed']} delayed, {held['reserved']} reserved, {held['dead']} dead, "
                f"{len(schedules)} schedules); pass force=true to delete them with it",
                {**held, "schedules": len(schedules)},
            )
        for waiter in list(queue.waiters.values()):
            self._time_out_waiter(waiter)
            self._waiter_deadlines.discard()
        for schedule in schedules:
            del self.schedules[schedule.key]
            self._drop_schedule_entry(schedule)
            if self._changed is not None:
                self._changed_schedules[schedule.key] = None
        patterns = self.bindings.patterns_into(queue_name)
        for pattern in patterns:
            self.bindings.unbind(pattern, queue_name)
        messages = self._drop_messages_of(queue, now)
        if queue.limits is not None and queue.limits.wake_at is not None:
            self._throttle_wakes.discard()  # its entry goes stale with the queue
        if self.queues.get(queue_name) is queue:  # (not forgotten already on the way)
            self._remove_queue(queue)
        self.events.emit(now, "queue_deleted", queue_name, None, 0)
        return {
            "deleted": True,
            "messages": messages,
            "schedules": len(schedules),
            "bindings": len(patterns),
        }

    def _drop_messages_of(self, queue: Queue, now: float) -> int:
        """Remove every message of ``queue``, whatever its state; returns how many."""
        doomed = list(queue.ready.in_order())
        for heap in (self._delayed, self._leases):
            doomed += [
                message
                for entry in heap.live_entries()
                if (message := self.messages[entry[-1]]).queue is queue
            ]
        dead = list(queue.dead.values())
        for message in doomed:
            if message.state is RESERVED:
                self._drop_leased(message, now)
            else:
                self._discard_waiting(message, DELETE, now)
        for message in dead:
            self._drop_dead(message, DELETE, now)
        return len(doomed) + len(dead)

    def _drop_leased(self, message: Message, now: float) -> None:
        """Remove a reserved message (its queue is deleted): its lease is lost, and the
        waits for its outcome hear ``gone``."""
        self._end_lease(message)
        if self._end_matters(message):
            self._ended(message, now, {"id": message.id, "state": "gone"})
        self._forget(message, DELETE)
        self._emit(now, "deleted", message)

    def purge_dead(self, now: float, queue_name: str) -> int:
        self.tick(now)
        queue = self._existing(queue_name)
        doomed = list(queue.dead.values())
        for message in doomed:
            self._drop_dead(message, PURGE_DEAD, now)
        return len(doomed)

    # ------------------------------------------------------------ internals

    def _live_checker(self, state: State) -> Callable[[Entry], bool]:
        messages = self.messages

        def is_live(entry: Entry) -> bool:
            message = messages.get(entry[-1])
            return message is not None and message.state is state and message.seq == entry[-2]

        return is_live

    def _waiter_live(self, entry: Entry) -> bool:
        waiter = self._waiters.get(entry[-1])
        if waiter is not None:
            return bool(waiter.seq == entry[-2])
        result_wait = self._result_waits.get(entry[-1])
        return result_wait is not None and result_wait[1] == entry[-2]

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def make_room(self, names: Iterable[str]) -> None:
        """Raise ``Quota`` if creating the queues of ``names`` that do not exist yet would
        go past ``max_queues``; called before an op changes anything."""
        if self.max_queues is None:
            return
        queues, new = self.queues, None  # (no set is made when every name exists)
        for name in names:
            if name not in queues:
                new = new or set()
                new.add(name)
        if new is not None and len(queues) + len(new) > self.max_queues:
            raise Quota(
                f"the broker holds {len(self.queues)} queues and may hold {self.max_queues} "
                f"(--max-queues): cannot create {shown(sorted(new)[0])}; use an existing "
                "queue, or raise the limit"
            )

    def _settings_of(self, name: str) -> QueueSettings:
        """The queue's settings, or the defaults a queue made now would have."""
        queue = self.queues.get(name)
        return DEFAULT_SETTINGS if queue is None else queue.settings

    def _drop_if_unused(self, queue: Queue) -> None:
        """Forget ``queue`` if it is unused (``Queue.unused``); with a store, its record
        is deleted with the next changes. Its totals are lost. No-op for a queue already
        forgotten. Callers hold no index that a forgotten queue must stay in: it has no
        message, waiter, schedule or binding."""
        if queue.unused() and self.queues.get(queue.name) is queue:
            self._remove_queue(queue)

    def _remove_queue(self, queue: Queue) -> None:
        """Take ``queue`` (the current one of its name) off the core and, with a store,
        off the store; its totals go to ``forgotten_totals``."""
        del self.queues[queue.name]
        for key, count in queue.totals.items():
            self.forgotten_totals[key] += count
        if self._changed is not None:
            self._changed_queues[queue.name] = None

    def _queue(self, name: str) -> Queue:
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = Queue(name)
            if self._changed is not None:
                self._changed_queues[name] = queue
        return queue

    def _existing(self, name: str) -> Queue:
        queue = self.queues.get(name)
        if queue is None:
            raise NotFound(
                f"no queue named {shown(name)}: none was made, or it was forgotten once "
                "unused (no message, default settings, no schedule, binding or waiter)"
            )
        return queue

    def _emit(
        self, now: float, event: str, message: Message, fields: dict[str, Any] | None = None
    ) -> None:
        self.events.emit(now, event, message.queue.name, message.id, message.attempts, fields)

    def _move(self, message: Message, event: Event) -> None:
        """The one place a message changes state; keeps the queue's counts in step."""
        counts = message.queue.counts
        old = message.state
        new = advance_state(old, event)
        if old in counts:
            counts[old] -= 1
        if new in counts:
            counts[new] += 1
        message.state = new
        if self._changed is not None:
            self._changed[message.id] = message

    def _schedule(self, heap: LazyHeap, entry: Entry) -> None:
        """Push onto one of the deadline heaps (entry[0] is the time it falls due)."""
        heap.push(entry)
        if entry[0] < self._due_hint:
            self._due_hint = entry[0]

    def _make_ready(
        self, message: Message, event: Event, now: float, seq: int | None = None
    ) -> None:
        """``seq``: the put's, for a message just put (None: a fresh one)."""
        self._move(message, event)
        message.since = now
        message.seq = self._next_seq() if seq is None else seq
        message.deadline = None
        message.queue.ready.push(message)
        ranks = message.queue.ranks
        if ranks is not None:  # someone asked a position here: keep the index in step
            ranks.add(message.priority, message.seq, message.id)

    def _make_delayed(
        self, message: Message, event: Event, due_at: float, seq: int | None = None
    ) -> None:
        self._move(message, event)
        message.seq = self._next_seq() if seq is None else seq
        message.deadline = due_at
        self._schedule(self._delayed, (due_at, message.seq, message.id))

    def _push_lease(self, message: Message, deadline: float) -> None:
        message.seq = self._next_seq()
        message.deadline = deadline
        self._schedule(self._leases, (deadline, message.seq, message.id))
        self._changed_message(message)

    def _lease(self, message: Message, now: float, visibility_timeout: float | None) -> None:
        ranks = message.queue.ranks
        if ranks is not None:  # (before the lease gives it a new seq)
            ranks.remove(message.priority, message.seq, message.id)
        self._move(message, RESERVE)
        message.since = now
        message.attempts += 1
        message.lease_token = self._next_token
        self._next_token += 1
        rare = message.rare  # (its fields read here directly: this is every delivery)
        message.lease_duration = (
            visibility_timeout
            or (rare.visibility_timeout if rare is not None else None)
            or message.queue.settings.visibility_timeout
        )
        self._push_lease(message, now + message.lease_duration)
        message.queue.totals["delivered"] += 1
        self.events.emit(now, "reserved", message.queue.name, message.id, message.attempts)

    def _end_lease(self, message: Message) -> None:
        """The lease's heap entry goes stale: the caller moves the message on."""
        message.lease_token = message.deadline = None
        message.seq = self._next_seq()  # stale before discard(), which may compact
        self._leases.discard()

    def _settle(
        self, deliveries: list[tuple[int, int]], settle: Callable[[Message], None]
    ) -> tuple[list[Message], list[int]]:
        """End each current lease and hand its message to ``settle``. Returns the messages
        settled and the ids whose lease was not current (those are left unchanged)."""
        done: list[Message] = []
        failed: list[int] = []
        for message_id, lease in deliveries:
            message = self._leased(message_id, lease)
            if message is None:
                failed.append(message_id)
                continue
            self._end_lease(message)
            settle(message)
            done.append(message)
        return done, failed

    def _finish(self, message: Message, now: float, result: Any) -> None:
        queue = message.queue
        queue.totals["acked"] += 1
        queue.processing.observe(now - message.since)
        value = None if result is NO_RESULT else result
        if result is not NO_RESULT and queue.settings.result_ttl > 0:
            kept = StoredResult(queue.name, value, now, now + queue.settings.result_ttl)
            self.results.keep(message.id, kept)
        if self._end_matters(message):
            self._ended(message, now, _done(message.id, StoredResult(queue.name, value, now, now)))
        self._forget(message, ACK)
        fields = None if result is NO_RESULT else {"result_size": len(pack(result))}
        self.events.emit(now, "acked", queue.name, message.id, message.attempts, fields)

    def _end_matters(self, message: Message) -> bool:
        """Whether the end of ``message`` has more to do than forget it (``_ended``): a
        rare field is set (a dedup key's window may start) or someone waits for its
        outcome. Asked first, so plain messages build no outcome map on the hot path."""
        return message.rare is not None or message.id in self._result_waiters

    def _ended(self, message: Message, now: float, outcome: dict[str, Any]) -> None:
        """The message is done, dead or removed (and ``_end_matters``): answer the waits
        for its ``outcome``, and start its dedup key's window."""
        if message.key is not None:
            window = message.queue.settings.dedup_window
            self.dedup.ended(
                message.queue.name, message.key, message.id, now, window, outcome["state"]
            )
        for key in self._result_waiters.pop(message.id, ()):
            del self._result_waits[key]
            self._waiter_deadlines.discard()
            self._completions.append((key, outcome))

    def _leased(self, message_id: int, lease: int) -> Message | None:
        message = self.messages.get(message_id)
        if message is None or message.state is not RESERVED:
            return None
        return message if message.lease_token == lease else None

    def _require_lease(self, message_id: int, lease: int) -> Message:
        message = self._leased(message_id, lease)
        if message is None:
            raise LeaseLost(
                f"lease {lease} on message {message_id} is not current: it expired, or the "
                "message was acked, nacked or buried; reserve it again",
                {"failed": [message_id], "done": 0},
            )
        return message

    def _take_best(
        self, queues: list[Queue], limit: int, now: float, visibility_timeout: float | None
    ) -> list[Message]:
        taken: list[Message] = []
        budget = self.max_delivery_bytes
        quotas = _quotas(queues, now)  # None: no queue here is limited
        while len(taken) < limit:
            best_queue, message, best_key = None, None, None
            for queue in queues:
                if quotas is not None and quotas.get(queue, 1) <= 0:
                    continue  # out of tokens or at its cap: the others still serve
                candidate = queue.best_ready()
                if candidate is None:
                    continue
                if message is None:  # (a one-queue reserve compares nothing)
                    best_queue, message = queue, candidate
                    continue
                key = delivery_order(candidate)
                best_key = best_key or delivery_order(message)
                if key < best_key:
                    best_queue, message, best_key = queue, candidate, key
            if best_queue is None or message is None:
                break
            if budget is not None:
                budget -= len(message.body)
                if budget < 0 and taken:
                    break  # the rest waits for the next reserve
            best_queue.ready.take(message)
            self._lease(message, now, visibility_timeout)
            taken.append(message)
            if quotas is not None and best_queue in quotas:
                quotas[best_queue] -= 1
        if quotas is not None:
            _charge(quotas, taken, len(taken) < limit, now)
        return taken

    def _retry(
        self, message: Message, now: float, delay: float | None, error: str | None, event: str
    ) -> None:
        """After a nack or expiry (lease already ended; ``event`` says which): dead-letter
        if attempts are used up, else back to ready or delayed."""
        if error is not None:
            message.last_error = error
        limit = message.effective_max_attempts
        if limit is not None and message.attempts >= limit:
            self._emit(now, event, message, {"error": cut(error)} if error else None)
            self._kill(message, EXHAUST, now, f"max_attempts ({limit}) used up")
            return
        if delay is None:
            delay = message.queue.settings.backoff.delay(message.attempts, self._random())
        fields: dict[str, Any] = {"delay": delay}
        if error is not None:
            fields["error"] = cut(error)
        self._emit(now, event, message, fields)
        if delay > 0:
            self._make_delayed(message, RETRY_LATER, now + delay)
        else:
            self._make_ready(message, RETRY_NOW, now)

    def _kill(self, message: Message, event: Event, now: float, reason: str) -> None:
        self._move(message, event)
        message.dead_reason = reason
        message.dead_at = now
        message.deadline = None
        queue = message.queue
        queue.add_dead(message)
        queue.totals["dead_lettered"] += 1
        message.seq = self._next_seq()
        # One expiry entry per dead letter (+inf: kept until replayed or purged), so that
        # replay and purge discard exactly one whatever the ttl is by then.
        ttl = queue.settings.dead_letter_ttl
        expires_at = math.inf if ttl is None else now + ttl
        message.dead_expires_at = None if ttl is None else expires_at
        self._schedule(self._dead_expiry, (expires_at, message.seq, message.id))
        if self._end_matters(message):
            self._ended(message, now, _dead(message))
        self._emit(now, "dead", message, {"reason": cut(reason)})
        if self.on_dead is not None:
            self.on_dead(message, reason)

    def _forget(self, message: Message, event: Event) -> None:
        self._move(message, event)
        del self.messages[message.id]
        counts = message.queue.counts
        if not counts[READY] and not counts[RESERVED]:  # (unused()'s first tests)
            self._drop_if_unused(message.queue)

    def _discard_waiting(self, message: Message, event: Event, now: float) -> None:
        """Remove a ready or delayed message (cancel, purge)."""
        ready = message.state is READY
        if ready and message.queue.ranks is not None:
            message.queue.ranks.remove(message.priority, message.seq, message.id)
        if self._end_matters(message):
            self._ended(message, now, {"id": message.id, "state": "gone"})
        self._forget(message, event)
        (message.queue.ready if ready else self._delayed).discard()
        self._emit(now, _REMOVED_WAITING[event], message)

    def _drop_dead(self, message: Message, event: Event, now: float) -> None:
        del message.queue.dead[message.id]
        self._forget(message, event)
        self._dead_expiry.discard()
        if event is DELETE:
            self._emit(now, "deleted", message)
        else:
            self._emit(now, "removed", message, {"reason": "purge_dead"})

    def _apply_due_events(self, now: float) -> None:
        """Delayed messages coming due, leases running out and long-polls timing out,
        merged in time order and each applied at its own time. At one instant a due
        message goes before a lease expiry, then a rate-limited queue's next token, then
        a schedule's slot, and all of them before a long-poll timeout."""
        heaps = (
            self._delayed,
            self._leases,
            self._throttle_wakes,
            self._schedule_due,
            self._waiter_deadlines,
        )
        while True:
            earliest, source = None, None
            for heap in heaps:
                top = heap.peek()
                if top is not None and top[0] <= now and (earliest is None or top[0] < earliest[0]):
                    earliest, source = top, heap
            if earliest is None:
                return
            assert source is not None
            source.pop()
            if source is self._delayed:
                self._come_due(self.messages[earliest[-1]], now)
            elif source is self._leases:
                self._expire_lease(self.messages[earliest[-1]], earliest[0], now)
            elif source is self._throttle_wakes:
                self._wake_throttled(self.queues[earliest[-1]], now)
            elif source is self._schedule_due:
                self._come_due_schedule(self.schedules[earliest[-1]], now)
            else:
                key = earliest[-1]
                if key in self._waiters:
                    self._time_out_waiter(self._waiters[key])
                else:
                    self._time_out_result_wait(key)

    def _come_due(self, message: Message, now: float) -> None:
        self._make_ready(message, DUE, now)
        self._emit(now, "ready", message)
        self._serve_waiters(message.queue, now)

    def _expire_lease(self, message: Message, deadline: float, now: float) -> None:
        """Same as a nack with no delay, applied at the lease's deadline."""
        message.lease_token = message.deadline = None
        message.queue.totals["expired"] += 1
        self._retry(message, deadline, None, LEASE_EXPIRED, "expired")
        self._serve_waiters(message.queue, now)

    def _expire_dead_letters(self, now: float) -> None:
        while (top := self._dead_expiry.peek()) is not None and top[0] <= now:
            self._dead_expiry.pop()
            message = self.messages[top[-1]]
            del message.queue.dead[message.id]
            self._forget(message, EXPIRE_DEAD)
            self._emit(now, "removed", message, {"reason": "dead_letter_ttl"})

    # ----------------------------------------------------------- schedules

    def set_schedule(
        self, now: float, queue_name: str, name: str, spec: ScheduleSpec
    ) -> dict[str, Any]:
        """Create or replace a schedule. A replaced one keeps its counters and its last
        slot: no slot it fired fires again. Its first slot is the first after ``now``
        (a past ``start_at`` does not catch up)."""
        self.tick(now)
        key = (queue_name, name)
        old = self.schedules.get(key)
        if old is None and len(self.schedules) >= MAX_SCHEDULES:
            raise BadRequest(
                f"schedule: this broker already has {MAX_SCHEDULES} schedules; remove some "
                "with unschedule"
            )
        max_body = self._settings_of(queue_name).max_body
        if len(spec.body) > max_body:
            raise TooLarge(
                f"schedule: body of {len(spec.body)} bytes exceeds {queue_name}'s max_body "
                f"of {max_body}"
            )
        self.make_room((queue_name,))
        queue = self._queue(queue_name)
        schedule = Schedule(queue_name, name, spec, now)
        if old is None:
            queue.anchors += 1
        else:
            self._drop_schedule_entry(old)
            schedule.last_slot, schedule.last_message_id = old.last_slot, old.last_message_id
            schedule.runs, schedule.triggered = old.runs, old.triggered
            schedule.missed, schedule.skipped = old.missed, old.skipped
        self.schedules[key] = schedule
        schedule.plan_after(now)
        self._plan(schedule)
        return schedule.to_wire()

    def unschedule(self, now: float, queue_name: str, name: str) -> bool:
        """Remove a schedule; False if there is none. Messages it put stay."""
        self.tick(now)
        schedule = self.schedules.pop((queue_name, name), None)
        if schedule is None:
            return False
        self._drop_schedule_entry(schedule)
        if self._changed is not None:
            self._changed_schedules[schedule.key] = None
        queue = self.queues[queue_name]
        queue.anchors -= 1
        self._drop_if_unused(queue)
        return True

    def list_schedules(self, now: float, queue_name: str | None = None) -> list[dict[str, Any]]:
        """Every schedule (of one queue, if named), by queue then name."""
        self.tick(now)
        chosen = [s for s in self.schedules.values() if queue_name in (None, s.queue)]
        return [s.to_wire() for s in sorted(chosen, key=lambda s: s.key)]

    def trigger(self, now: float, queue_name: str, name: str) -> int:
        """Fire a schedule now, outside its slots (and whatever its overlap): its message's
        slot is ``now``. Returns the message's id. Counted in ``triggered``."""
        self.tick(now)
        schedule = self.schedules.get((queue_name, name))
        if schedule is None:
            raise NotFound(f"no schedule {shown(name)} on queue {shown(queue_name)}")
        message_id = self._fire(schedule, fire_spec(schedule.spec, name, now), now)
        schedule.triggered += 1
        self._changed_schedule(schedule)
        return message_id

    def _come_due_schedule(self, schedule: Schedule, now: float) -> None:
        """A schedule's next slot came due. Fired on time (within ``LATE``), it fires;
        slots missed (more than one due by ``now``, or one due for longer: the broker was
        down or stalled) are counted, and its ``catchup`` chooses which fire: ``latest``
        the newest, ``skip`` none, ``all`` each (the newest MAX_CATCHUP)."""
        first = schedule.next_at
        assert first is not None
        count, recent = schedule.recurrence.missed(first, now)
        mode = schedule.spec.catchup
        if count == 1 and now - first <= LATE:
            chosen = recent
        else:
            schedule.missed += count
            chosen = [] if mode == "skip" else recent[-1:] if mode == "latest" else recent
        fired = 0
        for slot in chosen:
            if schedule.finished():
                break
            spec = fire_spec(schedule.spec, schedule.name, slot)
            admitted = self.admit_fire is None or self.admit_fire(spec)
            if self._overlaps(schedule) or not admitted:
                schedule.skipped += 1
            else:
                self._fire(schedule, spec, now)
                schedule.runs += 1
            fired += 1
        schedule.skipped += count - fired
        schedule.last_slot = recent[-1] if recent else first
        schedule.plan_after(max(now, schedule.last_slot))
        self._plan(schedule)

    def _overlaps(self, schedule: Schedule) -> bool:
        """True if the schedule skips overlapping fires and its last message is still
        ready, delayed or reserved."""
        if schedule.spec.overlap != "skip" or schedule.last_message_id is None:
            return False
        message = self.messages.get(schedule.last_message_id)
        return message is not None and message.state is not DEAD

    def _fire(self, schedule: Schedule, spec: PutSpec, now: float) -> int:
        """Put the schedule's message for a slot (``spec``, whose dedup key makes a slot
        put at most one message); returns its id."""
        queue = self._queue(schedule.queue)
        message_id, _ = self._put_one(queue, spec, now, self._next_seq())
        schedule.last_message_id = message_id
        self._serve_waiters(queue, now)
        return message_id

    def _plan(self, schedule: Schedule) -> None:
        """Put the schedule's next slot on the timer (a fresh entry), and note the change."""
        schedule.seq = self._next_seq()
        if schedule.next_at is not None:
            self._schedule(self._schedule_due, (schedule.next_at, schedule.seq, schedule.key))
        self._changed_schedule(schedule)

    def _drop_schedule_entry(self, schedule: Schedule) -> None:
        if schedule.next_at is not None:
            schedule.seq = self._next_seq()  # its entry goes stale
            self._schedule_due.discard()

    def _changed_schedule(self, schedule: Schedule) -> None:
        if self._changed is not None:
            self._changed_schedules[schedule.key] = schedule

    def _schedule_live(self, entry: Entry) -> bool:
        schedule = self.schedules.get(entry[-1])
        return schedule is not None and schedule.seq == entry[-2]

    # ------------------------------------------------------------ bindings

    def bind(self, now: float, pattern: str, queue_name: str) -> bool:
        """Bind ``pattern`` to the queue, which is made if need be and kept while a
        binding names it; False if the binding existed. Valid names assumed."""
        self.tick(now)
        if (pattern, queue_name) in self.bindings:
            return False
        self.make_room((queue_name,))
        self.bindings.bind(pattern, queue_name)  # (BadRequest past its limit: nothing made)
        self._queue(queue_name).anchors += 1
        return True

    def unbind(self, now: float, pattern: str, queue_name: str) -> bool:
        """Remove a binding; False if there was none. The queue goes if now unused."""
        self.tick(now)
        if not self.bindings.unbind(pattern, queue_name):
            return False
        queue = self.queues[queue_name]
        queue.anchors -= 1
        self._drop_if_unused(queue)
        return True

    # -------------------------------------------------------------- limits

    @staticmethod
    def _waits_for_token(queue: Queue) -> bool:
        """True if the queue has waiters and ready messages that only its rate limit holds
        back (not a pause, not its cap: a lease ending serves those)."""
        limits = queue.limits
        if limits is None or limits.bucket is None or not queue.waiters:
            return False
        if queue.counts[READY] == 0 or queue.settings.paused:
            return False
        cap = limits.max_in_flight
        return cap is None or queue.counts[RESERVED] < cap

    def _arm_throttle(self, queue: Queue, now: float) -> None:
        """If waiters of ``queue`` wait for its next token, make sure the timer wakes
        then: one live entry per queue, in the heap exactly while it is wanted."""
        if not self._waits_for_token(queue):
            return
        limits = queue.limits
        assert limits is not None and limits.bucket is not None
        due = limits.bucket.next_token_at(now)
        if limits.wake_at == due:
            return  # its entry is in the heap
        if limits.wake_at is not None:
            self._throttle_wakes.discard()
        limits.wake_at, limits.wake_seq = due, self._next_seq()
        self._schedule(self._throttle_wakes, (due, limits.wake_seq, queue.name))

    def _note_held_back(self, queue: Queue, now: float) -> None:
        """After serving: waiters still there with ready messages mean a limit holds
        them back (the time counts as throttled); wake them at the next token."""
        assert queue.limits is not None
        if queue.waiters and queue.counts[READY] > 0 and not queue.settings.paused:
            queue.limits.blocked(now)
            self._arm_throttle(queue, now)

    def _wake_throttled(self, queue: Queue, now: float) -> None:
        """The queue's next token came due: serve its waiters."""
        assert queue.limits is not None
        queue.limits.wake_at = None
        self._serve_waiters(queue, now)

    def _serve_capped(self, settled: Iterable[Message], now: float) -> None:
        """The leases of ``settled`` ended: waiters held back by their queues' caps may
        go on. Builds nothing for queues without a cap (every ack passes here)."""
        capped: dict[str, Queue] | None = None
        for message in settled:
            limits = message.queue.limits
            if limits is not None and limits.max_in_flight is not None:
                if capped is None:
                    capped = {}
                capped[message.queue.name] = message.queue
        if capped is not None:
            for queue in capped.values():
                self._serve_waiters(queue, now)

    def _wake_live(self, entry: Entry) -> bool:
        """A wake entry is live while it is its queue's and still wanted. The heap drops
        an entry it finds not live, so one found unwanted is noted as gone (``wake_at``
        None) and the next ``_arm_throttle`` pushes a fresh one."""
        queue = self.queues.get(entry[-1])
        limits = queue.limits if queue is not None else None
        if limits is None or limits.wake_seq != entry[-2]:
            return False
        if self._waits_for_token(queue):  # type: ignore[arg-type]
            return True
        limits.wake_at = None
        return False

    # ------------------------------------------------------------- waiters

    def _add_waiter(
        self,
        key: Hashable,
        queues: list[Queue],
        max_messages: int,
        visibility_timeout: float | None,
        deadline: float,
    ) -> None:
        if key is None or key in self._waiters:
            raise ValueError(f"waiter key {key!r} is missing or already waiting")
        waiter = Waiter(key, self._next_seq(), queues, max_messages, visibility_timeout, deadline)
        self._waiters[key] = waiter
        for queue in queues:
            queue.waiters[waiter.seq] = waiter
        self._schedule(self._waiter_deadlines, (deadline, waiter.seq, key))

    def _serve_waiters(self, queue: Queue, now: float) -> None:
        """Hand ready messages of ``queue`` to its waiters, first come first served."""
        if queue.waiters:
            self._serve_waiters_of((queue,), now)

    def _serve_waiters_of(self, queues: Iterable[Queue], now: float) -> None:
        """Hand ready messages of ``queues`` to the waiters on them, in the order the
        waiters started waiting, across all of ``queues``."""
        serving = tuple(queues)
        while (waiter := _first_waiter(serving, now)) is not None:
            self.cancel_wait(waiter.key)
            messages = self._take_best(
                waiter.queues, waiter.max_messages, now, waiter.visibility_timeout
            )
            self._completions.append((waiter.key, messages))
        for queue in serving:
            if queue.limits is not None:
                self._note_held_back(queue, now)

    def _outcome(
        self, message_id: int, now: float, dedup_key: tuple[str, str] | None = None
    ) -> dict[str, Any]:
        message = self.messages.get(message_id)
        if message is not None:
            if message.state is DEAD:
                return _dead(message)
            return {"id": message_id, "state": message.state.value}
        result = self.results.get(message_id, now)
        ended = self.dedup.entries.get(dedup_key) if dedup_key is not None else None
        if result is None and ended is not None and ended.message_id == message_id:
            if ended.ended_as == "done":  # acked without a result kept
                return {"id": message_id, "state": "done", "result": None}
            if ended.ended_as is not None:  # dead letter since purged, or removed
                return {"id": message_id, "state": ended.ended_as}
        if result is None:
            raise NotFound(
                f"no message or result {message_id}: unknown, acked without a result, or "
                "its result outlived the queue's result_ttl"
            )
        return _done(message_id, result)

    def _end_result_wait(self, key: Hashable) -> int:
        """Take a result wait off the books (its deadline entry goes stale); returns the
        message id it waited on."""
        message_id, _ = self._result_waits.pop(key)
        keys = self._result_waiters[message_id]
        keys.remove(key)
        if not keys:
            del self._result_waiters[message_id]
        return message_id

    def _time_out_result_wait(self, key: Hashable) -> None:
        message_id = self._end_result_wait(key)
        message = self.messages.get(message_id)
        state = message.state.value if message is not None else "gone"
        self._completions.append((key, {"id": message_id, "state": state}))

    def _time_out_waiter(self, waiter: Waiter) -> None:
        self._unregister_waiter(waiter)
        self._completions.append((waiter.key, []))

    def _unregister_waiter(self, waiter: Waiter) -> None:
        """Take a waiter off the broker and every queue it waits on (its deadline entry
        goes stale; the caller discards or has popped it)."""
        del self._waiters[waiter.key]
        for queue in waiter.queues:
            queue.waiters.pop(waiter.seq, None)
            if not queue.waiters:
                self._drop_if_unused(queue)


def _first_waiter(queues: tuple[Queue, ...], now: float) -> Waiter | None:
    """The waiter that began waiting first among the heads of ``queues`` that can deliver
    now, or None."""
    first = None
    for queue in queues:
        if queue.waiters and queue.can_deliver(now):
            head = next(iter(queue.waiters.values()))
            if first is None or head.seq < first.seq:
                first = head
    return first


def _quotas(queues: list[Queue], now: float) -> dict[Queue, int] | None:
    """What each limited queue among ``queues`` may deliver now; None if none is."""
    quotas = None
    for queue in queues:
        if queue.limits is not None:
            if quotas is None:
                quotas = {}
            quotas[queue] = queue.limits.quota(now, queue.counts[RESERVED])
    return quotas


def _charge(quotas: dict[Queue, int], taken: list[Message], wanted_more: bool, now: float) -> None:
    """Spend the tokens of what limited queues delivered; note a queue whose ready
    messages a limit held back from a reserve that wanted more."""
    sent: dict[Queue, int] = {}
    for message in taken:
        if message.queue in quotas:
            sent[message.queue] = sent.get(message.queue, 0) + 1
    for queue in quotas:
        limits = queue.limits
        assert limits is not None
        if queue in sent:
            limits.delivered(sent[queue], now)
        held_back = quotas[queue] <= 0 and queue.counts[READY] > 0
        if wanted_more and held_back and not queue.settings.paused:
            limits.blocked(now)


def _raise_if_failed(failed: list[int], done: int) -> None:
    if failed:
        raise LeaseLost(
            f"{len(failed)} of {len(failed) + done} leases were not current (expired, or "
            "already acked, nacked or buried); those messages were left unchanged",
            {"failed": failed, "done": done},
        )


def _done(message_id: int, result: StoredResult) -> dict[str, Any]:
    return {
        "id": message_id,
        "queue": result.queue,
        "state": "done",
        "result": result.value,
        "done_at": result.done_at,
    }


def _dead(message: Message) -> dict[str, Any]:
    return {
        "id": message.id,
        "queue": message.queue.name,
        "state": "dead",
        "dead_reason": message.dead_reason,
        "last_error": message.last_error,
        "attempts": message.attempts,
    }
