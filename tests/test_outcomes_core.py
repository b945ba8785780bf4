"""Unit tests of what outlives a message in the pure core: dedup keys and their window, ack
results and their TTL, result waits (``wait_result``) and progress, with a fake clock. The
last section writes the core's changes to a real LMDB store and recovers them.

Time is a plain float each test advances itself. ``random=lambda: 0.5`` makes backoff
jitter have no effect.
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any

import pytest

from broker import Core, PutSpec
from broker._core import PutIds
from broker._lazyheap import LazyHeap
from broker._outcomes import NO_RESULT
from broker._ready import ReadyIndex
from broker._store import Store
from protocol import LeaseLost, NotFound
from tests.test_core_machine import heap_counts

T0 = 1_000.0
EPS = 1e-6
WINDOW = 5.0  # the dedup window most tests configure
TTL = 10.0  # the result TTL most tests configure


def make_core(*, track_changes: bool = False, **settings: Any) -> Core:
    """A core whose queue ``q`` has a short dedup window and result TTL, and no backoff."""
    core = Core(random=lambda: 0.5, track_changes=track_changes)
    core.configure(
        T0,
        "q",
        {
            "dedup_window": WINDOW,
            "result_ttl": TTL,
            "backoff": {"type": "fixed", "delay": 0},
            **settings,
        },
    )
    return core


def put(core: Core, now: float, key: str | None = None, queue: str = "q", **fields: Any) -> PutIds:
    return core.put(now, queue, [PutSpec(body=b"x", key=key, **fields)])


def lease(core: Core, now: float, queue: str = "q") -> tuple[int, int]:
    """Reserve exactly one message and return its delivery ``(id, lease token)``."""
    (message,) = core.reserve(now, [queue], 1)
    assert message.lease_token is not None
    return message.id, message.lease_token


def outcomes(core: Core) -> list[tuple[Hashable, Any]]:
    return list(core.take_completions())


def totals_put(core: Core, queue: str = "q") -> int:
    return int(core.stats(T0, queue)["totals"]["put"])


def assert_heaps_exact(core: Core) -> None:
    heaps: dict[str, LazyHeap | ReadyIndex] = {
        "delayed": core._delayed,
        "leases": core._leases,
        "dead expiry": core._dead_expiry,
        "waiter deadlines": core._waiter_deadlines,
    }
    heaps.update({f"ready {name}": queue.ready for name, queue in core.queues.items()})
    for name, heap in heaps.items():
        counted, live = heap_counts(heap)
        assert counted == live, f"{name} heap counts {counted} live entries, has {live}"


# --------------------------------------------------------------- dedup: taken keys


def test_duplicate_key_within_one_batch_adds_one_message() -> None:
    core = make_core()
    specs = [PutSpec(body=b"a", key="k"), PutSpec(body=b"b"), PutSpec(body=b"c", key="k")]
    ids = core.put(T0, "q", specs)
    assert ids == [ids[0], ids[1], ids[0]] and ids[0] != ids[1]
    assert ids.duplicates == [2]
    assert core.stats(T0, "q")["ready"] == 2
    assert totals_put(core) == 2
    (message,) = core.reserve(T0, ["q"], 1)
    assert message.body == b"a"  # the first one with the key is kept


def _to_state(core: Core, now: float, message_id: int, state: str) -> None:
    """Move the only message of ``q`` (put ready) to ``state``."""
    if state == "delayed":
        delivery = lease(core, now)
        core.nack(now, [delivery], delay=60.0)
    elif state == "reserved":
        lease(core, now)
    elif state == "dead":
        core.bury(now, *lease(core, now), "bad")
    assert core.status(now, message_id)["state"] == state


@pytest.mark.parametrize("state", ["ready", "delayed", "reserved", "dead"])
def test_put_with_a_taken_key_adds_nothing_and_returns_the_existing_id(state: str) -> None:
    core = make_core()
    first = put(core, T0, "order-42")
    assert first.duplicates == []
    _to_state(core, T0, first[0], state)
    before = core.stats(T0, "q")
    again = put(core, T0 + 1, "order-42", priority=9)
    assert again == first and again.duplicates == [0]
    assert core.stats(T0 + 1, "q") == before  # totals included: the duplicate is not counted
    assert totals_put(core) == 1
    assert core.status(T0 + 1, first[0])["key"] == "order-42"


def test_retries_keep_the_key_taken() -> None:
    core = make_core(visibility_timeout=2.0)
    (first,) = put(core, T0, "k")
    core.nack(T0, [lease(core, T0)], error="try later")
    lease(core, T0 + 1)
    core.tick(T0 + 3)  # the lease expires: ready again
    assert core.status(T0 + 3, first)["attempts"] == 2
    assert put(core, T0 + 100, "k").duplicates == [0]


def test_keys_belong_to_one_queue() -> None:
    core = make_core()
    (in_q,) = put(core, T0, "k")
    other = put(core, T0, "k", queue="other")
    assert other.duplicates == [] and other[0] != in_q


def _end(core: Core, now: float, message_id: int, how: str) -> None:
    if how == "ack":
        core.ack(now, [lease(core, now)])
    elif how == "dead":
        core.bury(now, *lease(core, now), "bad")
    elif how == "cancel":
        assert core.cancel(now, message_id) is True
    else:
        assert core.purge(now, "q") == 1


@pytest.mark.parametrize(
    ("how", "delay"),
    [("ack", 0), ("dead", 0), ("cancel", 0), ("cancel", 100), ("purge", 0), ("purge", 100)],
)
def test_window_starts_when_the_message_ends_and_ends_exactly_window_later(
    how: str, delay: float
) -> None:
    core = make_core()
    (first,) = put(core, T0, "k", delay=delay)
    ended_at = T0 + 50
    assert put(core, ended_at - 1, "k").duplicates == [0]
    _end(core, ended_at, first, how)
    assert put(core, ended_at, "k") == [first]
    last_duplicate = put(core, ended_at + WINDOW - EPS, "k")
    assert last_duplicate == [first] and last_duplicate.duplicates == [0]
    assert totals_put(core) == 1
    fresh = put(core, ended_at + WINDOW, "k")
    assert fresh.duplicates == [] and fresh[0] > first
    assert totals_put(core) == 2
    assert put(core, ended_at + WINDOW, "k") == fresh  # the new message holds the key now


def test_a_dead_letter_frees_its_key_after_the_window_though_it_is_still_kept() -> None:
    core = make_core()
    (first,) = put(core, T0, "k")
    core.bury(T0, *lease(core, T0), "bad")
    fresh = put(core, T0 + WINDOW, "k")
    assert fresh.duplicates == [] and fresh[0] != first
    assert core.status(T0 + WINDOW, first)["state"] == "dead"


def test_window_zero_frees_the_key_as_soon_as_the_message_ends() -> None:
    core = make_core(dedup_window=0)
    (first,) = put(core, T0, "k")
    assert put(core, T0, "k").duplicates == [0]  # still taken while live
    core.ack(T0, [lease(core, T0)])
    second = put(core, T0, "k")
    assert second.duplicates == [] and second[0] != first
    assert core.cancel(T0, second[0])
    assert put(core, T0, "k").duplicates == []
    assert core.dedup.changed is None  # not tracking: nothing to write


def test_window_is_the_one_in_force_when_the_message_ended() -> None:
    core = make_core()
    (first,) = put(core, T0, "k")
    core.ack(T0, [lease(core, T0)])
    core.configure(T0 + 1, "q", {"dedup_window": 1000.0})
    fresh = put(core, T0 + WINDOW, "k")
    assert fresh.duplicates == [] and fresh[0] != first


def test_replay_makes_a_dead_letters_key_live_again() -> None:
    core = make_core()
    (first,) = put(core, T0, "k")
    core.bury(T0, *lease(core, T0), "bad")
    assert core.replay(T0 + 100, "q") == 1  # long after the window ended
    assert put(core, T0 + 100, "k").duplicates == [0]
    core.ack(T0 + 200, [lease(core, T0 + 200)])
    assert put(core, T0 + 200 + WINDOW - EPS, "k") == [first]
    assert put(core, T0 + 200 + WINDOW, "k").duplicates == []


def test_replay_within_the_window_keeps_the_key_with_its_message() -> None:
    core = make_core()
    (first,) = put(core, T0, "k")
    core.bury(T0, *lease(core, T0), "bad")
    core.replay(T0 + 1, "q")
    assert put(core, T0 + 100, "k") == [first]  # live again: no window runs out


def test_replay_leaves_a_key_that_another_message_took_with_that_message() -> None:
    core = make_core()
    (first,) = put(core, T0, "k")
    core.bury(T0, *lease(core, T0), "bad")
    (second,) = put(core, T0 + WINDOW, "k")
    core.replay(T0 + WINDOW, "q")
    assert put(core, T0 + WINDOW, "k") == [second]
    holder, replayed = lease(core, T0 + 10), lease(core, T0 + 10)
    assert (holder[0], replayed[0]) == (second, first)
    # The replayed message ending starts no window for a key it does not hold...
    core.ack(T0 + 10, [replayed])
    assert put(core, T0 + 10 + WINDOW, "k") == [second]
    # ...and the holder's own window is the one that counts.
    core.ack(T0 + 20, [holder])
    assert put(core, T0 + 20 + WINDOW - EPS, "k") == [second]
    assert put(core, T0 + 20 + WINDOW, "k").duplicates == []


# ------------------------------------------------------------------- results


def test_ack_result_is_kept_for_the_result_ttl() -> None:
    core = make_core()
    (message_id,) = put(core, T0)
    core.ack(T0 + 1, [lease(core, T0)], [{"total": 42, "raw": b"\x00"}])
    done = {
        "id": message_id,
        "queue": "q",
        "state": "done",
        "result": {"total": 42, "raw": b"\x00"},
        "done_at": T0 + 1,
    }
    assert core.status(T0 + 1 + TTL - EPS, message_id) == done
    assert core.wait_result(T0 + 1 + TTL - EPS, message_id, 0, None) == done
    with pytest.raises(NotFound):
        core.status(T0 + 1 + TTL, message_id)
    with pytest.raises(NotFound):
        core.wait_result(T0 + 1 + TTL, message_id, 5.0, "w")
    assert core.results.by_id == {}


def test_result_ttl_zero_keeps_nothing() -> None:
    core = make_core(result_ttl=0)
    (message_id,) = put(core, T0)
    core.ack(T0, [lease(core, T0)], ["answer"])
    with pytest.raises(NotFound):
        core.status(T0, message_id)
    assert core.results.by_id == {}


def test_ack_without_a_result_keeps_nothing() -> None:
    core = make_core()
    (message_id,) = put(core, T0)
    core.ack(T0, [lease(core, T0)])
    with pytest.raises(NotFound):
        core.status(T0, message_id)
    with pytest.raises(NotFound):
        core.wait_result(T0, message_id, 0, None)


def test_batch_ack_keeps_each_result_and_none_where_none_was_sent() -> None:
    core = make_core()
    ids = core.put(T0, "q", [PutSpec(body=b"x") for _ in range(3)])
    deliveries = [(m.id, m.lease_token or 0) for m in core.reserve(T0, ["q"], 3)]
    assert core.ack(T0, deliveries, ["one", NO_RESULT, None]) == 3
    assert core.status(T0, ids[0])["result"] == "one"
    with pytest.raises(NotFound):
        core.status(T0, ids[1])
    assert core.status(T0, ids[2])["result"] is None  # an explicit None is a result
    assert core.stats(T0, "q")["totals"]["acked"] == 3


def test_result_ttl_change_applies_to_later_acks_only() -> None:
    core = make_core()
    (early,) = put(core, T0)
    core.ack(T0, [lease(core, T0)], ["early"])
    core.configure(T0, "q", {"result_ttl": 100.0})
    (late,) = put(core, T0)
    core.ack(T0, [lease(core, T0)], ["late"])
    with pytest.raises(NotFound):
        core.status(T0 + TTL, early)
    assert core.status(T0 + 99, late)["result"] == "late"


# -------------------------------------------------------------- result waits


def test_wait_completes_when_the_message_is_acked_with_a_result() -> None:
    core = make_core()
    (message_id,) = put(core, T0)
    assert core.wait_result(T0, message_id, 30.0, "w") is None
    assert core.next_deadline() == T0 + 30.0
    delivery = lease(core, T0 + 1)
    assert outcomes(core) == []
    core.ack(T0 + 2, [delivery], [[1, 2, 3]])
    done = {"id": message_id, "queue": "q", "state": "done", "result": [1, 2, 3]}
    assert outcomes(core) == [("w", done | {"done_at": T0 + 2})]
    assert core.next_deadline() is None
    core.tick(T0 + 30.0)
    assert outcomes(core) == []  # answered once
    assert_heaps_exact(core)


@pytest.mark.parametrize("ttl", [TTL, 0.0])
def test_wait_completes_on_an_ack_without_a_kept_result(ttl: float) -> None:
    core = make_core(result_ttl=ttl)
    (message_id,) = put(core, T0)
    core.wait_result(T0, message_id, 30.0, "w")
    core.ack(T0, [lease(core, T0)], None if ttl else ["dropped"])
    done = {"id": message_id, "queue": "q", "state": "done", "result": None, "done_at": T0}
    if not ttl:
        done["result"] = "dropped"  # told to the waiter, though not kept
    assert outcomes(core) == [("w", done)]
    with pytest.raises(NotFound):
        core.status(T0, message_id)


def test_every_wait_on_a_message_completes() -> None:
    core = make_core()
    (message_id,) = put(core, T0)
    for key in ("a", "b", "c"):
        core.wait_result(T0, message_id, 30.0, key)
    core.ack(T0, [lease(core, T0)], ["r"])
    assert [(key, outcome["result"]) for key, outcome in outcomes(core)] == [
        ("a", "r"),
        ("b", "r"),
        ("c", "r"),
    ]
    assert_heaps_exact(core)


@pytest.mark.parametrize("how", ["bury", "nack", "expiry"])
def test_wait_completes_when_the_message_is_dead_lettered(how: str) -> None:
    core = make_core(max_attempts=1, visibility_timeout=5.0)
    (message_id,) = put(core, T0)
    core.wait_result(T0, message_id, 30.0, "w")
    delivery = lease(core, T0)
    if how == "bury":
        core.bury(T0 + 1, *delivery, "no such seat")
        reason, error = "no such seat", None
    elif how == "nack":
        core.nack(T0 + 1, [delivery], error="ValueError: bad row")
        reason, error = "max_attempts (1) used up", "ValueError: bad row"
    else:
        core.tick(T0 + 5)
        reason, error = "max_attempts (1) used up", "lease expired"
    dead = {
        "id": message_id,
        "queue": "q",
        "state": "dead",
        "dead_reason": reason,
        "last_error": error,
        "attempts": 1,
    }
    assert outcomes(core) == [("w", dead)]
    assert core.wait_result(T0 + 6, message_id, 30.0, "again") == dead  # final: no wait
    assert_heaps_exact(core)


def test_a_lease_expiring_at_the_waits_deadline_dead_letters_first() -> None:
    core = make_core(max_attempts=1, visibility_timeout=5.0)
    (message_id,) = put(core, T0)
    lease(core, T0)
    core.wait_result(T0, message_id, 5.0, "w")
    core.tick(T0 + 5.0)
    ((key, outcome),) = outcomes(core)
    assert (key, outcome["state"], outcome["last_error"]) == ("w", "dead", "lease expired")


@pytest.mark.parametrize("how", ["cancel", "purge"])
@pytest.mark.parametrize("delay", [0.0, 60.0])
def test_wait_completes_as_gone_when_the_message_is_removed(how: str, delay: float) -> None:
    core = make_core()
    (message_id,) = put(core, T0, delay=delay)
    core.wait_result(T0, message_id, 30.0, "w")
    if how == "cancel":
        assert core.cancel(T0 + 1, message_id)
    else:
        assert core.purge(T0 + 1, "q") == 1
    assert outcomes(core) == [("w", {"id": message_id, "state": "gone"})]
    assert_heaps_exact(core)
    assert core.next_deadline() is None


@pytest.mark.parametrize("state", ["ready", "delayed", "reserved"])
def test_wait_times_out_exactly_at_its_deadline_with_the_current_state(state: str) -> None:
    core = make_core()
    (message_id,) = put(core, T0, delay=60.0 if state == "delayed" else 0.0)
    if state == "reserved":
        lease(core, T0)
    assert core.wait_result(T0, message_id, 5.0, "w") is None
    core.tick(T0 + 5.0 - EPS)
    assert outcomes(core) == []
    core.tick(T0 + 5.0)
    assert outcomes(core) == [("w", {"id": message_id, "state": state})]
    assert core._result_waits == {} and core._result_waiters == {}
    assert_heaps_exact(core)


def test_wait_without_time_returns_the_state_at_once() -> None:
    core = make_core()
    (message_id,) = put(core, T0)
    assert core.wait_result(T0, message_id, 0, None) == {"id": message_id, "state": "ready"}
    assert core._result_waits == {}


def test_waiting_on_an_unknown_message_is_not_found() -> None:
    core = make_core()
    with pytest.raises(NotFound):
        core.wait_result(T0, 12345, 5.0, "w")
    assert core.next_deadline() is None


def test_a_wait_key_must_not_be_waiting_already() -> None:
    core = make_core()
    (message_id,) = put(core, T0)
    core.wait_result(T0, message_id, 5.0, "w")
    assert core.reserve(T0, ["empty"], 1, wait=5.0, waiter_key="r") == []
    for key in ("w", "r", None):
        with pytest.raises(ValueError):
            core.wait_result(T0, message_id, 5.0, key)


def test_cancel_wait_forgets_a_result_wait() -> None:
    core = make_core()
    (message_id,) = put(core, T0)
    core.wait_result(T0, message_id, 30.0, "gone-away")
    core.wait_result(T0, message_id, 30.0, "staying")
    core.cancel_wait("gone-away")
    assert_heaps_exact(core)
    core.cancel_wait("gone-away")  # no-op the second time
    core.ack(T0, [lease(core, T0)], ["r"])
    assert [key for key, _ in outcomes(core)] == ["staying"]
    core.wait_result(T0, put(core, T0)[0], 30.0, "lonely")
    core.cancel_wait("lonely")
    assert core.next_deadline() is None
    assert_heaps_exact(core)


def test_time_out_all_waits_answers_result_waits_with_the_current_state() -> None:
    core = make_core()
    ready, other = put(core, T0)[0], put(core, T0)[0]
    core.wait_result(T0, ready, 30.0, "w1")
    core.wait_result(T0, other, 30.0, "w2")
    core.reserve(T0, ["empty"], 1, wait=30.0, waiter_key="r")
    lease(core, T0)  # ready is reserved now
    core.time_out_all_waits()
    assert_heaps_exact(core)  # before any tick drops stale entries from the top
    assert sorted(outcomes(core), key=lambda item: str(item[0])) == [
        ("r", []),
        ("w1", {"id": ready, "state": "reserved"}),
        ("w2", {"id": other, "state": "ready"}),
    ]
    assert core.next_deadline() == T0 + 30.0  # only the lease is left


def _ended_by(core: Core, now: float, how: str, deliveries: list[tuple[int, int]]) -> None:
    if how == "ack":
        for delivery in reversed(deliveries):
            core.ack(now, [delivery], ["r"])
    elif how == "bury":
        for delivery in reversed(deliveries):
            core.bury(now, *delivery, "r")
    elif how == "cancel_wait":
        for index in reversed(range(len(deliveries))):
            core.cancel_wait(index)
    else:
        core.time_out_all_waits()


@pytest.mark.parametrize("how", ["ack", "bury", "cancel_wait", "time_out_all"])
def test_wait_deadline_heap_count_stays_exact_through_compaction(how: str) -> None:
    core = make_core()
    count = 3_000  # over the heap's compaction threshold
    ids = core.put(T0, "q", [PutSpec(body=b"") for _ in range(count)])
    for index, message_id in enumerate(ids):
        core.wait_result(T0, message_id, 30.0 + index, index)
    deliveries = [(m.id, m.lease_token or 0) for m in core.reserve(T0, ["q"], count)]
    _ended_by(core, T0 + 1, how, deliveries)
    assert_heaps_exact(core)
    assert len(core._waiter_deadlines) == 0
    assert len(core.take_completions()) == (0 if how == "cancel_wait" else count)
    assert core._result_waits == {} and core._result_waiters == {}


def test_timed_out_waits_leave_the_heap_count_exact() -> None:
    core = make_core()
    ids = core.put(T0, "q", [PutSpec(body=b"") for _ in range(2_000)])
    for index, message_id in enumerate(ids):
        core.wait_result(T0, message_id, 1.0 + (index % 2) * 100, index)
    core.tick(T0 + 1.0)  # half time out; then the rest end by cancel
    assert len(core.take_completions()) == 1_000
    for message_id in ids:
        core.cancel(T0 + 2, message_id)
    assert len(core.take_completions()) == 1_000
    assert_heaps_exact(core)
    assert core.next_deadline() is None


# ------------------------------------------------------------------ progress


def test_progress_is_recorded_on_the_current_lease_and_shown_by_status() -> None:
    core = make_core(visibility_timeout=5.0)
    (message_id,) = put(core, T0)
    assert "progress" not in core.status(T0, message_id)
    delivery = lease(core, T0)
    core.progress(T0 + 1, *delivery, 10.0, "started")
    core.progress(T0 + 2, *delivery, 55.5, "half way")
    assert core.status(T0 + 2, message_id)["progress"] == {"percent": 55.5, "note": "half way"}


def test_progress_on_a_stale_lease_is_lease_lost_and_changes_nothing() -> None:
    core = make_core(visibility_timeout=5.0)
    (message_id,) = put(core, T0)
    stale = lease(core, T0)
    core.tick(T0 + 5)  # expired: ready again
    with pytest.raises(LeaseLost):
        core.progress(T0 + 5, *stale, 50.0, "too late")
    current = lease(core, T0 + 6)
    with pytest.raises(LeaseLost):
        core.progress(T0 + 6, *stale, 50.0, "too late")
    with pytest.raises(LeaseLost):
        core.progress(T0 + 6, 999_999, current[1], 50.0, "unknown")
    assert "progress" not in core.status(T0 + 6, message_id)
    core.ack(T0 + 6, [current])
    with pytest.raises(LeaseLost):
        core.progress(T0 + 6, *current, 100.0, "after the ack")


# ------------------------------------------------------------ store round trip


def commit(store: Store, core: Core) -> None:
    batch = store.encode(core.take_changes())
    store.commit(batch)
    store.committed(batch)


def fresh_store(path: Path) -> Store:
    """A store on an empty dir, recovered (into a core of its own) and ready to commit."""
    store = Store(str(path), fsync="never")
    store.recover(Core(), T0)
    return store


def recovered(path: Path, now: float) -> tuple[Store, Core]:
    store = Store(str(path), fsync="never")
    core = Core(random=lambda: 0.5, track_changes=True)
    store.recover(core, now)
    return store, core


def stored_keys(store: Store) -> tuple[list[bytes], list[bytes]]:
    """The raw keys of the results and dedup databases, once checkpointed."""
    store.checkpoint_now()
    with store.env.begin() as txn:
        results = [bytes(key) for key, _ in txn.cursor(store._results)]
        dedup = [bytes(key) for key, _ in txn.cursor(store._dedup)]
    return results, dedup


def test_results_ended_keys_and_progress_survive_a_store_round_trip(tmp_path: Path) -> None:
    core = make_core(track_changes=True, dedup_window=50.0, result_ttl=100.0)
    core.configure(T0, "short", {"dedup_window": 5.0, "result_ttl": 5.0})
    store = fresh_store(tmp_path)
    ids = {key: put(core, T0, key)[0] for key in ("acked", "plain", "gone", "held", "dead")}
    ready = put(core, T0, "ready")[0]
    brief = put(core, T0, "brief", queue="short")[0]
    core.ack(T0 + 1, [lease(core, T0)], [{"seat": "12C"}])
    core.ack(T0 + 1, [lease(core, T0)])
    assert core.cancel(T0 + 1, ids["gone"])
    held = lease(core, T0 + 1)
    core.progress(T0 + 1, *held, 40.0, "printing")
    core.bury(T0 + 1, *lease(core, T0 + 1), "broken")
    core.ack(T0 + 1, [lease(core, T0 + 1, "short")], ["short-lived"])
    commit(store, core)
    store.close()

    store, again = recovered(tmp_path, T0 + 10)
    assert again.status(T0 + 10, ids["acked"])["result"] == {"seat": "12C"}
    outcome = again.wait_result(T0 + 10, ids["acked"], 5.0, "w")
    assert outcome is not None and outcome["done_at"] == T0 + 1
    held_status = again.status(T0 + 10, ids["held"])
    assert held_status["progress"] == {"percent": 40.0, "note": "printing"}
    assert held_status["key"] == "held"
    again.progress(T0 + 10, *held, 90.0, "lease kept")
    for key, message_id in [*ids.items(), ("ready", ready)]:
        assert put(again, T0 + 10, key) == [message_id], key
    # The short queue's window and result ran out while it was down.
    with pytest.raises(NotFound):
        again.status(T0 + 10, brief)
    fresh = put(again, T0 + 10, "brief", queue="short")
    assert fresh.duplicates == [] and fresh[0] > max(*ids.values(), ready, brief)
    commit(store, again)  # deletes what ran out
    results, dedup = stored_keys(store)
    assert results == [ids["acked"].to_bytes(8, "big")]
    assert dedup == [b"q\x00" + key.encode() for key in ("acked", "dead", "gone", "plain")]
    # The windows of the others end when they would have.
    assert put(again, T0 + 51 - EPS, "acked").duplicates == [0]
    assert put(again, T0 + 51, "acked").duplicates == []
    store.close()


def test_an_expired_window_is_dropped_from_the_store(tmp_path: Path) -> None:
    core = make_core(track_changes=True)
    store = fresh_store(tmp_path)
    (first,) = put(core, T0, "k")
    core.ack(T0, [lease(core, T0)], ["r"])
    commit(store, core)
    assert stored_keys(store) == ([first.to_bytes(8, "big")], [b"q\x00k"])
    core.tick(T0 + max(WINDOW, TTL))
    commit(store, core)
    assert stored_keys(store) == ([], [])
    store.close()


def test_a_replayed_key_is_live_again_after_recovery(tmp_path: Path) -> None:
    core = make_core(track_changes=True)
    store = fresh_store(tmp_path)
    (first,) = put(core, T0, "k")
    core.bury(T0, *lease(core, T0), "bad")
    commit(store, core)
    assert stored_keys(store)[1] == [b"q\x00k"]  # ended: stored on its own
    core.replay(T0 + 1, "q")
    commit(store, core)
    assert stored_keys(store)[1] == []  # live again: the message record carries it
    store.close()
    store, again = recovered(tmp_path, T0 + 100)
    assert put(again, T0 + 100, "k") == [first]
    store.close()


def _replay_behind_another_holder(core: Core) -> None:
    """The dead ``first`` is replayed while ``second`` holds its key; ``second`` is acked."""
    put(core, T0, "k")
    core.bury(T0, *lease(core, T0), "bad")
    (second,) = put(core, T0 + WINDOW, "k")
    core.replay(T0 + WINDOW, "q")
    delivery = lease(core, T0 + WINDOW)
    assert delivery[0] == second  # it became ready before the replayed one
    core.ack(T0 + WINDOW, [delivery])


def test_recovery_keeps_the_holder_of_a_key_when_a_replayed_message_shares_it(
    tmp_path: Path,
) -> None:
    """A replayed message does not take back a key another message holds (even once that
    one has ended). A restart must not change who holds it: after ``second``'s window the
    key is free in memory, so it must be free after recovery too."""
    in_memory = make_core()
    _replay_behind_another_holder(in_memory)
    later = T0 + 2 * WINDOW + 1
    expected = put(in_memory, later, "k").duplicates
    core = make_core(track_changes=True)
    _replay_behind_another_holder(core)
    store = fresh_store(tmp_path)
    commit(store, core)
    store.close()
    store, again = recovered(tmp_path, T0 + WINDOW)
    try:
        assert put(again, later, "k").duplicates == expected
    finally:
        store.close()
