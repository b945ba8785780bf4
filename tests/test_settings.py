"""Queue settings and retry backoff: validation and the delay formula."""

from __future__ import annotations

import math

import pytest

from broker import Backoff, QueueSettings
from protocol import BadRequest


def test_exponential_backoff_doubles_from_base_without_jitter_at_midpoint() -> None:
    backoff = Backoff(base=1.0, factor=2.0, cap=600.0, jitter=0.1)
    assert [backoff.delay(attempt, 0.5) for attempt in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]


def test_jitter_stays_within_its_band() -> None:
    backoff = Backoff(base=10.0, jitter=0.1)
    assert backoff.delay(1, 0.0) == pytest.approx(9.0)
    assert backoff.delay(1, 0.999999) == pytest.approx(11.0, rel=1e-5)


def test_cap_holds_after_jitter() -> None:
    backoff = Backoff(base=1.0, factor=2.0, cap=600.0, jitter=0.1)
    assert backoff.delay(11, 0.999999) == 600.0  # 1024 s with +10% jitter, capped
    assert backoff.delay(10, 0.999999) == pytest.approx(563.2, rel=1e-5)  # 512 s +10%


@pytest.mark.parametrize("attempts", [160, 1_000, 10**6, 2**31 - 1])
def test_steep_backoff_never_overflows(attempts: int) -> None:
    backoff = Backoff(base=1.0, factor=100.0, cap=5.0, jitter=0.1)
    delay = backoff.delay(attempts, 0.3)
    assert math.isfinite(delay) and delay == 5.0


def test_fixed_backoff_ignores_attempts_and_defaults_to_no_jitter() -> None:
    backoff = Backoff.from_wire({"type": "fixed", "delay": 3})
    assert [backoff.delay(attempt, 0.9) for attempt in (1, 5, 50)] == [3.0, 3.0, 3.0]
    assert backoff.to_wire() == {"type": "fixed", "delay": 3.0, "jitter": 0.0}


def test_backoff_numbers_come_back_as_floats_whatever_came_in() -> None:
    wire = Backoff.from_wire({"type": "exponential", "base": 2, "factor": 3, "cap": 60}).to_wire()
    assert wire == {"type": "exponential", "base": 2.0, "factor": 3.0, "cap": 60.0, "jitter": 0.1}
    assert all(type(wire[key]) is float for key in ("base", "factor", "cap", "jitter"))


@pytest.mark.parametrize(
    "wire",
    [
        "fast",
        {"type": "linear"},
        {"type": "exponential", "factor": 0.5},
        {"type": "exponential", "base": -1},
        {"type": "exponential", "jitter": 2},
        {"type": "fixed", "delay": float("nan")},
        {"type": "fixed", "delay": True},
        {"type": "fixed", "factor": 2},
        {1: "a", "type": "fixed"},
    ],
)
def test_bad_backoff_is_a_bad_request(wire: object) -> None:
    with pytest.raises(BadRequest):
        Backoff.from_wire(wire)


@pytest.mark.parametrize(
    "changes",
    [
        {"visibility_timeout": 0},
        {"max_attempts": 0},
        {"max_attempts": 1.5},
        {"paused": 1},
        {"max_body": 0},
        {"dead_letter_ttl": 0},
        {"colour": "blue"},
        [("paused", True)],
    ],
)
def test_bad_settings_are_a_bad_request(changes: object) -> None:
    with pytest.raises(BadRequest):
        QueueSettings().updated(changes)


def test_settings_update_is_all_or_nothing_and_none_means_unlimited() -> None:
    settings = QueueSettings().updated({"max_attempts": None, "dead_letter_ttl": None})
    assert settings.max_attempts is None and settings.dead_letter_ttl is None
    with pytest.raises(BadRequest):
        settings.updated({"max_attempts": 3, "paused": "yes"})
    assert settings.max_attempts is None


def test_a_hostile_value_gives_a_short_error_text() -> None:
    nested: object = []
    for _ in range(5000):
        nested = [nested]
    with pytest.raises(BadRequest) as raised:
        QueueSettings().updated({"visibility_timeout": nested})
    assert len(str(raised.value)) < 200
