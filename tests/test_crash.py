"""Crash tests: the daemon is killed with SIGKILL at random moments under load, restarted on
the same data dir, and everything it confirmed must still hold (DESIGN.md, "Guarantees").

Each round runs producers and consumers (threads, each with its own ``Client``) against the
real broker, kills it at a random moment, restarts it on the same dir, and checks the
``Ledger`` the threads kept of what the broker confirmed:

- every confirmed put is still there, with its body, priority and headers, unless its ack
  was confirmed; ready messages keep their delivery order;
- a confirmed ack is never followed by another delivery of that message;
- a message leased at the crash stays reserved until its lease deadline (as set by reserve
  or by a confirmed touch), then comes back with that attempt counted, and is delivered
  again later with a higher attempt count; or, since a reserve's reply need not wait for
  the commit of its lease, the crash forgot that delivery: then the message is back as it
  was before it, with exactly that one attempt uncounted, and no touch of the lease was
  confirmed (a touch's reply waits for a commit that holds the lease);
- delayed messages keep their due times, dead letters their reason and last error, and the
  queue its settings;
- ids and lease tokens handed out after a restart are above every one seen before it, also
  after a crash that finds every message acked.

A call cut off by the kill (connection closed, timeout) has an unknown outcome: the ledger
keeps those apart and accepts either outcome for them only. Rounds share one data dir, so
state piles up across crashes; at the end everything is drained and accounted for.

The kill moments and the workload come from ``random.Random(seed)``; every failure names the
seed, and ``CRASH_TEST_SEED=<seed>`` replays its choices (thread timing is not replayable).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from client import Client, Message
from client.errors import ConnectionClosed, LeaseLost, NotFound, Timeout
from tests.conftest import BrokerProcess, start_broker, stop_broker

QUEUE = "crash.jobs"
PACER = "crash.pacer"  # never has messages: its long-polls are how the test waits
SETTINGS: dict[str, Any] = {
    "visibility_timeout": 1.0,  # leases held at a crash come back soon after the restart
    "max_attempts": 7,
    "backoff": {"type": "fixed", "delay": 0.25},
    "dead_letter_ttl": 123456.0,
    "result_ttl": 1234.0,  # and 1000 + the epoch from the first round on
    "dedup_window": 42.0,
    "max_body": 65536,
}
ROUNDS = 4
PRODUCERS = 3
CONSUMERS = 3
PUT_CALLS_PER_ROUND = 150  # per producer: keeps the backlog within one peek (1000)
KILL_AFTER = (0.05, 0.6)  # seconds after the workload starts
DELAY_RANGE = (300.0, 600.0)  # delayed puts never come due during the test
DRAIN_TIMEOUT = 20.0
JOIN_TIMEOUT = 10.0
# Put kinds, by weight. A message's kind decides what every consumer does with it.
KINDS = {"ack": 50, "batch": 15, "nack": 10, "delayed": 10, "nackbury": 5, "bury": 5}
KINDS |= {"fragile": 5, "touch": 5}  # fragile: max_attempts 1, so its nack kills it
TOUCH_SECONDS = 1.5  # a touched message is left leased for this long
FORGET_SHARE = 0.05  # share of ack-kind deliveries left unsettled, to expire later
CUT_OFF = (ConnectionClosed, Timeout, OSError)  # the call's outcome is unknown


@dataclass(frozen=True, slots=True)
class PutPlan:
    kind: str
    epoch: int  # how many restarts had happened when the put was sent
    priority: int
    headers: dict[str, str | int]
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class Delivery:
    id: int
    token: int
    attempts: int
    lease_deadline: float
    body: bytes
    epoch: int


@dataclass(frozen=True, slots=True)
class Settle:
    action: str  # "ack", "nack" or "bury"
    outcome: str  # "done", "lost" (LeaseLost: nothing changed) or "unknown" (cut off)


@dataclass(repr=False)
class Ledger:
    """Everything the clients learned, from every thread (guarded by ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    epoch: int = 0
    plans: dict[bytes, PutPlan] = field(default_factory=dict)
    body_of: dict[int, bytes] = field(default_factory=dict)  # confirmed or found to exist
    id_of_body: dict[bytes, int] = field(default_factory=dict)
    id_epoch: dict[int, int] = field(default_factory=dict)  # the epoch each id was put in
    unknown_puts: set[bytes] = field(default_factory=set)  # bodies of cut-off puts
    collisions: list[str] = field(default_factory=list)
    due_at: dict[int, float] = field(default_factory=dict)
    touched: dict[tuple[int, int], float | None] = field(default_factory=dict)  # None: cut off
    deliveries: list[Delivery] = field(default_factory=list)
    latest: dict[int, Delivery] = field(default_factory=dict)  # each id's highest token
    settles: dict[tuple[int, int], Settle] = field(default_factory=dict)
    acked: dict[int, int] = field(default_factory=dict)  # id -> token of the confirmed ack
    unknown_acks: set[int] = field(default_factory=set)
    nack_errors: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    bury_reasons: dict[int, str] = field(default_factory=dict)
    gone: set[int] = field(default_factory=set)  # checked NOT_FOUND after a restart
    cancelled: set[int] = field(default_factory=set)
    purged: set[int] = field(default_factory=set)  # dead letters purged once accounted for
    done: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))  # confirmed
    held_at_crash: dict[int, Delivery] = field(default_factory=dict)
    forgotten: set[tuple[int, int]] = field(default_factory=set)  # deliveries a crash forgot
    dead_seen: dict[int, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # configure's echo at the start

    def __repr__(self) -> str:
        return (
            f"Ledger(epoch={self.epoch}, messages={len(self.body_of)}, "
            f"acked={len(self.acked)}, deliveries={len(self.deliveries)})"
        )

    # ----------------------------------------------------------- recording

    def plan_put(self, body: bytes, kind: str, priority: int = 0, delay: float = 0.0) -> bytes:
        """Note a put about to be sent. Its headers: the body up to its last dot (shared
        by the bodies of one batch) and the epoch."""
        tag, _, _ = body.rpartition(b".")
        headers: dict[str, str | int] = {"tag": tag.decode(), "epoch": self.epoch}
        with self.lock:
            self.plans[body] = PutPlan(kind, self.epoch, priority, headers, delay)
        return body

    def put_confirmed(self, ids: list[int], bodies: list[bytes]) -> None:
        with self.lock:
            for message_id, body in zip(ids, bodies, strict=True):
                self._learn(message_id, body, self.plans[body].epoch)

    def put_cut_off(self, bodies: list[bytes]) -> None:
        with self.lock:
            self.unknown_puts.update(b for b in bodies if b not in self.id_of_body)

    def _learn(self, message_id: int, body: bytes, epoch: int) -> None:
        known_body = self.body_of.get(message_id)
        known_id = self.id_of_body.get(body)
        if known_body not in (None, body):
            self.collisions.append(f"id {message_id} of {known_body!r} reused for {body!r}")
        if known_id not in (None, message_id):
            self.collisions.append(f"{body!r} has two ids: {known_id} and {message_id}")
        self.body_of[message_id] = body
        self.id_of_body[body] = message_id
        self.id_epoch.setdefault(message_id, epoch)

    def found(self, message_id: int, body: bytes, priority: int, headers: Any) -> None:
        """The broker shows this message: it must be one we put, with that very body,
        priority and headers. One whose put is cut off or not yet confirmed to its producer
        is learned now."""
        with self.lock:
            plan = self.plans.get(body)
            assert plan is not None, f"message {message_id} ({body!r}) was never put"
            assert (priority, headers) == (plan.priority, plan.headers), (
                f"message {message_id} has priority {priority} and headers {headers}; "
                f"it was put with {plan}"
            )
            self.unknown_puts.discard(body)
            self._learn(message_id, body, plan.epoch)

    def delivered(self, messages: list[Message]) -> None:
        for message in messages:
            self.found(message.id, message.body, message.priority, message.headers)
        with self.lock:
            new = [
                Delivery(m.id, m.lease, m.attempts, m.lease_deadline, m.body, self.epoch)
                for m in messages
            ]
            self.deliveries += new
            for delivery in new:
                known = self.latest.get(delivery.id)
                if known is None or delivery.token > known.token:
                    self.latest[delivery.id] = delivery

    def settling(self, message: Message, action: str, text: str) -> None:
        with self.lock:
            if action == "nack":
                self.nack_errors[message.id].append(text)
            else:
                self.bury_reasons[message.id] = text

    def settled(self, message: Message, action: str, outcome: str) -> None:
        with self.lock:
            self.settles[message.id, message.lease] = Settle(action, outcome)
            if outcome == "done":
                self.done[message.id].add(action)
            if action == "ack" and outcome == "done":
                self.acked[message.id] = message.lease
            elif action == "ack" and outcome == "unknown":
                self.unknown_acks.add(message.id)

    def touching(self, message: Message, deadline: float | None) -> None:
        with self.lock:
            self.touched[message.id, message.lease] = deadline

    def kind_of(self, body: bytes) -> str:
        return self.plans[body].kind

    # ------------------------------------------------------------- queries

    def latest_deliveries(self) -> dict[int, Delivery]:
        """Each message's delivery with the highest token (kept as deliveries come: a
        long campaign has hundreds of thousands)."""
        return self.latest

    def settle_of(self, delivery: Delivery) -> Settle | None:
        return self.settles.get((delivery.id, delivery.token))

    def current_lease(self, delivery: Delivery) -> Delivery | None:
        """``delivery`` with the deadline its last confirmed touch set; None if a touch of
        it was cut off (then its deadline is unknown)."""
        key = (delivery.id, delivery.token)
        if key not in self.touched:
            return delivery
        deadline = self.touched[key]
        return None if deadline is None else replace(delivery, lease_deadline=deadline)

    def confirmed_text(self, message_id: int, action: str) -> list[str]:
        """The nack errors or the bury reason sent for ``message_id``, if the broker
        confirmed a nack (or the bury) of it; else []."""
        if action not in self.done.get(message_id, ()):
            return []
        return self.nack_errors[message_id] if action == "nack" else [self.bury_reasons[message_id]]


# --------------------------------------------------------------------- workload


def produce(client: Client, ledger: Ledger, rng: random.Random, name: str) -> None:
    """Put messages of random kinds until the broker goes away (or enough were put)."""
    for seq in range(PUT_CALLS_PER_ROUND):
        kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        tag = f"e{ledger.epoch}.{name}.{seq}"
        priority = rng.choice((0, 0, 0, 1, 5, -2))
        if kind == "batch":
            kinds = [rng.choice(("ack", "ack", "nack")) for _ in range(4)]
            bodies = [
                ledger.plan_put(f"{tag}.{k}{i}".encode(), k, priority) for i, k in enumerate(kinds)
            ]
        else:
            delay = round(rng.uniform(*DELAY_RANGE), 3) if kind == "delayed" else 0.0
            bodies = [ledger.plan_put(f"{tag}.{kind}".encode(), kind, priority, delay)]
        try:
            ids = send_put(client, ledger, bodies)
        except CUT_OFF:
            ledger.put_cut_off(bodies)
            return
        ledger.put_confirmed(ids, bodies)
        if kind == "delayed" and not read_due_time(client, ledger, ids[0]):
            return


def send_put(client: Client, ledger: Ledger, bodies: list[bytes]) -> list[int]:
    """One put call: a batch (one message per body), or one message with its plan's
    options."""
    plan = ledger.plans[bodies[0]]
    if len(bodies) > 1:
        return list(client.put_many(QUEUE, bodies, priority=plan.priority, headers=plan.headers))
    message_id = client.put(
        QUEUE,
        bodies[0],
        priority=plan.priority,
        delay=plan.delay,
        max_attempts=1 if plan.kind == "fragile" else None,
        headers=plan.headers,
    )
    return [message_id]


def read_due_time(client: Client, ledger: Ledger, message_id: int) -> bool:
    """Note the due time of a delayed put as the broker states it before any crash."""
    try:
        status = client.status(message_id)
    except CUT_OFF:
        return False
    with ledger.lock:
        ledger.due_at[message_id] = status["due_at"]
    return True


def consume(client: Client, ledger: Ledger, rng: random.Random) -> None:
    """Reserve, then ack, nack, bury, touch or forget by the message's kind, until cut
    off. A touched or forgotten message stays leased until its lease runs out."""
    while True:
        try:
            messages = client.reserve(QUEUE, max_messages=rng.choice((1, 4, 8)), wait=0.2)
        except CUT_OFF:
            return
        ledger.delivered(messages)
        to_ack = []
        for message in messages:
            action, text = decide(ledger, message, rng)
            if action == "ack":
                to_ack.append(message)
            elif not act(client, ledger, message, action, text):
                return
        if to_ack and not ack_all(client, ledger, to_ack, batched=rng.random() < 0.5):
            return


def decide(ledger: Ledger, message: Message, rng: random.Random) -> tuple[str, str]:
    kind = ledger.kind_of(message.body)
    with ledger.lock:
        nacked_before = bool(ledger.nack_errors.get(message.id))
        touched_before = any(key[0] == message.id for key in ledger.touched)
    if kind == "touch" and not touched_before:
        return "touch", ""
    if kind == "fragile" or (kind in ("nack", "nackbury") and not nacked_before):
        return "nack", f"{kind} {message.id} failed on attempt {message.attempts}"
    if kind in ("bury", "nackbury"):
        return "bury", f"{kind} {message.id} buried on attempt {message.attempts}"
    if kind == "ack" and rng.random() < FORGET_SHARE:
        return "forget", ""
    return "ack", ""


def act(client: Client, ledger: Ledger, message: Message, action: str, text: str) -> bool:
    """Nack, bury, touch or forget one message; False if the call was cut off."""
    if action == "touch":
        return touch_one(client, ledger, message)
    if action in ("nack", "bury"):
        return settle_one(client, ledger, message, action, text)
    return True


def touch_one(client: Client, ledger: Ledger, message: Message) -> bool:
    """Extend the lease (and then leave it be); False if the call was cut off."""
    try:
        deadline = client.touch(message, seconds=TOUCH_SECONDS)
    except LeaseLost:
        return True
    except CUT_OFF:
        ledger.touching(message, None)
        return False
    ledger.touching(message, deadline)
    return True


def settle_one(client: Client, ledger: Ledger, message: Message, action: str, text: str) -> bool:
    """Nack or bury one message; False if the call was cut off."""
    ledger.settling(message, action, text)
    try:
        if action == "nack":
            client.nack(message, error=text)
        else:
            client.bury(message, reason=text)
    except LeaseLost:
        ledger.settled(message, action, "lost")
        return True
    except CUT_OFF:
        ledger.settled(message, action, "unknown")
        return False
    ledger.settled(message, action, "done")
    return True


def ack_all(client: Client, ledger: Ledger, messages: list[Message], *, batched: bool) -> bool:
    """Ack in one batch or one by one; False if a call was cut off."""
    groups = [messages] if batched else [[message] for message in messages]
    for group in groups:
        failed: set[int] = set()
        try:
            client.ack(group)
        except LeaseLost as error:
            failed = set(error.details["failed"])
        except CUT_OFF:
            for message in group:  # later groups were never sent: still leased
                ledger.settled(message, "ack", "unknown")
            return False
        for message in group:
            ledger.settled(message, "ack", "lost" if message.id in failed else "done")
    return True


def run_round(
    broker: BrokerProcess,
    ledger: Ledger,
    rng: random.Random,
    kill_moment: Callable[[], None] | None = None,
) -> float:
    """Producers and consumers until a SIGKILL at a random moment (or when
    ``kill_moment`` returns); returns the kill's wall-clock time (after the process is
    gone)."""
    clients = [broker.client() for _ in range(PRODUCERS + CONSUMERS)]
    for client in clients:
        client.connect()
    # A setting changed in every round must survive too (result_ttl changes nothing else).
    ledger.settings = clients[0].configure(QUEUE, result_ttl=1000.0 + ledger.epoch)
    rngs = [random.Random(rng.randrange(2**32)) for _ in clients]
    with ThreadPoolExecutor(len(clients)) as pool:
        futures: list[Future[None]] = [
            pool.submit(produce, clients[i], ledger, rngs[i], f"p{i}") for i in range(PRODUCERS)
        ]
        futures += [
            pool.submit(consume, clients[i], ledger, rngs[i])
            for i in range(PRODUCERS, len(clients))
        ]
        if kill_moment is None:
            time.sleep(rng.uniform(*KILL_AFTER))  # the random moment of the crash
        else:
            kill_moment()
        broker.process.kill()
        broker.process.wait()
        killed_at = time.time()
        for future in futures:
            future.result(timeout=JOIN_TIMEOUT)  # re-raises a worker's failed check
    for client in clients:
        client.close()
    log = broker.log()
    assert "Traceback" not in log, f"the broker logged a traceback before the kill:\n{log[-4000:]}"
    return killed_at


# --------------------------------------------------------------------- checks


def check_after_restart(
    client: Client, ledger: Ledger, killed_at: float, *, history: bool = True
) -> None:
    """Everything the broker confirmed before the crash is as it was. ``history``: also
    check every delivery so far (``check_history``; the soak campaign does it at each
    settle instead, over a history that grows by hundreds of deliveries a round)."""
    settings = client.configure(QUEUE)  # no changes: reads them
    assert settings == ledger.settings, f"settings changed over the crash: {settings}"
    check_visible_messages(client, ledger)
    statuses = check_known_messages(client, ledger)
    check_due_times(ledger, statuses)
    check_leases_held_at_crash(client, ledger, killed_at)
    check_dead_letters(client, ledger)
    check_totals(client, ledger)
    if history:
        check_history(ledger)
    ready_before = client.peek(QUEUE, "ready", limit=1000)
    probe = ledger.plan_put(f"e{ledger.epoch}.probe".encode(), "ack")
    probe_ids = send_put(client, ledger, [probe])
    ledger.put_confirmed(probe_ids, [probe])  # its id is checked by check_history
    check_ready_order(client, ready_before, probe_ids[0])


def check_ready_order(client: Client, ready_before: list[dict[str, Any]], probe_id: int) -> None:
    """Recovery keeps the delivery order: by priority, and within one priority, messages
    never delivered yet in the order they were put; a put after the restart (``probe_id``,
    priority 0) goes behind every message of its priority that was ready before it."""
    items = client.peek(QUEUE, "ready", limit=1000)
    priorities = [item["priority"] for item in items]
    assert priorities == sorted(priorities, reverse=True), "ready messages out of priority order"
    for priority in set(priorities):
        fresh = [i["id"] for i in items if i["priority"] == priority and i["attempts"] == 0]
        assert fresh == sorted(fresh), f"priority {priority}: ready out of put order: {fresh}"
    if len(items) < 1000:
        order = [item["id"] for item in items]
        ahead = {item["id"] for item in ready_before if item["priority"] == 0}
        behind = set(order[order.index(probe_id) :])
        assert not ahead & behind, f"a put after the restart jumped ahead of {ahead & behind}"


def check_visible_messages(client: Client, ledger: Ledger) -> None:
    """Every message the broker shows is one we put, with its body, and none we acked."""
    for state in ("ready", "delayed", "reserved", "dead"):
        items = client.peek(QUEUE, state, limit=1000)
        for item in items:
            ledger.found(item["id"], item["body"], item["priority"], item["headers"])
            assert item["id"] not in ledger.acked, f"acked message {item['id']} is {state}"


def check_known_messages(client: Client, ledger: Ledger) -> dict[int, dict[str, Any]]:
    """Every message known to exist is still there unless acked; acked ones are gone."""
    statuses = {}
    for message_id in sorted(set(ledger.body_of) - ledger.gone):
        try:
            statuses[message_id] = client.status(message_id)
        except NotFound:
            gone_by_request = message_id in ledger.acked or message_id in ledger.cancelled
            assert gone_by_request or message_id in ledger.unknown_acks, (
                f"message {message_id} ({ledger.body_of[message_id]!r}) was lost: "
                "its put was confirmed and no ack of it was"
            )
            ledger.gone.add(message_id)
            continue
        assert message_id not in ledger.acked, (
            f"message {message_id} was acked (confirmed) but is back: {statuses[message_id]}"
        )
    return statuses


def check_due_times(ledger: Ledger, statuses: dict[int, dict[str, Any]]) -> None:
    """Delayed puts are still delayed, due exactly when they were before the crash."""
    for message_id, status in statuses.items():
        plan = ledger.plans[ledger.body_of[message_id]]
        if plan.kind != "delayed":
            continue
        assert status["state"] == "delayed", f"delayed put {message_id} is now {status}"
        assert status["due_at"] == status["enqueued_at"] + plan.delay, status
        before = ledger.due_at.setdefault(message_id, status["due_at"])
        assert status["due_at"] == before, f"message {message_id} was due at {before}: {status}"


def check_leases_held_at_crash(client: Client, ledger: Ledger, killed_at: float) -> None:
    """A lease live at the crash is still reserved until its deadline, then the message is
    back (ready, delayed by backoff, or dead if out of attempts) with the attempt counted."""
    held = [
        delivery
        for delivery in ledger.latest_deliveries().values()
        if delivery.epoch == ledger.epoch - 1 and delivery.id not in ledger.gone
    ]
    live = []
    for delivery in held:
        settle = ledger.settle_of(delivery)
        if settle is not None and settle.outcome != "unknown":
            continue
        status = status_or_none(client, delivery.id)
        if status is None:
            assert delivery.id in ledger.unknown_acks, f"leased message {delivery.id} vanished"
            continue
        if status["attempts"] == delivery.attempts - 1:
            check_forgotten(ledger, delivery, status)
            continue
        assert status["attempts"] >= delivery.attempts, (
            f"attempts went down over the crash: delivered {delivery}, now {status}"
        )
        lease = ledger.current_lease(delivery)  # None: a touch of it was cut off
        if settle is None and lease is not None and lease.lease_deadline > killed_at:
            check_still_leased(client, lease, status)
            live.append(lease)
            ledger.held_at_crash[lease.id] = lease
    if live:
        wait_until_broker_time(client, max(d.lease_deadline for d in live))
    for delivery in live:
        check_lease_ran_out(client.status(delivery.id), delivery)


def check_forgotten(ledger: Ledger, delivery: Delivery, status: dict[str, Any]) -> None:
    """The crash forgot ``delivery`` (its lease was never committed): the message is not
    under that lease, and nothing confirmed depended on the lease."""
    key = (delivery.id, delivery.token)
    assert ledger.touched.get(key) is None, (
        f"a touch of {delivery} was confirmed, so its lease was committed, yet the crash "
        f"forgot the delivery: {status}"
    )
    assert not (
        status["state"] == "reserved" and status["lease_deadline"] == delivery.lease_deadline
    ), f"a forgotten delivery still holds its lease: {delivery}, {status}"
    ledger.forgotten.add(key)


def check_still_leased(client: Client, delivery: Delivery, status: dict[str, Any]) -> None:
    if status["state"] == "reserved":
        assert status["lease_deadline"] == delivery.lease_deadline, (
            f"the lease held at the crash has another deadline now: {delivery}, {status}"
        )
        assert status["attempts"] == delivery.attempts, (
            f"attempts of a leased message changed over the crash: {delivery}, {status}"
        )
    else:
        broker_now = client.ping()
        assert broker_now >= delivery.lease_deadline, (
            f"message {delivery.id} left 'reserved' before its lease deadline: {delivery}, {status}"
        )


def check_lease_ran_out(status: dict[str, Any], delivery: Delivery) -> None:
    assert status["attempts"] == delivery.attempts, (
        f"the attempt of the lease held at the crash was not counted: {delivery}, {status}"
    )
    assert status["last_error"] == "lease expired", status
    if status["state"] == "dead":
        assert status["dead_reason"] == f"max_attempts ({status['max_attempts']}) used up"
    else:
        assert status["state"] in ("ready", "delayed"), status


def status_or_none(client: Client, message_id: int) -> dict[str, Any] | None:
    try:
        return client.status(message_id)
    except NotFound:
        return None


def wait_until_broker_time(client: Client, moment: float) -> None:
    """Block until the broker's clock passes ``moment``. The broker applies expiries due
    by a long-poll's deadline before it times the long-poll out, so the empty reply is the
    event: everything due by ``moment`` has happened."""
    wait = moment - client.ping() + 0.01
    if wait > 0:
        assert client.reserve(PACER, wait=wait) == [], "the pacer queue must stay empty"


def check_dead_letters(client: Client, ledger: Ledger) -> None:
    """Dead letters survive unchanged, with the reason and last error they died with."""
    items = {item["id"]: item for item in all_dead_letters(client)}
    for message_id, before in ledger.dead_seen.items():
        assert items.get(message_id) == before, f"dead letter changed over a crash: {before}"
    for message_id, item in items.items():
        check_dead_letter(ledger, message_id, item)
    for message_id in ledger.body_of:
        if message_id in ledger.gone:
            continue  # a dead letter purged since (the soak campaign purges them)
        if ledger.confirmed_text(message_id, "bury"):
            assert message_id in items, f"buried message {message_id} is not a dead letter"
        fragile = ledger.kind_of(ledger.body_of[message_id]) == "fragile"
        if fragile and ledger.confirmed_text(message_id, "nack"):
            assert message_id in items, f"nacked message {message_id} (max 1 attempt) is not dead"
            assert items[message_id]["last_error"] in ledger.nack_errors[message_id]
    ledger.dead_seen = items


def check_dead_letter(ledger: Ledger, message_id: int, item: dict[str, Any]) -> None:
    reasons = [f"max_attempts ({item['max_attempts']}) used up"]
    if message_id in ledger.bury_reasons:
        reasons.append(ledger.bury_reasons[message_id])
    confirmed_bury = ledger.confirmed_text(message_id, "bury")
    if confirmed_bury:
        reasons = confirmed_bury
    assert item["dead_reason"] in reasons, (item, reasons)
    errors = [None, "lease expired", *ledger.nack_errors.get(message_id, [])]
    assert item["last_error"] in errors, (item, errors)


def all_dead_letters(client: Client) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    after = None
    while True:
        page = client.dead_letters(QUEUE, limit=1000, after=after)
        items += page
        if len(page) < 1000:
            return items
        after = page[-1]["id"]


def check_totals(client: Client, ledger: Ledger) -> None:
    """The queue's put and acked totals survive: between what was confirmed and what may
    have happened."""
    totals = client.stats(QUEUE)["totals"]
    puts, maybe_puts = len(ledger.body_of), len(ledger.unknown_puts)
    assert puts <= totals["put"] <= puts + maybe_puts, (totals, puts, maybe_puts)
    acks, maybe_acks = len(ledger.acked), len(ledger.unknown_acks - set(ledger.acked))
    assert acks <= totals["acked"] <= acks + maybe_acks, (totals, acks, maybe_acks)


def check_history(ledger: Ledger) -> None:
    """Over every delivery so far: bodies as put, attempts rising, no delivery after a
    confirmed ack, no delayed put delivered early, and ids and tokens never reused."""
    assert ledger.collisions == [], ledger.collisions
    by_token = sorted(ledger.deliveries, key=lambda delivery: delivery.token)
    tokens = [delivery.token for delivery in by_token]
    assert len(tokens) == len(set(tokens)), "a lease token was handed out twice"
    previous: dict[int, Delivery] = {}
    for delivery in by_token:
        assert ledger.kind_of(delivery.body) != "delayed", f"delivered before due: {delivery}"
        earlier = previous.get(delivery.id)
        # A delivery the crash forgot did not count: the next one may have its attempt.
        forgot = earlier is not None and (earlier.id, earlier.token) in ledger.forgotten
        assert earlier is None or delivery.attempts > earlier.attempts - forgot, (
            f"attempts did not rise between deliveries: {earlier} then {delivery}"
        )
        acked_token = ledger.acked.get(delivery.id)
        assert acked_token is None or delivery.token <= acked_token, (
            f"message {delivery.id} was delivered again after its ack was confirmed: {delivery}"
        )
        previous[delivery.id] = delivery
    check_counters_rise(ledger, by_token)


def check_counters_rise(ledger: Ledger, by_token: list[Delivery]) -> None:
    """Every id put and every token handed out after a restart is above all seen before."""
    highest_id: dict[int, int] = defaultdict(int)
    for message_id, epoch in ledger.id_epoch.items():
        highest_id[epoch] = max(highest_id[epoch], message_id)
    highest_token: dict[int, int] = defaultdict(int)
    for delivery in by_token:
        highest_token[delivery.epoch] = max(highest_token[delivery.epoch], delivery.token)
        highest_id[delivery.epoch] = max(highest_id[delivery.epoch], delivery.id)
    ids_before, tokens_before = highest_before(highest_id), highest_before(highest_token)
    for message_id, epoch in ledger.id_epoch.items():
        before = ids_before[min(epoch, len(ids_before) - 1)]
        assert message_id > before, f"id {message_id} (epoch {epoch}) reuses ids up to {before}"
    for delivery in by_token:
        before = tokens_before[min(delivery.epoch, len(tokens_before) - 1)]
        assert delivery.token > before, f"token reused after a restart: {delivery}, {before}"


def highest_before(highest: dict[int, int]) -> list[int]:
    """``result[e]``: the highest of ``highest``'s values for the epochs before ``e`` (0 if
    none), for every epoch up to one past the last (later ones: the last entry)."""
    last = max(highest, default=-1)
    result, running = [], 0
    for epoch in range(last + 2):
        result.append(running)
        running = max(running, highest.get(epoch, 0))
    return result


# ----------------------------------------------------------------- final drain


def account_for_every_put(client: Client, ledger: Ledger) -> None:
    """After the drain: every put was acked, dead-lettered or cancelled (or its ack was cut
    off and it is gone), and every message leased at a crash was delivered again (or died)."""
    dead = {item["id"] for item in all_dead_letters(client)}
    for message_id in ledger.body_of:
        settled = message_id in ledger.acked or message_id in dead or message_id in ledger.purged
        cut_off_ack = message_id in ledger.unknown_acks and message_id in ledger.gone
        assert settled or message_id in ledger.cancelled or cut_off_ack, (
            f"message {message_id} ({ledger.body_of[message_id]!r}) is unaccounted for"
        )
    stats = client.stats(QUEUE)
    assert (stats["ready"], stats["delayed"], stats["reserved"]) == (0, 0, 0), stats
    assert stats["dead"] == len(dead), stats
    latest = ledger.latest_deliveries()
    for message_id, delivery in ledger.held_at_crash.items():
        later = latest[message_id].token > delivery.token
        assert later or message_id in dead or message_id in ledger.purged, (
            f"message {message_id}, leased at a crash, was never delivered again: {delivery}"
        )
    check_history(ledger)


def drain(client: Client, ledger: Ledger) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while True:
        messages = client.reserve(QUEUE, max_messages=100, wait=0.5)
        ledger.delivered(messages)
        if messages:
            ack_all(client, ledger, messages, batched=True)
            continue
        stats = client.stats(QUEUE)
        delayed = client.peek(QUEUE, "delayed", limit=1000)
        retries_pending = any(ledger.kind_of(item["body"]) != "delayed" for item in delayed)
        if stats["ready"] == stats["reserved"] == 0 and not retries_pending:
            return
        assert time.monotonic() < deadline, f"the queue did not drain: {stats}"


def cancel_delayed(client: Client, ledger: Ledger) -> None:
    """Cancel the delayed puts (never due during the test), checking their due times."""
    for item in client.peek(QUEUE, "delayed", limit=1000):
        assert item["due_at"] == ledger.due_at[item["id"]], item
        assert client.cancel(item["id"]) is True, item
        ledger.cancelled.add(item["id"])


# --------------------------------------------------------------------- the test


def crash_seed() -> int:
    text = os.environ.get("CRASH_TEST_SEED")
    return int(text) if text else random.SystemRandom().randrange(2**32)


# (fsync, background sync): "on" puts every sync of "always" on the kernel's worker,
# replies released when its completion is read, as a busy broker's are with "auto".
@pytest.mark.parametrize(
    ("fsync", "background"), [("always", "auto"), ("always", "on"), ("interval", "auto")]
)
def test_confirmed_work_survives_repeated_kill_9(
    fsync: str, background: str, tmp_path: Path, brokers: list[BrokerProcess]
) -> None:
    seed = crash_seed()
    ledger = Ledger()
    try:
        run_scenario(fsync, tmp_path, brokers, ledger, random.Random(seed), background)
    except AssertionError as error:
        raise AssertionError(
            f"{error}\n[fsync={fsync} background={background} seed={seed} after "
            f"{ledger.epoch} restarts; "
            f"replay the choices with CRASH_TEST_SEED={seed}]"
        ) from error


def run_scenario(
    fsync: str,
    tmp_path: Path,
    brokers: list[BrokerProcess],
    ledger: Ledger,
    rng: random.Random,
    background: str = "auto",
) -> None:
    data_dir = tmp_path / "data"
    flags = ("--data-dir", str(data_dir), "--fsync", fsync, "--background-sync", background)

    def start(epoch: int) -> BrokerProcess:
        log_path = tmp_path / f"broker-{epoch}.log"
        brokers.append(start_broker(log_path, *flags))
        return brokers[-1]

    broker = start(0)
    with broker.client() as client:
        ledger.settings = client.configure(QUEUE, **SETTINGS)
    for _ in range(ROUNDS):
        killed_at = run_round(broker, ledger, rng)
        broker = restart_and_check(start, ledger, killed_at)
    with broker.client() as client:
        drain(client, ledger)
        cancel_delayed(client, ledger)
        account_for_every_put(client, ledger)
        ledger.settings = client.configure(QUEUE, result_ttl=999.0)  # the last change
    # Once more while idle: with every message acked, only the stored counters know which
    # ids and tokens were used. The probe put by the checks is then delivered and acked.
    broker.process.kill()
    broker.process.wait()
    broker = restart_and_check(start, ledger, time.time())
    with broker.client() as client:
        drain(client, ledger)
        account_for_every_put(client, ledger)
    stop_broker(broker)
    assert ledger.held_at_crash and ledger.dead_seen, "no lease was held at a crash, no dead letter"


def restart_and_check(
    start: Callable[[int], BrokerProcess],
    ledger: Ledger,
    killed_at: float,
    *,
    history: bool = True,
) -> BrokerProcess:
    ledger.epoch += 1
    broker = start(ledger.epoch)
    assert "recovered" in broker.log(), broker.log()
    with broker.client() as client:
        check_after_restart(client, ledger, killed_at, history=history)
    return broker
