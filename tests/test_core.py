"""Unit tests of the pure queue core (``broker.Core``) with a fake clock.

Time is a plain float that each test advances itself; nothing here sleeps or reads a real
clock. ``random=lambda: 0.5`` makes backoff jitter have no effect (factor exactly 1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from broker import TRANSITIONS, Core, Event, IllegalTransition, PutSpec, State
from broker._args import put_spec
from broker._lazyheap import _COMPACT_MIN, LazyHeap
from broker._lifecycle import advance_state
from broker._message import plain_spec
from broker._ready import COMPACT_MIN as READY_COMPACT_MIN
from protocol import BadRequest, LeaseLost, NotFound, TooLarge

T0 = 1_000.0
EPS = 1e-6
DEFAULT_DEAD_TTL = 7 * 24 * 3600.0


def make_core(random: float = 0.5) -> Core:
    return Core(random=lambda: random)


def put(core: Core, now: float, queue: str = "q", body: bytes = b"x", **fields: Any) -> int:
    return core.put(now, queue, [PutSpec(body=body, **fields)])[0]


def reserve_ids(core: Core, now: float, queues: tuple[str, ...] = ("q",), n: int = 10) -> list[int]:
    return [message.id for message in core.reserve(now, list(queues), n)]


def lease(core: Core, now: float, queue: str = "q", **options: Any) -> tuple[int, int]:
    """Reserve exactly one message and return its delivery ``(id, lease token)``."""
    (message,) = core.reserve(now, [queue], 1, **options)
    assert message.lease_token is not None
    return message.id, message.lease_token


def state(core: Core, now: float, message_id: int) -> str:
    return str(core.status(now, message_id)["state"])


def completions(core: Core) -> list[tuple[Any, list[int]]]:
    return [(key, [m.id for m in messages]) for key, messages in core.take_completions()]


def live_entries(heap: LazyHeap) -> int:
    return sum(1 for entry in heap._entries if heap._is_live(entry))


def snapshot(core: Core, now: float) -> dict[str, Any]:
    """Everything observable about the core at ``now`` (ticks to ``now`` first)."""
    core.tick(now)
    return {
        "queues": core.list_queues(now),
        "stats": {name: core.stats(now, name) for name in core.queues},
        "status": {mid: core.status(now, mid) for mid in sorted(core.messages)},
        "dead": {
            name: [m.status() for m in core.dead_letters(now, name, 10_000)] for name in core.queues
        },
        "next_deadline": core.next_deadline(),
    }


# ------------------------------------------------------------------ ordering


def test_a_body_only_put_spec_is_the_named_tuple_with_its_defaults() -> None:
    """``plain_spec`` builds the tuple without ``PutSpec``'s own ``__new__``: it must be
    ``PutSpec(body=...)`` field for field (a field added, dropped or moved breaks this)."""
    for spec in (plain_spec(b"x"), put_spec({"body": b"x"}, 0)):
        assert type(spec) is PutSpec
        assert spec._asdict() == PutSpec(body=b"x")._asdict()
        assert spec == PutSpec(body=b"x")


def test_higher_priority_first_then_fifo_among_equals() -> None:
    core = make_core()
    low1 = put(core, T0, priority=0)
    high1 = put(core, T0, priority=5)
    low2 = put(core, T0, priority=0)
    high2 = put(core, T0, priority=5)
    negative = put(core, T0, priority=-3)
    top = put(core, T0, priority=2**31 - 1)
    bottom = put(core, T0, priority=-(2**31))
    assert reserve_ids(core, T0, n=10) == [top, high1, high2, low1, low2, negative, bottom]


def test_one_at_a_time_reserve_follows_the_same_order_and_batch_put_keeps_order() -> None:
    core = make_core()
    batch = core.put(T0, "q", [PutSpec(body=b"a"), PutSpec(body=b"b"), PutSpec(body=b"c")])
    urgent = put(core, T0, priority=1)
    got = [reserve_ids(core, T0, n=1) for _ in range(5)]
    assert got == [[urgent], [batch[0]], [batch[1]], [batch[2]], []]


def test_equal_priority_order_is_when_it_became_ready_not_its_id() -> None:
    core = make_core()
    retried = put(core, T0)
    retried_lease = lease(core, T0)
    early_id_late_ready = put(core, T0, delay=5.0)  # ready at T0+5
    late_id_early_ready = put(core, T0 + 1)  # ready at T0+1
    core.nack(T0 + 3, [retried_lease], delay=0)  # ready again at T0+3
    assert retried < early_id_late_ready < late_id_early_ready
    assert reserve_ids(core, T0 + 10) == [late_id_early_ready, retried, early_id_late_ready]


# ------------------------------------------------------------------- delays


def test_delayed_message_becomes_ready_exactly_at_its_due_time() -> None:
    core = make_core()
    mid = put(core, T0, delay=10.0)
    due = T0 + 10.0
    assert core.status(T0, mid)["state"] == "delayed"
    assert core.status(T0, mid)["due_at"] == due
    assert core.next_deadline() == due
    assert reserve_ids(core, due - EPS) == []
    assert core.stats(due - EPS, "q")["delayed"] == 1
    core.tick(due)
    assert core.status(due, mid)["state"] == "ready"
    assert core.status(due, mid)["due_at"] is None
    assert reserve_ids(core, due) == [mid]


def test_put_with_zero_delay_is_ready_at_once() -> None:
    core = make_core()
    mid = put(core, T0, delay=0.0)
    assert core.next_deadline() is None
    assert reserve_ids(core, T0) == [mid]


# ------------------------------------------------------------------- leases


def test_lease_expiry_redelivers_with_attempts_counted() -> None:
    core = make_core()
    core.configure(T0, "q", {"visibility_timeout": 5.0})
    mid = put(core, T0)
    (message,) = core.reserve(T0, ["q"], 1)
    first_token = message.lease_token
    assert (message.attempts, message.lease_deadline) == (1, T0 + 5.0)
    assert core.next_deadline() == T0 + 5.0

    core.tick(T0 + 5.0 - EPS)
    assert state(core, T0 + 5.0 - EPS, mid) == "reserved"
    assert core.stats(T0 + 5.0 - EPS, "q")["totals"]["expired"] == 0

    core.tick(T0 + 5.0)
    status = core.status(T0 + 5.0, mid)
    # Expiry is a nack without delay: backoff for attempt 1 is 1 s from the lease deadline.
    assert status["state"] == "delayed"
    assert status["due_at"] == T0 + 6.0
    assert status["last_error"] == "lease expired"
    assert status["lease_deadline"] is None
    totals = core.stats(T0 + 5.0, "q")["totals"]
    assert (totals["expired"], totals["nacked"], totals["delivered"]) == (1, 0, 1)

    assert reserve_ids(core, T0 + 6.0 - EPS) == []
    (again,) = core.reserve(T0 + 6.0, ["q"], 1)
    assert (again.id, again.attempts) == (mid, 2)
    assert again.lease_token not in (None, first_token)


def test_expiry_is_applied_at_the_lease_deadline_even_when_ticked_late() -> None:
    core = make_core()
    core.configure(T0, "q", {"visibility_timeout": 5.0, "max_attempts": 2})
    mid = put(core, T0)
    lease(core, T0)
    # Deadline T0+5, backoff 1 s -> due T0+6; a tick at T0+6 sees it ready.
    assert reserve_ids(core, T0 + 6.0) == [mid]
    # Second lease: deadline T0+11, attempts used up -> dead as of T0+11.
    core.tick(T0 + 500.0)
    status = core.status(T0 + 500.0, mid)
    assert status["state"] == "dead"
    assert status["dead_at"] == T0 + 11.0
    assert status["attempts"] == 2
    assert core.stats(T0 + 500.0, "q")["totals"]["expired"] == 2


def test_expiry_with_zero_backoff_is_ready_at_the_deadline() -> None:
    core = make_core()
    core.configure(T0, "q", {"visibility_timeout": 4.0, "backoff": {"type": "fixed", "delay": 0}})
    mid = put(core, T0)
    lease(core, T0)
    assert reserve_ids(core, T0 + 4.0 - EPS) == []
    assert state(core, T0 + 4.0, mid) == "ready"


# --------------------------------------------------------------- nack, backoff


def test_nack_with_explicit_delay() -> None:
    core = make_core()
    mid = put(core, T0)
    core.nack(T0, [lease(core, T0)], delay=7.0)
    status = core.status(T0, mid)
    assert (status["state"], status["due_at"], status["attempts"]) == ("delayed", T0 + 7.0, 1)
    assert reserve_ids(core, T0 + 7.0 - EPS) == []
    core.nack(T0 + 7.0, [lease(core, T0 + 7.0)], delay=0)
    assert state(core, T0 + 7.0, mid) == "ready"
    assert core.stats(T0 + 7.0, "q")["totals"]["nacked"] == 2
    (message,) = core.reserve(T0 + 7.0, ["q"], 1)
    assert message.attempts == 3


def test_nack_uses_exponential_backoff_doubling_from_one_second() -> None:
    core = make_core()
    core.configure(T0, "q", {"max_attempts": None})
    mid = put(core, T0)
    now = T0
    for attempt in range(1, 7):
        (message,) = core.reserve(now, ["q"], 1)
        assert message.attempts == attempt
        core.nack(now, [(mid, message.lease_token)])
        expected_due = now + 2.0 ** (attempt - 1)
        assert core.status(now, mid)["due_at"] == expected_due
        assert reserve_ids(core, expected_due - EPS) == []
        now = expected_due


def test_exponential_backoff_is_capped() -> None:
    core = make_core()
    core.configure(T0, "q", {"max_attempts": None, "backoff": {"type": "exponential", "cap": 3.0}})
    mid = put(core, T0)
    now, delays = T0, []
    for _ in range(5):
        core.nack(now, [lease(core, now)])
        due = core.status(now, mid)["due_at"]
        delays.append(due - now)
        now = due
    assert delays == [1.0, 2.0, 3.0, 3.0, 3.0]


@pytest.mark.parametrize(("draw", "expected"), [(0.0, 0.9), (0.75, 1.05), (0.5, 1.0)])
def test_backoff_jitter_is_ten_percent_either_way(draw: float, expected: float) -> None:
    core = make_core(random=draw)
    mid = put(core, T0)
    core.nack(T0, [lease(core, T0)])
    assert core.status(T0, mid)["due_at"] - T0 == pytest.approx(expected)


def test_nack_uses_fixed_backoff_when_configured() -> None:
    core = make_core()
    settings = core.configure(
        T0, "q", {"max_attempts": None, "backoff": {"type": "fixed", "delay": 3.0}}
    )
    assert settings["backoff"]["type"] == "fixed"
    mid = put(core, T0)
    now = T0
    for attempt in range(1, 5):
        (message,) = core.reserve(now, ["q"], 1)
        assert message.attempts == attempt
        core.nack(now, [(mid, message.lease_token)])
        assert core.status(now, mid)["due_at"] == now + 3.0
        now += 3.0


# --------------------------------------------------------------- dead letters


def test_used_up_attempts_dead_letter_with_reason_and_last_error() -> None:
    core = make_core()
    core.configure(T0, "q", {"max_attempts": 2})
    mid = put(core, T0)
    core.nack(T0, [lease(core, T0)], delay=0, error="first failure")
    assert state(core, T0, mid) == "ready"
    core.nack(T0 + 1, [lease(core, T0 + 1)], delay=0, error="boom")
    status = core.status(T0 + 1, mid)
    assert status["state"] == "dead"
    assert "max_attempts" in status["dead_reason"]
    assert status["last_error"] == "boom"
    assert (status["attempts"], status["dead_at"]) == (2, T0 + 1)
    stats = core.stats(T0 + 1, "q")
    assert (stats["ready"], stats["delayed"], stats["dead"]) == (0, 0, 1)
    assert stats["totals"]["dead_lettered"] == 1
    assert [m.id for m in core.dead_letters(T0 + 1, "q", 10)] == [mid]
    assert reserve_ids(core, T0 + 100) == []


def test_per_message_max_attempts_overrides_the_queue() -> None:
    core = make_core()
    mid = put(core, T0, max_attempts=1)
    core.nack(T0, [lease(core, T0)], delay=0)
    status = core.status(T0, mid)
    assert status["state"] == "dead"
    assert "max_attempts (1)" in status["dead_reason"]


def test_expiry_that_uses_up_attempts_dead_letters_with_lease_expired_error() -> None:
    core = make_core()
    core.configure(T0, "q", {"max_attempts": 1, "visibility_timeout": 5.0})
    mid = put(core, T0)
    lease(core, T0)
    core.tick(T0 + 5.0)
    status = core.status(T0 + 5.0, mid)
    assert status["state"] == "dead"
    assert status["last_error"] == "lease expired"
    assert "max_attempts" in status["dead_reason"]
    assert status["dead_at"] == T0 + 5.0
    totals = core.stats(T0 + 5.0, "q")["totals"]
    assert (totals["expired"], totals["dead_lettered"]) == (1, 1)


def test_bury_dead_letters_at_once_with_the_reason() -> None:
    core = make_core()
    mid = put(core, T0)
    delivery = lease(core, T0)
    core.bury(T0 + 2, *delivery, "bad payload")
    status = core.status(T0 + 2, mid)
    assert (status["state"], status["dead_reason"], status["dead_at"]) == (
        "dead",
        "bad payload",
        T0 + 2,
    )
    assert status["attempts"] == 1  # far below max_attempts: bury does not wait
    assert status["lease_deadline"] is None
    assert core.stats(T0 + 2, "q")["totals"]["dead_lettered"] == 1
    assert core.next_deadline() == T0 + 2 + DEFAULT_DEAD_TTL
    with pytest.raises(LeaseLost):
        core.ack(T0 + 2, [delivery])


def test_dead_letters_paging() -> None:
    core = make_core()
    ids = core.put(T0, "q", [PutSpec(body=b"x") for _ in range(5)])
    for message in core.reserve(T0, ["q"], 5)[::-1]:
        core.bury(T0, message.id, message.lease_token, "r")
    assert [m.id for m in core.dead_letters(T0, "q", 2)] == ids[:2]
    assert [m.id for m in core.dead_letters(T0, "q", 2, after=ids[1])] == ids[2:4]
    assert [m.id for m in core.dead_letters(T0, "q", 2, after=ids[3])] == ids[4:]
    assert core.dead_letters(T0, "q", 2, after=ids[4]) == []
    assert [m.id for m in core.dead_letters(T0, "q", 100)] == ids
    with pytest.raises(NotFound):
        core.dead_letters(T0, "nope", 10)


def test_dead_letter_ttl_expires_dead_letters_via_tick() -> None:
    core = make_core()
    core.configure(T0, "q", {"dead_letter_ttl": 60.0})
    mid = put(core, T0)
    core.bury(T0 + 10, *lease(core, T0), "r")
    assert core.next_deadline() == T0 + 70.0
    core.tick(T0 + 70.0 - EPS)
    assert core.stats(T0 + 70.0 - EPS, "q")["dead"] == 1
    core.tick(T0 + 70.0)
    assert core.stats(T0 + 70.0, "q")["dead"] == 0
    assert core.dead_letters(T0 + 70.0, "q", 10) == []
    assert core.next_deadline() is None
    with pytest.raises(NotFound):
        core.status(T0 + 70.0, mid)


def test_dead_letters_without_ttl_are_kept() -> None:
    core = make_core()
    core.configure(T0, "q", {"dead_letter_ttl": None})
    mid = put(core, T0)
    core.bury(T0, *lease(core, T0), "r")
    assert core.next_deadline() is None
    core.tick(T0 + 10 * DEFAULT_DEAD_TTL)
    assert state(core, T0 + 10 * DEFAULT_DEAD_TTL, mid) == "dead"


def test_replay_resets_attempts_and_makes_ready() -> None:
    core = make_core()
    core.configure(T0, "q", {"max_attempts": 2})
    mid = put(core, T0)
    core.nack(T0, [lease(core, T0)], delay=0)
    core.nack(T0, [lease(core, T0)], delay=0, error="boom")
    assert core.status(T0, mid)["attempts"] == 2
    assert core.replay(T0 + 1, "q") == 1
    status = core.status(T0 + 1, mid)
    assert (status["state"], status["attempts"]) == ("ready", 0)
    assert (status["dead_reason"], status["dead_at"]) == (None, None)
    stats = core.stats(T0 + 1, "q")
    assert (stats["ready"], stats["dead"]) == (1, 0)
    (message,) = core.reserve(T0 + 1, ["q"], 1)
    assert message.attempts == 1
    # Attempts really were reset: one more failure is a retry, not a dead letter.
    core.nack(T0 + 1, [(mid, message.lease_token)], delay=0)
    assert state(core, T0 + 1, mid) == "ready"


def test_replay_chosen_ids_in_id_order() -> None:
    core = make_core()
    ids = core.put(T0, "q", [PutSpec(body=b"x") for _ in range(3)])
    for message in core.reserve(T0, ["q"], 3)[::-1]:
        core.bury(T0, message.id, message.lease_token, "r")
    assert core.replay(T0, "q", [ids[2], ids[0], 123_456]) == 2
    assert state(core, T0, ids[1]) == "dead"
    assert reserve_ids(core, T0) == [ids[0], ids[2]]
    assert core.replay(T0, "q", [ids[0]]) == 0  # reserved now, not dead
    with pytest.raises(NotFound):
        core.replay(T0, "nope")


def test_purge_removes_ready_and_delayed_only() -> None:
    core = make_core()
    reserved = put(core, T0)
    delivery = lease(core, T0)
    dead = put(core, T0)
    core.bury(T0, *lease(core, T0), "r")
    ready = [put(core, T0), put(core, T0)]
    delayed = [put(core, T0, delay=50.0), put(core, T0, delay=60.0)]
    other = put(core, T0, queue="other", delay=40.0)
    assert core.purge(T0, "q") == 4
    for mid in ready + delayed:
        with pytest.raises(NotFound):
            core.status(T0, mid)
    stats = core.stats(T0, "q")
    assert (stats["ready"], stats["delayed"], stats["reserved"], stats["dead"]) == (0, 0, 1, 1)
    assert state(core, T0, reserved) == "reserved"
    assert state(core, T0, dead) == "dead"
    assert state(core, T0, other) == "delayed"
    assert core.next_deadline() == T0 + 30.0  # the lease; the purged delays are gone
    assert core.purge(T0, "q") == 0
    core.ack(T0, [delivery])


def test_purge_dead() -> None:
    core = make_core()
    ids = core.put(T0, "q", [PutSpec(body=b"x") for _ in range(3)])
    kept = put(core, T0, priority=-1)
    for message in core.reserve(T0, ["q"], 3):
        core.bury(T0, message.id, message.lease_token, "r")
    assert core.purge_dead(T0, "q") == 3
    assert core.stats(T0, "q")["dead"] == 0
    assert core.dead_letters(T0, "q", 10) == []
    for mid in ids:
        with pytest.raises(NotFound):
            core.status(T0, mid)
    assert state(core, T0, kept) == "ready"
    assert core.next_deadline() is None
    assert core.purge_dead(T0, "q") == 0


# -------------------------------------------------------------- lease checks


def test_stale_lease_fails_and_changes_nothing() -> None:
    core = make_core()
    core.configure(T0, "q", {"visibility_timeout": 5.0, "backoff": {"type": "fixed", "delay": 0}})
    mid = put(core, T0, priority=1)
    put(core, T0, delay=3.0)
    stale = lease(core, T0)
    core.tick(T0 + 5.0)  # expires: ready again
    current = lease(core, T0 + 6.0)
    assert current[0] == mid and current[1] != stale[1]
    before = snapshot(core, T0 + 7.0)

    attempts = [
        lambda: core.ack(T0 + 7.0, [stale]),
        lambda: core.nack(T0 + 7.0, [stale], delay=0),
        lambda: core.nack(T0 + 7.0, [stale]),
        lambda: core.touch(T0 + 7.0, *stale),
        lambda: core.touch(T0 + 7.0, *stale, seconds=100.0),
        lambda: core.bury(T0 + 7.0, *stale, "nope"),
        lambda: core.ack(T0 + 7.0, [(999_999, current[1])]),
        lambda: core.touch(T0 + 7.0, 999_999, current[1]),
    ]
    for attempt in attempts:
        with pytest.raises(LeaseLost) as failure:
            attempt()
        assert failure.value.details["done"] == 0
        assert snapshot(core, T0 + 7.0) == before

    assert core.ack(T0 + 7.0, [current]) == 1
    with pytest.raises(LeaseLost) as failure:
        core.ack(T0 + 7.0, [current])
    assert failure.value.details == {"failed": [mid], "done": 0}


def test_lease_of_a_delayed_or_dead_message_is_not_current() -> None:
    core = make_core()
    delayed = put(core, T0)
    delayed_lease = lease(core, T0)
    core.nack(T0, [delayed_lease], delay=10.0)
    dead = put(core, T0)
    dead_lease = lease(core, T0)
    core.bury(T0, *dead_lease, "r")
    before = snapshot(core, T0)
    for delivery in (delayed_lease, dead_lease):
        with pytest.raises(LeaseLost):
            core.touch(T0, *delivery)
        with pytest.raises(LeaseLost):
            core.bury(T0, *delivery, "again")
    assert snapshot(core, T0) == before
    assert (state(core, T0, delayed), state(core, T0, dead)) == ("delayed", "dead")


def test_batch_ack_with_one_bad_lease_acks_the_others_then_raises() -> None:
    core = make_core()
    a, b, c = core.put(T0, "q", [PutSpec(body=b"x") for _ in range(3)])
    tokens = {m.id: m.lease_token for m in core.reserve(T0, ["q"], 3)}
    with pytest.raises(LeaseLost) as failure:
        core.ack(T0, [(a, tokens[a]), (b, tokens[b] + 1000), (c, tokens[c])])
    assert failure.value.details == {"failed": [b], "done": 2}
    for gone in (a, c):
        with pytest.raises(NotFound):
            core.status(T0, gone)
    assert state(core, T0, b) == "reserved"
    stats = core.stats(T0, "q")
    assert (stats["reserved"], stats["totals"]["acked"]) == (1, 2)
    assert core.ack(T0, [(b, tokens[b])]) == 1


def test_batch_nack_with_one_bad_lease_nacks_the_others_then_raises() -> None:
    core = make_core()
    a, b, c = core.put(T0, "q", [PutSpec(body=b"x") for _ in range(3)])
    tokens = {m.id: m.lease_token for m in core.reserve(T0, ["q"], 3)}
    with pytest.raises(LeaseLost) as failure:
        core.nack(T0, [(a, tokens[a]), (b, tokens[b] + 1000), (c, tokens[c])], delay=0)
    assert failure.value.details == {"failed": [b], "done": 2}
    assert [state(core, T0, mid) for mid in (a, b, c)] == ["ready", "reserved", "ready"]
    assert core.stats(T0, "q")["totals"]["nacked"] == 2


# -------------------------------------------------------------------- touch


def test_touch_extends_by_the_leases_own_visibility_timeout() -> None:
    core = make_core()
    mid = put(core, T0)
    delivery = lease(core, T0, visibility_timeout=10.0)  # the queue's default is 30
    assert core.touch(T0 + 8.0, *delivery) == T0 + 18.0
    assert core.status(T0 + 8.0, mid)["lease_deadline"] == T0 + 18.0
    assert core.next_deadline() == T0 + 18.0
    core.tick(T0 + 10.0)  # the old deadline passes harmlessly
    assert state(core, T0 + 10.0, mid) == "reserved"
    assert core.stats(T0 + 10.0, "q")["totals"]["expired"] == 0
    core.tick(T0 + 18.0 - EPS)
    assert state(core, T0 + 18.0 - EPS, mid) == "reserved"
    core.tick(T0 + 18.0)
    assert core.stats(T0 + 18.0, "q")["totals"]["expired"] == 1
    assert state(core, T0 + 18.0, mid) == "delayed"


def test_touch_with_seconds_and_the_lease_stays_usable() -> None:
    core = make_core()
    mid = put(core, T0)
    delivery = lease(core, T0)
    assert core.touch(T0 + 20.0, *delivery, seconds=45.0) == T0 + 65.0
    core.tick(T0 + 64.0)
    assert core.status(T0 + 64.0, mid)["lease_deadline"] == T0 + 65.0
    assert core.ack(T0 + 64.0, [delivery]) == 1
    with pytest.raises(NotFound):
        core.status(T0 + 64.0, mid)


# ------------------------------------------------------------------- cancel


def test_cancel_ready_and_delayed() -> None:
    core = make_core()
    ready = put(core, T0)
    delayed = put(core, T0, delay=5.0)
    assert core.cancel(T0, ready) is True
    assert core.cancel(T0, delayed) is True
    for mid in (ready, delayed):
        with pytest.raises(NotFound):
            core.status(T0, mid)
    assert "q" not in core.queues  # nothing left in it: forgotten
    assert core.next_deadline() is None
    assert reserve_ids(core, T0 + 10.0) == []
    assert core.cancel(T0, ready) is False  # already gone


def test_cancel_refuses_reserved_dead_and_unknown() -> None:
    core = make_core()
    reserved = put(core, T0)
    delivery = lease(core, T0)
    dead = put(core, T0)
    core.bury(T0, *lease(core, T0), "r")
    before = snapshot(core, T0)
    assert core.cancel(T0, reserved) is False
    assert core.cancel(T0, dead) is False
    assert core.cancel(T0, 987_654) is False
    assert snapshot(core, T0) == before
    assert core.ack(T0, [delivery]) == 1


# ------------------------------------------------------------------- paused


def test_paused_queue_accepts_puts_and_delivers_nothing_until_resumed() -> None:
    core = make_core()
    core.configure(T0, "q", {"paused": True})
    mid = put(core, T0, priority=9)
    late = put(core, T0, delay=2.0)
    other = put(core, T0, queue="other", priority=-9)
    assert core.stats(T0, "q")["ready"] == 1
    assert reserve_ids(core, T0 + 5.0) == []
    assert core.stats(T0 + 5.0, "q")["ready"] == 2  # the delayed one came due, undelivered
    assert reserve_ids(core, T0 + 5.0, ("q", "other")) == [other]
    assert core.reserve(T0 + 5.0, ["q"], 1, wait=10.0, waiter_key="w") == []
    assert completions(core) == []

    core.configure(T0 + 6.0, "q", {"paused": False})
    assert completions(core) == [("w", [mid])]
    assert reserve_ids(core, T0 + 6.0) == [late]


# ---------------------------------------------------------------- multi-queue


def test_multi_queue_reserve_takes_the_best_across_queues() -> None:
    core = make_core()
    a_first = put(core, T0, queue="a", priority=1)
    b_second = put(core, T0 + 1, queue="b", priority=1)
    b_high = put(core, T0 + 2, queue="b", priority=5)
    a_low = put(core, T0 + 3, queue="a", priority=0)
    a_third = put(core, T0 + 4, queue="a", priority=1)
    got = reserve_ids(core, T0 + 5, ("a", "b"), n=10)
    assert got == [b_high, a_first, b_second, a_third, a_low]


def test_multi_queue_tie_goes_to_the_one_that_became_ready_first() -> None:
    core = make_core()
    in_b = put(core, T0, queue="b", delay=5.0)  # lower id, ready at T0+5
    in_a = put(core, T0 + 3, queue="a")  # ready at T0+3
    core.tick(T0 + 10)
    assert reserve_ids(core, T0 + 10, ("b", "a", "b"), n=1) == [in_a]
    assert reserve_ids(core, T0 + 10, ("b", "a"), n=1) == [in_b]


# ----------------------------------------------------------------- long-poll


def test_waiters_are_served_first_come_first_served() -> None:
    core = make_core()
    assert core.reserve(T0, ["q"], 1, wait=10.0, waiter_key="w1") == []
    assert core.reserve(T0 + 1, ["q"], 1, wait=10.0, waiter_key="w2") == []
    assert core.reserve(T0 + 2, ["other", "q"], 2, wait=10.0, waiter_key="w3") == []
    assert completions(core) == []
    assert core.stats(T0 + 2, "q")["waiting"] == 3
    m1, m2 = core.put(T0 + 3, "q", [PutSpec(body=b"1"), PutSpec(body=b"2")])
    assert completions(core) == [("w1", [m1]), ("w2", [m2])]
    assert completions(core) == []  # taken once
    assert core.status(T0 + 3, m1)["state"] == "reserved"
    assert core.status(T0 + 3, m1)["lease_deadline"] == T0 + 33.0
    assert core.stats(T0 + 3, "q")["waiting"] == 1
    m3, m4 = core.put(T0 + 4, "q", [PutSpec(body=b"3"), PutSpec(body=b"4", priority=1)])
    assert completions(core) == [("w3", [m4, m3])]
    assert "other" not in core.queues  # its last waiter left: forgotten


def test_waiter_times_out_with_nothing_exactly_at_its_deadline() -> None:
    core = make_core()
    assert core.reserve(T0, ["q"], 1, wait=2.5, waiter_key="w") == []
    assert core.next_deadline() == T0 + 2.5
    core.tick(T0 + 2.5 - EPS)
    assert completions(core) == []
    core.tick(T0 + 2.5)
    assert completions(core) == [("w", [])]
    assert "q" not in core.queues  # its only waiter left: forgotten
    assert core.next_deadline() is None
    put(core, T0 + 3)
    assert completions(core) == []


def test_reserve_with_wait_returns_at_once_when_something_is_ready() -> None:
    core = make_core()
    mid = put(core, T0)
    got = core.reserve(T0, ["q"], 5, wait=10.0, waiter_key="w")
    assert [m.id for m in got] == [mid]
    assert core.stats(T0, "q")["waiting"] == 0
    assert core.next_deadline() == T0 + 30.0  # the lease, no waiter deadline


def test_message_coming_due_during_a_late_tick_goes_to_the_waiter() -> None:
    core = make_core()
    mid = put(core, T0, delay=5.0)
    assert core.reserve(T0, ["q"], 1, wait=10.0, waiter_key="w") == []
    core.tick(T0 + 30.0)  # due at T0+5, before the waiter's deadline at T0+10
    assert completions(core) == [("w", [mid])]
    status = core.status(T0 + 30.0, mid)
    assert status["state"] == "reserved"
    assert status["lease_deadline"] > T0 + 30.0  # never handed over already expired


def test_lease_expiring_during_a_late_tick_goes_to_the_waiter_with_a_fresh_lease() -> None:
    core = make_core()
    core.configure(T0, "q", {"visibility_timeout": 5.0, "backoff": {"type": "fixed", "delay": 0}})
    mid = put(core, T0)
    first = lease(core, T0)
    assert core.reserve(T0, ["q"], 1, wait=10.0, waiter_key="w") == []
    core.tick(T0 + 8.0)  # the lease ran out at T0+5, before the waiter's deadline
    assert completions(core) == [("w", [mid])]
    status = core.status(T0 + 8.0, mid)
    assert (status["state"], status["attempts"]) == ("reserved", 2)
    assert status["lease_deadline"] == T0 + 8.0 + 5.0  # leased when handed over
    with pytest.raises(LeaseLost):
        core.ack(T0 + 8.0, [first])


def test_message_due_at_the_waiters_deadline_goes_to_the_waiter() -> None:
    core = make_core()
    mid = put(core, T0, delay=10.0)
    assert core.reserve(T0, ["q"], 1, wait=10.0, waiter_key="w") == []
    core.tick(T0 + 10.0)
    assert completions(core) == [("w", [mid])]


def becomes_ready_by(way: str, core: Core) -> tuple[Callable[[], Any], int | None]:
    """Set up one message that ``way`` will make ready; return the action and its id
    (None for a put, whose id the action returns)."""
    core.configure(T0, "q", {"visibility_timeout": 5.0, "backoff": {"type": "fixed", "delay": 0}})
    if way == "put":
        return (lambda: put(core, T0 + 1)), None
    if way == "due":
        return (lambda: core.tick(T0 + 2.0)), put(core, T0, delay=2.0)
    if way == "resume":
        core.configure(T0, "q", {"paused": True})
        return (lambda: core.configure(T0 + 1, "q", {"paused": False})), put(core, T0)
    mid = put(core, T0)
    delivery = lease(core, T0)
    if way == "nack":
        return (lambda: core.nack(T0 + 1, [delivery], delay=0)), mid
    if way == "expiry":
        return (lambda: core.tick(T0 + 5.0)), mid
    assert way == "replay"
    core.bury(T0, *delivery, "r")
    return (lambda: core.replay(T0 + 1, "q")), mid


@pytest.mark.parametrize("way", ["put", "due", "nack", "expiry", "replay", "resume"])
def test_every_way_of_becoming_ready_serves_a_waiter(way: str) -> None:
    core = make_core()
    make_ready, mid = becomes_ready_by(way, core)
    assert core.reserve(T0, ["q"], 1, wait=100.0, waiter_key="w") == []
    result = make_ready()
    mid = result if mid is None else mid
    assert completions(core) == [("w", [mid])]
    assert core.status(T0 + 5.0, mid)["state"] == "reserved"
    assert core.stats(T0 + 5.0, "q")["waiting"] == 0


def test_cancel_wait_removes_the_waiter() -> None:
    core = make_core()
    assert core.reserve(T0, ["q", "r"], 1, wait=10.0, waiter_key="w") == []
    core.cancel_wait("w")
    core.cancel_wait("w")  # no-op when not waiting
    core.cancel_wait("never")
    assert "q" not in core.queues and "r" not in core.queues  # unused, forgotten
    assert core.next_deadline() is None
    mid = put(core, T0 + 1)
    core.tick(T0 + 20.0)
    assert completions(core) == []
    assert state(core, T0 + 20.0, mid) == "ready"
    assert core.reserve(T0 + 20.0, ["r"], 1, wait=1.0, waiter_key="w") == []  # key reusable


def test_waiter_key_must_be_unique_among_live_waiters() -> None:
    core = make_core()
    assert core.reserve(T0, ["q"], 1, wait=10.0, waiter_key="w") == []
    with pytest.raises(ValueError):
        core.reserve(T0, ["q"], 1, wait=10.0, waiter_key="w")
    assert core.stats(T0, "q")["waiting"] == 1


def test_batch_nack_serves_waiters_in_the_order_they_started_waiting() -> None:
    core = make_core()
    in_a = put(core, T0, queue="a", priority=9)
    in_b = put(core, T0, queue="b")
    lease_a, lease_b = lease(core, T0, queue="a"), lease(core, T0, queue="b")
    assert core.reserve(T0 + 1, ["a"], 1, wait=10.0, waiter_key="first") == []
    assert core.reserve(T0 + 2, ["a", "b"], 1, wait=10.0, waiter_key="second") == []
    core.nack(T0 + 3, [lease_b, lease_a], delay=0)
    # "first" has waited longest and can take in_a; "second" then takes in_b.
    assert completions(core) == [("first", [in_a]), ("second", [in_b])]
    assert core.stats(T0 + 3, "a")["waiting"] == 0


# -------------------------------------------------------------- size limits


def test_too_large_body_stores_nothing_from_the_batch() -> None:
    core = make_core()
    core.configure(T0, "q", {"max_body": 10})
    with pytest.raises(TooLarge):
        core.put(T0, "q", [PutSpec(body=b"x" * 10), PutSpec(body=b"y" * 11)])
    stats = core.stats(T0, "q")
    assert (stats["ready"], stats["delayed"], stats["totals"]["put"]) == (0, 0, 0)
    assert core.messages == {}
    assert reserve_ids(core, T0) == []
    mid = put(core, T0, body=b"x" * 10)
    assert reserve_ids(core, T0) == [mid]


# ---------------------------------------------------------------- deadlines


def test_next_deadline_is_the_earliest_of_delays_leases_waiters_and_dead_letters() -> None:
    core = make_core()
    assert core.next_deadline() is None
    delayed = put(core, T0, delay=50.0)
    assert core.next_deadline() == T0 + 50.0
    put(core, T0, queue="r")
    delivery = lease(core, T0, queue="r")
    assert core.next_deadline() == T0 + 30.0
    assert core.reserve(T0, ["w"], 1, wait=20.0, waiter_key="w") == []
    assert core.next_deadline() == T0 + 20.0
    core.cancel_wait("w")
    assert core.next_deadline() == T0 + 30.0
    core.ack(T0, [delivery])
    assert core.next_deadline() == T0 + 50.0
    assert core.cancel(T0, delayed) is True
    assert core.next_deadline() is None
    core.configure(T0, "r", {"dead_letter_ttl": 5.0})
    reserved = put(core, T0, queue="r")
    core.bury(T0 + 1, *lease(core, T0, queue="r"), "r")
    assert core.next_deadline() == T0 + 6.0
    core.tick(T0 + 6.0)
    assert core.next_deadline() is None
    with pytest.raises(NotFound):
        core.status(T0 + 6.0, reserved)


# ---------------------------------------------------------------- lifecycle


def test_illegal_transitions_raise() -> None:
    with pytest.raises(IllegalTransition):
        advance_state(State.DEAD, Event.ACK)
    with pytest.raises(IllegalTransition):
        advance_state(State.NEW, Event.RESERVE)
    illegal = [(s, e) for s in State for e in Event if (s, e) not in TRANSITIONS]
    assert len(illegal) > 0
    for source, event in illegal:
        with pytest.raises(IllegalTransition):
            advance_state(source, event)
    assert advance_state(State.READY, Event.RESERVE) is State.RESERVED
    assert advance_state(State.DEAD, Event.REPLAY) is State.READY


def test_the_core_refuses_an_illegal_move_and_changes_nothing() -> None:
    core = Core()
    (message_id,) = core.put(T0, "q", [PutSpec(body=b"x")])
    message = core.messages[message_id]
    with pytest.raises(IllegalTransition):
        core._move(message, Event.ACK)  # a ready message cannot be acked
    assert message.state is State.READY
    assert core.queues["q"].counts[State.READY] == 1
    assert all(advance_state(s, e) is target for (s, e), target in TRANSITIONS.items())
    assert not any(source is State.GONE for source, _ in TRANSITIONS)


# ------------------------------------------------------- heap housekeeping


def test_cancelling_many_ready_messages_compacts_the_ready_heap() -> None:
    core = make_core()
    ids = core.put(T0, "q", [PutSpec(body=b"") for _ in range(50_000)])
    ready = core.queues["q"].ready
    assert ready.slots == 50_000
    for mid in ids:
        assert core.cancel(T0, mid) is True
    assert len(ready) == 0
    assert ready.slots <= READY_COMPACT_MIN
    assert "q" not in core.queues


def test_cancelling_many_delayed_messages_compacts_the_delay_heap() -> None:
    core = make_core()
    ids = core.put(T0, "q", [PutSpec(body=b"", delay=60.0) for _ in range(50_000)])
    keep = put(core, T0, delay=90.0)
    assert len(core._delayed._entries) == 50_001
    for mid in ids:
        core.cancel(T0, mid)
    assert len(core._delayed) == 1
    assert len(core._delayed._entries) <= _COMPACT_MIN + 1
    assert core.next_deadline() == T0 + 90.0
    assert reserve_ids(core, T0 + 90.0) == [keep]


def test_lease_heap_count_stays_exact_when_compaction_runs_mid_ack() -> None:
    core = make_core()
    core.put(T0, "q", [PutSpec(body=b"") for _ in range(3_000)])
    deliveries = [(m.id, m.lease_token) for m in core.reserve(T0, ["q"], 3_000)]
    for done, delivery in enumerate(reversed(deliveries), start=1):
        core.ack(T0, [delivery])
        assert len(core._leases) == 3_000 - done == live_entries(core._leases)
    assert len(core._leases._entries) <= _COMPACT_MIN


def test_lease_heap_count_stays_exact_when_compaction_runs_mid_touch() -> None:
    core = make_core()
    core.put(T0, "q", [PutSpec(body=b"") for _ in range(1_500)])
    deliveries = [(m.id, m.lease_token) for m in core.reserve(T0, ["q"], 1_500)]
    for delivery in deliveries[::-1] * 2:  # stale entries stay below the heap's top
        core.touch(T0 + 1, *delivery)
        assert len(core._leases) == 1_500 == live_entries(core._leases)


@pytest.mark.parametrize(("ttl", "count"), [(None, 10), (60.0, 3_000)])
def test_dead_letter_expiry_heap_count_stays_exact_through_replay(
    ttl: float | None, count: int
) -> None:
    core = make_core()
    core.configure(T0, "q", {"dead_letter_ttl": ttl})
    core.put(T0, "q", [PutSpec(body=b"") for _ in range(count)])
    for message in core.reserve(T0, ["q"], count):
        core.bury(T0, message.id, message.lease_token, "r")
    assert core.replay(T0, "q") == count
    assert len(core._dead_expiry) == live_entries(core._dead_expiry) == 0
    assert core.stats(T0, "q")["ready"] == count


def test_purging_dead_letters_after_a_ttl_change_still_compacts_the_expiry_heap() -> None:
    core = make_core()
    core.configure(T0, "q", {"dead_letter_ttl": 60.0})
    core.put(T0, "q", [PutSpec(body=b"") for _ in range(3_000)])
    for message in core.reserve(T0, ["q"], 3_000):
        core.bury(T0, message.id, message.lease_token, "r")
    core.configure(T0, "q", {"dead_letter_ttl": None})
    assert core.purge_dead(T0, "q") == 3_000
    assert len(core._dead_expiry) == live_entries(core._dead_expiry) == 0
    assert len(core._dead_expiry._entries) <= _COMPACT_MIN


def test_lazy_heap_discard_and_compact() -> None:
    live: set[int] = set(range(5_000))
    heap = LazyHeap(lambda entry: entry[-1] in live)
    for number in range(5_000):
        heap.push((number % 7, number, number))
    doomed = [number for number in range(5_000) if number % 3]
    for number in doomed:
        live.discard(number)
        heap.discard()
    assert len(heap) == 5_000 - len(doomed) == len(live)
    assert len(heap._entries) < 5_000  # compacted once stale entries dominated
    popped = []
    while (entry := heap.pop()) is not None:
        popped.append(entry)
    assert popped == sorted(popped)
    assert [entry[-1] for entry in popped] == sorted(live, key=lambda n: (n % 7, n))
    assert len(heap) == 0


def test_time_out_all_waits_answers_every_waiter_and_leaves_no_entries() -> None:
    core = make_core()
    keys = [f"w{n}" for n in range(3_000)]
    for key in keys:
        assert core.reserve(T0, ["q"], 1, wait=10.0, waiter_key=key) == []
    core.time_out_all_waits()
    # Checked before anything ticks: a tick would drop stale entries from the top.
    assert len(core._waiter_deadlines) == live_entries(core._waiter_deadlines) == 0
    assert completions(core) == [(key, []) for key in keys]
    assert "q" not in core.queues
    assert core.next_deadline() is None


# --------------------------------------------------------------- release, budgets, config


def test_release_returns_an_undelivered_lease_to_ready_with_the_attempt_uncounted() -> None:
    core = make_core()
    first = put(core, T0)
    second = put(core, T0)
    messages = core.reserve(T0, ["q"], 2)
    core.release(T0 + 1, messages)
    assert [state(core, T0 + 1, i) for i in (first, second)] == ["ready", "ready"]
    assert core.status(T0 + 1, first)["attempts"] == 0
    assert core.stats(T0 + 1, "q")["totals"]["delivered"] == 0
    # Released in lease order, so the original order holds on the next reserve.
    assert reserve_ids(core, T0 + 1) == [first, second]


def test_release_leaves_a_delivery_that_moved_on_alone() -> None:
    core = make_core()
    put(core, T0)
    (message,) = core.reserve(T0, ["q"], 1)
    assert message.lease_token is not None
    core.ack(T0, [(message.id, message.lease_token)])
    core.release(T0, [message])
    assert "q" not in core.queues
    with pytest.raises(NotFound):
        core.status(T0, message.id)


def test_release_serves_a_waiting_long_poll() -> None:
    core = make_core()
    first = put(core, T0)
    messages = core.reserve(T0, ["q"], 1)
    assert core.reserve(T0, ["q"], 1, wait=10, waiter_key="w") == []
    core.release(T0 + 1, messages)
    assert completions(core) == [("w", [first])]


def test_max_delivery_bytes_bounds_a_reserve_but_always_hands_out_one() -> None:
    core = Core(random=lambda: 0.5, max_delivery_bytes=250)
    ids = core.put(T0, "q", [PutSpec(body=b"x" * 100) for _ in range(5)])
    assert reserve_ids(core, T0) == ids[:2]  # a third would make 300 bytes
    big = put(core, T0, queue="big", body=b"y" * 1000)
    assert reserve_ids(core, T0, ("big",)) == [big]  # over budget alone: still delivered
    assert reserve_ids(core, T0) == ids[2:4]


def test_invalid_configure_changes_nothing_and_creates_no_queue() -> None:
    from protocol import BadRequest

    core = make_core()
    with pytest.raises(BadRequest):
        core.configure(T0, "new", {"max_attempts": 0})
    assert core.list_queues(T0) == []
    core.configure(T0, "q", {"max_attempts": 3})
    with pytest.raises(BadRequest):
        core.configure(T0, "q", {"max_attempts": 9, "visibility_timeout": -1})
    assert core.configure(T0, "q", {})["max_attempts"] == 3


# ------------------------------------------------------------------ peek


def test_peek_shows_each_state_in_its_order_and_changes_nothing() -> None:
    core = make_core()
    low = put(core, T0, priority=1)
    high = put(core, T0, priority=9)
    later = put(core, T0, delay=20.0)
    sooner = put(core, T0, delay=10.0)
    put(core, T0, queue="other", delay=5.0)  # another queue's delayed message is not shown
    before = snapshot(core, T0)

    assert [m.id for m in core.peek(T0, "q", State.READY, 10)] == [high, low]
    assert [m.id for m in core.peek(T0, "q", State.READY, 1)] == [high]
    assert [m.id for m in core.peek(T0, "q", State.DELAYED, 10)] == [sooner, later]
    assert core.peek(T0, "q", State.RESERVED, 10) == []
    assert snapshot(core, T0) == before

    first, _ = lease(core, T0, visibility_timeout=50.0)
    second, token = lease(core, T0, visibility_timeout=5.0)
    assert [m.id for m in core.peek(T0, "q", State.RESERVED, 10)] == [second, first]
    core.bury(T0, second, token, "no")
    assert [m.id for m in core.peek(T0, "q", State.DEAD, 10)] == [second]
    with pytest.raises(NotFound):
        core.peek(T0, "missing", State.READY, 10)


def test_one_puts_messages_share_a_seq_and_keep_their_order() -> None:
    """A put stamps one seq on all its messages (one int, not one each): peek pages,
    positions and reserves across queues still order them by id within the put."""
    core = make_core()
    first = put(core, T0, "a")
    batch = list(core.put(T0, "b", [PutSpec(body=b"x") for _ in range(4)]))
    later = put(core, T0, "a")
    assert len({core.messages[message_id].seq for message_id in batch}) == 1
    pages = core.peek(T0, "b", State.READY, 2, after=batch[1])
    assert [message.id for message in pages] == batch[2:]
    assert [core.status(T0, message_id)["position"] for message_id in batch] == [0, 1, 2, 3]
    assert reserve_ids(core, T0, ("a", "b")) == [first, *batch, later]


def test_peek_pages_after_a_message_in_each_states_order() -> None:
    core = make_core()
    ready = [put(core, T0, priority=p) for p in (1, 5, 5, 9)]
    in_order = [ready[3], ready[1], ready[2], ready[0]]
    delayed = [put(core, T0, delay=d) for d in (30.0, 10.0, 20.0)]
    assert [m.id for m in core.peek(T0, "q", State.READY, 2, after=in_order[0])] == in_order[1:3]
    assert [m.id for m in core.peek(T0, "q", State.READY, 10, after=in_order[3])] == []
    assert [m.id for m in core.peek(T0, "q", State.DELAYED, 1, after=delayed[1])] == [delayed[2]]
    first, token = lease(core, T0)  # the highest priority: in_order[0]
    core.bury(T0, first, token, "no")
    second, token = lease(core, T0)
    core.bury(T0, second, token, "no")
    assert [m.id for m in core.peek(T0, "q", State.DEAD, 10, after=second)] == [first]  # by id
    with pytest.raises(BadRequest, match="no longer ready"):
        core.peek(T0, "q", State.READY, 10, after=first)  # it is dead now
