"""Recurring schedules in the core, driven by a fake clock: slots, DST, catch-up, overlap,
limits, triggers, replacing, and bad specs."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from broker import Core
from broker._lifecycle import State
from broker._schedules import MAX_CATCHUP, MAX_COUNTED, Schedule, parse_spec, slot_text
from protocol import BadRequest, NotFound, TooLarge

START = 1_800_000_000.0  # 2027-01-15T08:00:00Z, on a whole minute


def spec(**fields: Any) -> Any:
    return parse_spec({"body": b"tick", **fields})


def run(core: Core, until: float) -> list[float]:
    """Tick the core at each deadline up to ``until``, as the server's timer does; the
    scheduled_for slot of every message it put, in order."""
    while (deadline := core.next_deadline()) is not None and deadline <= until:
        core.tick(deadline)
    core.tick(until)
    return fired(core)


def fired(core: Core) -> list[float]:
    slots = []
    for message in sorted(core.messages.values(), key=lambda m: m.id):
        when = message.headers["scheduled_for"]  # type: ignore[index]
        slots.append(
            datetime.strptime(when, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
        )
    return slots


def local(zone: str, *fields: int, fold: int = 0) -> float:
    return datetime(*fields, tzinfo=ZoneInfo(zone), fold=fold).timestamp()  # type: ignore[misc]


# ------------------------------------------------------------------ every


def test_every_fires_on_its_slots_with_a_dedup_key_and_headers() -> None:
    core = Core()
    wire = core.set_schedule(START, "jobs", "tick", spec(every=0.2, headers={"team": "ops"}))
    assert wire["next_at"] == START + 0.2
    assert core.next_deadline() == START + 0.2
    assert run(core, START + 1.0) == pytest.approx([START + k * 0.2 for k in range(1, 6)])
    first = min(core.messages.values(), key=lambda m: m.id)
    when = slot_text(START + 0.2)
    assert first.key == f"schedule:tick:{when}"
    assert first.headers == {"team": "ops", "schedule": "tick", "scheduled_for": when}
    [listed] = core.list_schedules(START + 1.0)
    assert (listed["runs"], listed["last_slot"], listed["missed"]) == (5, START + 1.0, 0)
    assert listed["last_message_id"] == max(core.messages)


def test_every_from_a_start_at_fires_at_the_start_and_stops_after_end_at() -> None:
    core = Core()
    core.set_schedule(START, "q", "s", spec(every=10, start_at=START + 5, end_at=START + 30))
    assert run(core, START + 100) == [START + 5, START + 15, START + 25]
    assert core.list_schedules(START + 100)[0]["next_at"] is None


def test_limit_fires_that_many_times() -> None:
    core = Core()
    core.set_schedule(START, "q", "s", spec(every=1, limit=3))
    assert len(run(core, START + 10)) == 3
    [listed] = core.list_schedules(START + 10)
    assert listed["runs"] == 3 and listed["next_at"] is None


def test_a_paused_queue_still_fires_and_its_messages_wait() -> None:
    core = Core()
    core.configure(START, "q", {"paused": True})
    core.set_schedule(START, "q", "s", spec(every=1))
    assert len(run(core, START + 3)) == 3
    assert core.reserve(START + 3, ["q"], 10) == []


# ------------------------------------------------------------------- cron


def test_cron_in_utc_and_the_aliases() -> None:
    core = Core()
    core.set_schedule(START, "q", "five", spec(cron="*/5 * * * *"))
    core.set_schedule(START, "q", "hourly", spec(cron="@hourly"))
    slots = run(core, START + 3600)
    assert slots.count(START + 3600) == 2  # both, on the hour
    assert sorted(set(slots)) == [START + 300 * k for k in range(1, 13)]


@pytest.mark.parametrize(
    ("zone", "spring", "autumn"),
    [
        ("Europe/Berlin", (2027, 3, 28), (2027, 10, 31)),
        ("America/New_York", (2027, 3, 14), (2027, 11, 7)),
    ],
)
def test_a_daily_0230_job_across_both_dst_changes(
    zone: str, spring: tuple[int, int, int], autumn: tuple[int, int, int]
) -> None:
    core = Core()
    begin = local(zone, *spring, 0, 0) - 86400
    core.set_schedule(begin, "q", "nightly", spec(cron="30 2 * * *", tz=zone))
    slots = run(core, begin + 4 * 86400)
    day = [datetime.fromtimestamp(slot, ZoneInfo(zone)) for slot in slots]
    # 02:30 does not exist on the spring day: it fires at 03:00, the first valid minute.
    assert [(d.day, d.hour, d.minute) for d in day] == [
        (spring[2] - 1, 2, 30),
        (spring[2], 3, 0),
        (spring[2] + 1, 2, 30),
        (spring[2] + 2, 2, 30),
    ]
    core = Core()
    begin = local(zone, *autumn, 0, 0) - 86400
    core.set_schedule(begin, "q", "nightly", spec(cron="30 2 * * *", tz=zone))
    slots = run(core, begin + 3 * 86400)
    assert len(slots) == 3 == len(set(slots))
    # Each day once, 24 hours apart but for the day the clocks went back.
    assert slots[0] == local(zone, autumn[0], autumn[1], autumn[2] - 1, 2, 30)
    assert slots[1] == local(zone, *autumn, 2, 30)


@pytest.mark.parametrize(
    ("zone", "day", "twice"),
    [("Europe/Berlin", (2027, 10, 31), 2), ("America/New_York", (2027, 11, 7), 1)],
)
def test_a_local_time_that_happens_twice_fires_once(
    zone: str, day: tuple[int, int, int], twice: int
) -> None:
    core = Core()
    begin = local(zone, *day, 0, 0)
    core.set_schedule(begin, "q", "s", spec(cron=f"30 {twice} * * *", tz=zone))
    slots = run(core, begin + 86400)
    assert slots == [local(zone, *day, twice, 30, fold=0)]  # the first of the two


@pytest.mark.parametrize(
    ("zone", "day", "gap"),
    [("Europe/Berlin", (2027, 3, 28), 2), ("America/New_York", (2027, 3, 14), 2)],
)
def test_a_local_time_that_does_not_exist_fires_at_the_first_valid_instant_after(
    zone: str, day: tuple[int, int, int], gap: int
) -> None:
    core = Core()
    begin = local(zone, *day, 0, 0)
    core.set_schedule(begin, "q", "s", spec(cron=f"15 {gap} * * *", tz=zone))
    [slot] = run(core, begin + 12 * 3600)
    assert slot == local(zone, *day, gap + 1, 0)


# --------------------------------------------------------------- catch-up


def down_for(catchup: str, seconds: float, **fields: Any) -> tuple[Core, dict[str, Any]]:
    """A schedule every 10 s made at START, and a broker that was down from START + 1
    until START + seconds: recovered from the schedule's persisted state."""
    before = Core()
    before.set_schedule(START, "q", "s", spec(every=10, catchup=catchup, **fields))
    old = before.schedules[("q", "s")]
    restored = Schedule.restored("q", "s", old.spec, old.created_at, old.state())
    core = Core()
    now = START + seconds
    core.recover(now, [], [], next_id=1, next_token=1, schedules=[restored])
    return core, core.list_schedules(now)[0]


def test_catchup_latest_fires_the_newest_missed_slot_once() -> None:
    core, listed = down_for("latest", 55)
    assert fired(core) == [START + 50]
    assert (listed["missed"], listed["skipped"], listed["runs"]) == (5, 4, 1)
    assert listed["next_at"] == START + 60


def test_catchup_skip_fires_nothing_and_goes_on_from_now() -> None:
    core, listed = down_for("skip", 55)
    assert fired(core) == []
    assert (listed["missed"], listed["skipped"], listed["next_at"]) == (5, 5, START + 60)


def test_catchup_all_fires_each_missed_slot_in_order() -> None:
    core, listed = down_for("all", 55)
    assert fired(core) == [START + 10 * k for k in range(1, 6)]
    assert (listed["missed"], listed["skipped"], listed["runs"]) == (5, 0, 5)


def test_catchup_all_fires_at_most_the_newest_thousand() -> None:
    core, listed = down_for("all", 10 * 5000 + 5)
    slots = fired(core)
    assert len(slots) == MAX_CATCHUP
    assert slots[-1] == START + 50000 and slots[0] == START + 10 * (5001 - MAX_CATCHUP)
    assert (listed["missed"], listed["skipped"]) == (5000, 5000 - MAX_CATCHUP)


def test_catchup_counts_a_dense_cron_down_for_months_without_stalling() -> None:
    before = Core()
    before.set_schedule(START, "q", "s", spec(cron="* * * * *", catchup="all"))
    old = before.schedules[("q", "s")]
    core = Core()
    now = START + 90 * 86400
    core.recover(
        now,
        [],
        [],
        next_id=1,
        next_token=1,
        schedules=[Schedule.restored("q", "s", old.spec, old.created_at, old.state())],
    )
    slots = fired(core)
    assert len(slots) == MAX_CATCHUP and slots[-1] == START + 90 * 86400
    assert core.list_schedules(now)[0]["missed"] == MAX_COUNTED  # counted up to the bound


@pytest.mark.parametrize(("catchup", "fires"), [("skip", []), ("latest", [10]), ("all", [10])])
def test_one_slot_missed_while_down_is_caught_up_as_configured(
    catchup: str, fires: list[int]
) -> None:
    core, listed = down_for(catchup, 15)  # the slot at 10 s came due while down
    assert fired(core) == [START + k for k in fires]
    assert (listed["missed"], listed["skipped"]) == (1, 1 - len(fires))


def test_catchup_all_of_a_sparse_cron_down_for_long_still_fires_the_newest_thousand() -> None:
    before = Core()
    before.set_schedule(START, "q", "s", spec(cron="*/5 * * * *", catchup="all"))
    old = before.schedules[("q", "s")]
    core = Core()
    now = START + 60 * 86400  # 17,280 slots missed: more than are counted one by one
    restored = Schedule.restored("q", "s", old.spec, old.created_at, old.state())
    core.recover(now, [], [], next_id=1, next_token=1, schedules=[restored])
    slots = fired(core)
    assert len(slots) == MAX_CATCHUP and slots[-1] == now
    assert slots == [now - 300 * k for k in range(MAX_CATCHUP - 1, -1, -1)]


def test_catchup_respects_the_limit() -> None:
    core, listed = down_for("all", 55, limit=2)
    assert len(fired(core)) == 2 and listed["next_at"] is None


# ---------------------------------------------------------------- overlap


def test_overlap_skip_waits_for_the_last_message_to_be_done() -> None:
    core = Core()
    core.set_schedule(START, "q", "s", spec(every=1, overlap="skip"))
    assert len(run(core, START + 3)) == 1  # the first is still ready: two skipped
    [message] = core.reserve(START + 3, ["q"], 1)
    assert len(run(core, START + 4)) == 1  # reserved: still skipped
    core.ack(START + 4.5, [(message.id, message.lease_token)])  # type: ignore[list-item]
    assert run(core, START + 5) == [START + 5]  # done: the next slot fires
    listed = core.list_schedules(START + 5)[0]
    assert (listed["runs"], listed["skipped"]) == (2, 3)


# --------------------------------------------------- trigger, replace, remove


def test_trigger_fires_now_outside_the_slots() -> None:
    core = Core()
    core.set_schedule(START, "q", "s", spec(cron="@yearly", overlap="skip"))
    first = core.trigger(START + 1, "q", "s")
    second = core.trigger(START + 2, "q", "s")  # a trigger ignores overlap
    assert fired(core) == [START + 1, START + 2]
    assert core.messages[first].state is State.READY and second != first
    listed = core.list_schedules(START + 2)[0]
    assert (listed["triggered"], listed["runs"], listed["last_message_id"]) == (2, 0, second)
    with pytest.raises(NotFound, match="no schedule 'nope' on queue 'q'"):
        core.trigger(START, "q", "nope")


def test_replacing_a_schedule_never_fires_a_slot_again() -> None:
    core = Core()
    core.set_schedule(START, "q", "s", spec(cron="* * * * *"))
    run(core, START + 120)
    core.set_schedule(START + 120, "q", "s", spec(cron="*/2 * * * *", body=b"new"))
    slots = run(core, START + 360)
    assert slots == [START + 60, START + 120, START + 240, START + 360]
    assert core.list_schedules(START + 360)[0]["runs"] == 4


def test_a_slot_fired_twice_puts_one_message() -> None:
    core = Core()
    core.set_schedule(START, "q", "s", spec(every=60, start_at=START + 60))
    run(core, START + 60)
    schedule = core.schedules[("q", "s")]
    schedule.last_slot = None  # as if the fire had been lost but its message kept
    schedule.next_at = START + 60
    core._schedule_due.push((START + 60, schedule.seq, schedule.key))
    run(core, START + 61)
    assert fired(core) == [START + 60]


def test_unschedule_stops_it_and_keeps_its_messages() -> None:
    core = Core()
    core.set_schedule(START, "q", "s", spec(every=1))
    run(core, START + 2)
    assert core.unschedule(START + 2, "q", "s") is True
    assert core.unschedule(START + 2, "q", "s") is False
    assert len(run(core, START + 10)) == 2 and core.next_deadline() is None


def test_a_body_over_the_queues_max_body_is_refused() -> None:
    core = Core()
    core.configure(START, "q", {"max_body": 3})
    with pytest.raises(TooLarge):
        core.set_schedule(START, "q", "s", spec(every=1))
    assert core.list_schedules(START) == []


# -------------------------------------------------------------- bad specs


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({}, "exactly one of cron or every"),
        ({"cron": "* * * * *", "every": 5}, "exactly one of cron or every"),
        ({"cron": "61 * * * *"}, "bad minute"),
        ({"cron": "0 25 * * *"}, "bad hour"),
        ({"cron": "0 0 32 * *"}, "bad day-of-month"),
        ({"cron": "0 0 * 13 *"}, "bad month"),
        ({"cron": "0 0 * * 9"}, "bad day-of-week"),
        ({"cron": "* * * *"}, "5 fields"),
        ({"cron": "0 * * * * *"}, "5 fields"),
        ({"cron": "@fortnightly"}, "unknown alias"),
        ({"cron": 5}, "cron must be a string"),
        ({"cron": "@daily", "tz": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ({"every": 5, "tz": 3}, "tz must be an IANA time zone"),
        ({"every": 0.05}, "every must be in"),
        ({"every": "5"}, "every must be a number"),
        ({"every": 5, "start_at": START, "end_at": START - 1}, "end_at .* is before start_at"),
        ({"every": 5, "catchup": "some"}, "catchup must be one of latest, skip, all"),
        ({"every": 5, "overlap": "never"}, "overlap must be one of allow, skip"),
        ({"every": 5, "limit": 0}, "limit must be an integer"),
        ({"every": 5, "priority": 2**40}, "priority must be an integer"),
        ({"every": 5, "start_at": "soon"}, "start_at .* must be a number"),
    ],
)
def test_bad_specs_are_refused_naming_the_field(fields: dict[str, Any], says: str) -> None:
    with pytest.raises(BadRequest, match=says):
        spec(**fields)
