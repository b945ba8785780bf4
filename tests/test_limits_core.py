"""Rate limits and concurrency caps in the core, with a fake clock: the bucket bound over
every window, the cap, parked long-polls served when a token comes due, and bad settings."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import Core, PutSpec
from broker._limits import Bucket, RateLimit
from protocol import BadRequest

START = 1_000.0
SLACK = 1e-6  # seconds of float rounding allowed at a window's ends


def limited_core(name: str = "q", **limits: Any) -> Core:
    core = Core()
    core.configure(START, name, limits)
    return core


def put(core: Core, now: float, count: int, name: str = "q") -> None:
    core.put(now, name, [PutSpec(body=b"x") for _ in range(count)])


def within_bound(times: list[float], limit: RateLimit) -> bool:
    """Every window [t_i, t_j] of delivery times holds at most burst + rate*T/per."""
    times = sorted(times)
    for i, j in itertools.combinations_with_replacement(range(len(times)), 2):
        allowed = limit.burst + limit.rate * (times[j] - times[i] + SLACK) / limit.per
        if j - i + 1 > allowed:
            return False
    return True


# ------------------------------------------------------------------ bucket


def test_a_bucket_starts_full_and_refills_one_token_per_interval() -> None:
    bucket = Bucket(RateLimit(rate=2.0, per=1.0, burst=3), START)
    assert bucket.available(START) == 3
    bucket.take(3)
    assert bucket.available(START) == 0
    assert bucket.next_token_at(START) == START + 0.5
    assert bucket.available(START + 0.4999) == 0
    assert bucket.available(START + 0.5) == 1
    assert bucket.available(START + 100) == 3  # never more than the burst


@given(
    rate=st.sampled_from([0.3, 1.0, 3.0, 7.0, 50.0]),
    per=st.sampled_from([0.1, 1.0, 2.5]),
    start=st.floats(0, 1e9),
    steps=st.lists(st.floats(0, 2.0), min_size=1, max_size=30),
)
def test_the_next_token_is_counted_at_exactly_its_time(
    rate: float, per: float, start: float, steps: list[float]
) -> None:
    bucket = Bucket(RateLimit(rate=rate, per=per, burst=2), start)
    now = start
    for step in steps:
        now += step
        bucket.take(bucket.available(now))
        due = bucket.next_token_at(now)
        assert due > now
        assert bucket.available(due) == 1  # at its time, not a rounding error later


# --------------------------------------------------------- the window bound

workloads = st.lists(
    st.tuples(
        st.sampled_from(["put", "reserve", "wait", "ack", "advance"]),
        st.integers(1, 6),
        st.floats(0.0, 1.5),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=300)
@given(
    rate=st.sampled_from([1.0, 2.0, 5.0, 13.0]),
    per=st.sampled_from([0.5, 1.0, 3.0]),
    burst=st.integers(1, 8),
    cap=st.none() | st.integers(1, 5),
    workload=workloads,
)
def test_deliveries_stay_within_the_bucket_and_the_cap(
    rate: float, per: float, burst: int, cap: int | None, workload: list[tuple[str, int, float]]
) -> None:
    limit = RateLimit(rate, per, burst)
    core = limited_core(rate_limit=limit.to_wire(), max_in_flight=cap)
    now, keys, held, times = START, itertools.count(), [], []

    def took(messages: list[Any]) -> None:
        held.extend(messages)
        times.extend(m.since for m in messages)

    for action, count, step in workload:
        now += step
        if action == "put":
            put(core, now, count)
        elif action == "reserve":
            took(core.reserve(now, ["q"], count))
        elif action == "wait":
            took(core.reserve(now, ["q"], count, wait=5.0, waiter_key=next(keys)))
        elif action == "ack" and held:
            done, held[:] = held[:count], held[count:]
            core.ack(now, [(m.id, m.lease_token) for m in done])
        else:
            core.tick(now)
        for _, messages in core.take_completions():
            took(messages)  # type: ignore[arg-type]
        reserved = core.stats(now, "q")["reserved"]
        assert cap is None or reserved <= cap
    assert within_bound(times, limit)


def test_a_greedy_consumer_gets_the_burst_then_the_rate() -> None:
    core = limited_core(rate_limit={"rate": 10, "per": 1, "burst": 5})
    put(core, START, 100)
    times = []
    now = START
    while now < START + 3.0:
        times += [m.since for m in core.reserve(now, ["q"], 100)]
        now += 0.01
    # 5 at once, then one every 0.1 s for 3 s: 5 + 29 or 30 (the clock steps by 0.01).
    assert 5 + 29 <= len(times) <= 5 + 30
    assert within_bound(times, RateLimit(10.0, 1.0, 5))


# ------------------------------------------------------------ long-polls


def test_a_parked_reserve_is_served_when_the_next_token_comes_due() -> None:
    core = limited_core(rate_limit={"rate": 1, "per": 2, "burst": 1})
    put(core, START, 3)
    assert len(core.reserve(START, ["q"], 1)) == 1
    assert core.reserve(START, ["q"], 1, wait=30.0, waiter_key="w") == []
    assert core.next_deadline() == START + 2.0  # the token, not the wait's deadline
    core.tick(START + 1.999)
    assert core.take_completions() == []
    core.tick(START + 2.0)
    [(key, messages)] = core.take_completions()
    assert key == "w" and len(messages) == 1  # type: ignore[arg-type]
    assert messages[0].since == START + 2.0  # type: ignore[index]


def test_a_refill_wakes_only_as_many_waiters_as_it_has_tokens() -> None:
    core = limited_core(rate_limit={"rate": 1, "per": 1, "burst": 3})
    put(core, START, 10)
    assert len(core.reserve(START, ["q"], 3)) == 3
    for key in ("first", "second", "third", "fourth"):
        assert core.reserve(START, ["q"], 1, wait=30.0, waiter_key=key) == []
    core.tick(START + 1.0)
    assert [(k, len(m)) for k, m in core.take_completions()] == [("first", 1)]
    core.tick(START + 3.0)  # a late tick: two tokens came due, two waiters go, in order
    assert [(k, len(m)) for k, m in core.take_completions()] == [("second", 1), ("third", 1)]
    assert core.next_deadline() == START + 4.0
    core.tick(START + 4.0)
    assert [(k, len(m)) for k, m in core.take_completions()] == [("fourth", 1)]
    assert core.next_deadline() == START + 30.0  # the first leases run out; no token timer


def test_a_parked_reserve_on_an_empty_limited_queue_waits_for_a_put_not_a_token() -> None:
    core = limited_core(rate_limit={"rate": 1, "per": 1, "burst": 1})
    assert core.reserve(START, ["q"], 1, wait=10.0, waiter_key="w") == []
    assert core.next_deadline() == START + 10.0
    put(core, START + 1, 1)
    [(key, messages)] = core.take_completions()
    assert key == "w" and len(messages) == 1  # type: ignore[arg-type]


def test_a_multi_queue_reserve_skips_a_queue_out_of_tokens() -> None:
    core = limited_core("limited", rate_limit={"rate": 1, "per": 60, "burst": 1})
    core.put(START, "limited", [PutSpec(body=b"hi", priority=9) for _ in range(3)])
    core.put(START, "free", [PutSpec(body=b"lo") for _ in range(3)])
    first = core.reserve(START, ["limited", "free"], 4)
    assert [m.queue.name for m in first] == ["limited", "free", "free", "free"]
    assert core.stats(START, "limited")["limits"]["tokens"] == 0


def test_a_paused_limited_queue_arms_no_timer() -> None:
    core = limited_core(rate_limit={"rate": 1, "per": 1, "burst": 1}, paused=True)
    put(core, START, 2)
    core.reserve(START, ["q"], 1, wait=5.0, waiter_key="w")
    assert core.next_deadline() == START + 5.0
    core.configure(START + 1, "q", {"paused": False})  # resumed: a token is there
    assert [(k, len(m)) for k, m in core.take_completions()] == [("w", 1)]


# ------------------------------------------------------------------ the cap


def test_max_in_flight_caps_reserved_messages_and_an_ack_lets_a_waiter_go_on() -> None:
    core = limited_core(max_in_flight=2)
    put(core, START, 5)
    held = core.reserve(START, ["q"], 5)
    assert len(held) == 2
    assert core.reserve(START, ["q"], 1, wait=10.0, waiter_key="w") == []
    assert core.next_deadline() == START + 10.0  # the wait's own end: a cap needs no timer
    core.ack(START + 1, [(held[0].id, held[0].lease_token)])  # type: ignore[list-item]
    assert [(k, len(m)) for k, m in core.take_completions()] == [("w", 1)]
    assert core.stats(START + 1, "q")["reserved"] == 2


@pytest.mark.parametrize("ending", ["nack", "bury", "expire"])
def test_every_way_a_lease_ends_frees_a_place_under_the_cap(ending: str) -> None:
    core = limited_core(max_in_flight=1, visibility_timeout=5.0)
    put(core, START, 2)
    [held] = core.reserve(START, ["q"], 1)
    core.reserve(START, ["q"], 1, wait=30.0, waiter_key="w")
    assert held.lease_token is not None
    if ending == "nack":
        core.nack(START + 1, [(held.id, held.lease_token)], delay=60)
    elif ending == "bury":
        core.bury(START + 1, held.id, held.lease_token, "bad")
    else:
        core.tick(START + 5)
    [(key, messages)] = core.take_completions()
    assert key == "w" and len(messages) == 1  # type: ignore[arg-type]


def test_removing_the_limits_serves_parked_waiters() -> None:
    core = limited_core(rate_limit={"rate": 1, "per": 60, "burst": 1}, max_in_flight=1)
    put(core, START, 3)
    core.reserve(START, ["q"], 1)
    core.reserve(START, ["q"], 2, wait=30.0, waiter_key="w")
    core.configure(START + 1, "q", {"rate_limit": None, "max_in_flight": None})
    assert [(k, len(m)) for k, m in core.take_completions()] == [("w", 2)]
    assert "limits" not in core.stats(START + 1, "q")


# ------------------------------------------------------------- stats


def test_stats_show_tokens_in_flight_throttled_time_and_parked_reserves() -> None:
    core = limited_core(rate_limit={"rate": 1, "per": 10, "burst": 2}, max_in_flight=5)
    put(core, START, 5)
    core.reserve(START, ["q"], 5)  # two tokens: held back from then on
    core.reserve(START + 1, ["q"], 1, wait=30.0, waiter_key="w")
    limits = core.stats(START + 4, "q")["limits"]
    assert limits == {
        "tokens": 0,
        "in_flight": 2,
        "max_in_flight": 5,
        "throttled_seconds": 4.0,
        "parked_by_limit": 1,
    }
    core.tick(START + 10)  # a token: the waiter gets one, the spell ends
    assert core.stats(START + 12, "q")["limits"]["throttled_seconds"] == 10.0


def test_throttled_time_counts_while_any_waiter_stays_parked() -> None:
    core = limited_core(rate_limit={"rate": 1, "per": 1, "burst": 1})
    put(core, START, 10)
    core.reserve(START, ["q"], 1)  # the only token
    core.reserve(START, ["q"], 1, wait=60.0, waiter_key="w0")
    core.reserve(START, ["q"], 1, wait=60.0, waiter_key="w1")
    core.tick(START + 1)  # w0 served, w1 still held back
    assert core.stats(START + 1.5, "q")["limits"]["throttled_seconds"] == 1.5
    core.tick(START + 2)  # w1 served: nobody is held back any more
    assert core.stats(START + 5, "q")["limits"]["throttled_seconds"] == 2.0


# --------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        ({"rate_limit": 5}, "rate_limit must be a map"),
        ({"rate_limit": {}}, "rate_limit needs a rate"),
        ({"rate_limit": {"rate": 0}}, "rate_limit.rate"),
        ({"rate_limit": {"rate": -1}}, "rate_limit.rate"),
        ({"rate_limit": {"rate": "10"}}, "rate_limit.rate must be a number"),
        ({"rate_limit": {"rate": True}}, "rate_limit.rate must be a number"),
        ({"rate_limit": {"rate": 1, "per": 0}}, "rate_limit.per"),
        ({"rate_limit": {"rate": 1, "burst": 0}}, "rate_limit.burst"),
        ({"rate_limit": {"rate": 1, "burst": 1.5}}, "rate_limit.burst"),
        ({"rate_limit": {"rate": 1, "bursts": 2}}, "unknown rate_limit fields"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"max_in_flight": "3"}, "max_in_flight must be an integer"),
    ],
)
def test_bad_limits_are_refused_naming_the_field_and_change_nothing(
    changes: dict[str, Any], names: str
) -> None:
    core = limited_core(rate_limit={"rate": 3})
    with pytest.raises(BadRequest, match=names):
        core.configure(START, "q", changes)
    assert core.configure(START, "q", {})["rate_limit"] == {"rate": 3.0, "per": 1.0, "burst": 3}


def test_limit_defaults_per_one_second_and_a_burst_of_the_rate() -> None:
    core = Core()
    wire = core.configure(START, "q", {"rate_limit": {"rate": 2.5}, "max_in_flight": 4})
    assert wire["rate_limit"] == {"rate": 2.5, "per": 1.0, "burst": 3}
    assert wire["max_in_flight"] == 4
