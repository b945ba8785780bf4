"""Queues come and go with their use: an unused queue is forgotten (core, no I/O)."""

from __future__ import annotations

import pytest

from broker import Core, PutSpec
from broker._schedules import parse_spec
from broker._settings import DEFAULT_SETTINGS
from protocol import BadRequest, LeaseLost, NotFound, Quota, TooLarge

T = 1_000.0


def names(core: Core) -> list[str]:
    return [queue["name"] for queue in core.list_queues(T)]


def test_a_reserve_that_finds_nothing_and_does_not_wait_leaves_no_queue() -> None:
    core = Core(track_changes=True)
    for n in range(1_000):
        assert core.reserve(T, [f"q{n}", "other"], 1) == []
    assert core.queues == {}
    changes = core.take_changes()
    assert changes.queues == [] and len(changes.forgotten) == 1_001


def test_the_totals_of_forgotten_queues_are_summed_for_broker_wide_counters() -> None:
    core = Core()
    for name in ("a", "b"):
        core.put(T, name, [PutSpec(body=b"x")])
        (message,) = core.reserve(T, [name], 1)
        core.ack(T, [(message.id, message.lease_token)])  # type: ignore[list-item]
    core.configure(T, "c", {"paused": True})
    core.put(T, "c", [PutSpec(body=b"x")])
    core.delete_queue(T, "c", force=True)
    assert core.queues == {}
    assert core.forgotten_totals == {
        "put": 3,
        "delivered": 2,
        "acked": 2,
        "nacked": 0,
        "expired": 0,
        "dead_lettered": 0,
    }


def test_the_quota_counts_only_queues_in_use() -> None:
    core = Core(max_queues=2)
    for n in range(10):
        core.reserve(T, [f"q{n}"], 1)
    core.put(T, "a", [PutSpec(body=b"x")])
    core.configure(T, "b", {"paused": True})
    with pytest.raises(Quota):
        core.reserve(T, ["c"], 1)


def test_a_queue_is_forgotten_when_its_last_message_leaves_and_its_totals_with_it() -> None:
    core = Core()
    core.put(T, "q", [PutSpec(body=b"1"), PutSpec(body=b"2")])
    first, second = core.reserve(T, ["q"], 2)
    core.ack(T, [(first.id, first.lease_token)])  # type: ignore[list-item]
    assert core.stats(T, "q")["totals"]["acked"] == 1
    core.ack(T, [(second.id, second.lease_token)])  # type: ignore[list-item]
    assert names(core) == []
    with pytest.raises(NotFound):
        core.stats(T, "q")
    core.put(T, "q", [PutSpec(body=b"3")])
    assert core.stats(T, "q")["totals"]["put"] == 1  # counted from zero again


@pytest.mark.parametrize("how", ["cancel", "purge"])
def test_cancel_and_purge_of_the_last_message_forget_the_queue(how: str) -> None:
    core = Core()
    (message_id,) = core.put(T, "q", [PutSpec(body=b"x", delay=5)])
    if how == "cancel":
        assert core.cancel(T, message_id)
    else:
        assert core.purge(T, "q") == 1
    assert names(core) == []


def test_a_dead_letter_keeps_its_queue_until_it_expires_or_is_purged() -> None:
    core = Core()
    core.put(T, "q", [PutSpec(body=b"x")])
    (message,) = core.reserve(T, ["q"], 1)
    core.bury(T, message.id, message.lease_token, "bad")  # type: ignore[arg-type]
    assert names(core) == ["q"]
    core.tick(T + 7 * 24 * 3600 + 1)  # the default dead-letter TTL
    assert names(core) == []
    core.put(T, "q", [PutSpec(body=b"x")])
    (message,) = core.reserve(T, ["q"], 1)
    core.bury(T, message.id, message.lease_token, "bad")  # type: ignore[arg-type]
    assert core.purge_dead(T, "q") == 1
    assert names(core) == []


def test_a_long_poll_keeps_its_queues_until_it_ends() -> None:
    core = Core()
    core.reserve(T, ["a", "b"], 1, wait=5, waiter_key="w1")
    core.reserve(T, ["b"], 1, wait=10, waiter_key="w2")
    assert names(core) == ["a", "b"]
    core.tick(T + 5)  # w1 times out: a is unused, b still waited on
    assert names(core) == ["b"]
    core.cancel_wait("w2")
    assert names(core) == []


def test_a_waiter_served_leaves_the_other_queues_it_named() -> None:
    core = Core()
    core.reserve(T, ["a", "b"], 1, wait=5, waiter_key="w")
    core.put(T, "b", [PutSpec(body=b"x")])
    [(key, [message])] = core.take_completions()  # type: ignore[misc]
    assert key == "w" and message.queue.name == "b"
    assert names(core) == ["b"]


def test_settings_other_than_the_defaults_keep_a_queue() -> None:
    core = Core()
    core.configure(T, "q", {"max_attempts": 9})
    core.configure(T, "p", {"paused": True})
    assert names(core) == ["p", "q"]
    core.configure(T, "q", {"max_attempts": 5})  # the default again
    core.configure(T, "p", {"paused": False})
    assert names(core) == []
    assert core.configure(T, "r", {})["max_attempts"] == 5  # answered, then forgotten
    assert names(core) == []


def test_a_schedule_keeps_its_queue_until_unscheduled() -> None:
    core = Core()
    core.set_schedule(T, "q", "tick", parse_spec({"body": b"x", "every": 60}))
    assert names(core) == ["q"]
    assert core.unschedule(T, "q", "tick")
    assert names(core) == []


def test_a_binding_makes_and_keeps_its_queue_until_unbound() -> None:
    core = Core(track_changes=True)
    assert core.bind(T, "orders.*", "audit")
    assert not core.bind(T, "orders.*", "audit")
    assert names(core) == ["audit"]
    core.put(T, "audit", [PutSpec(body=b"x")])
    (message,) = core.reserve(T, ["audit"], 1)
    core.ack(T, [(message.id, message.lease_token)])  # type: ignore[list-item]
    assert names(core) == ["audit"]
    assert core.unbind(T, "orders.*", "audit")
    assert not core.unbind(T, "orders.*", "audit")
    assert names(core) == []


def test_a_binding_past_the_quota_makes_nothing() -> None:
    core = Core(max_queues=0)
    with pytest.raises(Quota):
        core.bind(T, "orders.*", "audit")
    assert core.bindings.listed() == [] and core.queues == {}


def test_a_refused_put_or_schedule_makes_no_queue() -> None:
    core = Core()
    with pytest.raises(TooLarge):
        core.put(T, "q", [PutSpec(body=b"x" * (1024 * 1024 + 1))])
    with pytest.raises(TooLarge):
        core.set_schedule(T, "q", "s", parse_spec({"body": b"x" * (1024 * 1024 + 1), "every": 1}))
    assert core.queues == {}


def test_a_put_of_only_duplicates_into_a_forgotten_queue_leaves_none() -> None:
    core = Core()
    core.put(T, "q", [PutSpec(body=b"x", key="k")])
    (message,) = core.reserve(T, ["q"], 1)
    core.ack(T, [(message.id, message.lease_token)])  # type: ignore[list-item]
    ids = core.put(T, "q", [PutSpec(body=b"x", key="k")])  # within the dedup window
    assert ids == [message.id] and ids.duplicates == [0]
    assert names(core) == []


def test_a_queue_forgotten_and_made_again_in_one_batch_is_stored_as_made() -> None:
    core = Core(track_changes=True)
    core.put(T, "q", [PutSpec(body=b"x")])
    core.take_changes()
    (message,) = core.reserve(T, ["q"], 1)
    core.ack(T, [(message.id, message.lease_token)])  # type: ignore[list-item]
    core.put(T, "q", [PutSpec(body=b"y")])
    changes = core.take_changes()
    assert [queue.name for queue in changes.queues] == ["q"] and changes.forgotten == []
    assert changes.queues[0] is core.queues["q"]


def test_recovery_forgets_stored_queues_that_are_unused() -> None:
    core = Core(track_changes=True)
    core.recover(T, [("old", DEFAULT_SETTINGS, {"put": 3})], [], next_id=1, next_token=1)
    assert core.queues == {}
    assert core.take_changes().forgotten == ["old"]


# ------------------------------------------------------------------- delete_queue


def full_queue(core: Core) -> dict[str, int]:
    """Queue q with one message in each state, a schedule and a binding; the ids."""
    core.put(
        T,
        "q",
        [PutSpec(body=b"r"), PutSpec(body=b"d", delay=60), PutSpec(body=b"l"), PutSpec(body=b"x")],
    )
    core.configure(T, "q", {"max_attempts": 1})
    [first] = core.reserve(T, ["q"], 1)  # the ready one with the lowest seq: ready
    core.nack(T, [(first.id, first.lease_token)])  # type: ignore[list-item]  # dead now
    [held] = core.reserve(T, ["q"], 1)
    core.set_schedule(T, "q", "tick", parse_spec({"body": b"t", "every": 60}))
    core.bind(T, "orders.*", "q")
    return {"dead": first.id, "reserved": held.id, "lease": held.lease_token or 0}


def test_delete_queue_refuses_a_queue_holding_anything_and_changes_nothing() -> None:
    core = Core()
    full_queue(core)
    before = core.stats(T, "q")
    with pytest.raises(BadRequest) as refused:
        core.delete_queue(T, "q")
    assert "force" in refused.value.message
    assert refused.value.details == {
        "ready": 1,
        "delayed": 1,
        "reserved": 1,
        "dead": 1,
        "schedules": 1,
    }
    assert core.stats(T, "q") == before and len(core.schedules) == 1
    core.set_schedule(T, "s", "only", parse_spec({"body": b"t", "every": 60}))
    with pytest.raises(BadRequest):
        core.delete_queue(T, "s")  # a schedule alone refuses too


def test_delete_queue_with_force_drops_everything_and_a_held_lease_is_lost() -> None:
    core = Core(track_changes=True)
    held = full_queue(core)
    core.configure(T, "q", {"paused": True})  # so that a reserve waits on it
    assert core.reserve(T, ["q", "other"], 1, wait=30, waiter_key="w") == []
    core.wait_result(T, held["reserved"], 30, "r")
    core.take_completions()
    core.take_changes()
    deleted = core.delete_queue(T, "q", force=True)
    assert deleted == {"deleted": True, "messages": 4, "schedules": 1, "bindings": 1}
    assert core.queues == {} and core.messages == {} and core.schedules == {}
    assert core.bindings.listed() == []
    assert sorted(core.take_completions(), key=str) == [
        ("r", {"id": held["reserved"], "state": "gone"}),
        ("w", []),
    ]
    with pytest.raises(LeaseLost):
        core.ack(T, [(held["reserved"], held["lease"])])
    assert core.next_deadline() is None
    changes = core.take_changes()
    assert sorted(changes.forgotten) == ["other", "q"]  # other: its waiter went
    assert changes.schedules == {("q", "tick"): None}
    assert all(message.state.value == "gone" for message in changes.messages)
    assert core.configure(T, "q", {"paused": True})["max_attempts"] == 5  # made anew


def test_delete_queue_of_an_idle_configured_queue_and_of_no_queue() -> None:
    core = Core()
    core.configure(T, "q", {"paused": True})
    assert core.delete_queue(T, "q") == {
        "deleted": True,
        "messages": 0,
        "schedules": 0,
        "bindings": 0,
    }
    assert core.queues == {}
    with pytest.raises(NotFound):
        core.delete_queue(T, "q")
