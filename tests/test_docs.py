"""The README's examples run as written (against a real broker), and --help documents
every flag with its environment variable."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from broker._config import parse_config
from tests.conftest import BrokerProcess, start_broker, stop_broker

ROOT = Path(__file__).resolve().parent.parent


def readme_python_blocks(section: str | None = None) -> list[str]:
    """The README's ```python blocks, in order; with ``section``, only those under the
    ``## section`` heading (up to the next ``## ``)."""
    text = (ROOT / "README.md").read_text()
    if section is not None:
        start = text.index(f"\n## {section}\n")
        end = text.find("\n## ", start + 1)
        text = text[start : end if end != -1 else len(text)]
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def run_example(code: str, broker: BrokerProcess) -> str:
    # The examples name the default port; point them at this test's broker instead.
    assert '"127.0.0.1", 7700' in code
    code = code.replace('"127.0.0.1", 7700', f'"{broker.host}", {broker.port}')
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_readme_has_every_example() -> None:
    blocks = readme_python_blocks()
    assert len(blocks) == 8  # each is run by a test below
    assert "from sluice import Client" in blocks[0]
    assert "from sluice import AsyncClient" in blocks[1]
    assert readme_python_blocks("Use it") == blocks[:2]
    assert readme_python_blocks("Recurring schedules") == [blocks[2]]
    assert readme_python_blocks("Rate limits and concurrency caps") == [blocks[3]]
    assert readme_python_blocks("Channels") == [blocks[4]]
    assert readme_python_blocks("Fan-out into queues") == [blocks[5]]
    assert readme_python_blocks("Job events") == [blocks[6]]
    assert readme_python_blocks("Security") == [blocks[7]]


def test_readme_job_events_example_runs_as_written(broker: BrokerProcess) -> None:
    out = run_example(readme_python_blocks("Job events")[0], broker)
    assert out.splitlines() == [
        "[('put', 0), ('reserved', 1), ('nacked', 1), ('reserved', 2), ('acked', 2)]",
        "['reserved', 'nacked', 'reserved', 'acked']",
    ]


def test_readme_sealed_bodies_example_runs_as_written(broker: BrokerProcess) -> None:
    run_example(readme_python_blocks("Security")[0], broker)  # it asserts what it read
    with broker.client() as client:  # the example put, read and acked one message
        assert client.queues() == []  # so nothing is left in it: forgotten


def test_readme_sync_example_runs_as_written(broker: BrokerProcess) -> None:
    out = run_example(readme_python_blocks()[0], broker)
    assert out.splitlines() == [
        "sending b'welcome mail for user 42' attempt 1",
        "0 ready, 1 delayed",
    ]
    with broker.client() as client:
        stats = client.stats("emails")
    assert stats["totals"]["acked"] == 1 and stats["delayed"] == 1


def test_readme_async_example_runs_as_written(broker: BrokerProcess) -> None:
    out = run_example(readme_python_blocks()[1], broker)
    assert out.splitlines() == [
        "made a thumbnail of img-1.png",
        "made a thumbnail of img-2.png",
    ]
    with broker.client() as client:  # both acked: the queue was forgotten
        assert client.queues() == []


def test_readme_channels_example_runs_as_written(broker: BrokerProcess) -> None:
    [code] = readme_python_blocks("Channels")
    out = run_example(code, broker)
    assert out.splitlines() == [
        "1 subscriber",
        "orders.42 b'confirmed'",
        "stock.eu.widget b'3 left'",
    ]
    with broker.client() as client:
        assert client.stats("emails")["ready"] == 1


def test_readme_fanout_example_runs_as_written(broker: BrokerProcess) -> None:
    [code] = readme_python_blocks("Fan-out into queues")
    out = run_example(code, broker)
    assert out.splitlines() == [
        "3 queues, 0 subscribers",
        "2 queues",
        "billing [b'refund order 42', b'order 43 paid']",
        "emails [b'refund order 42', b'order 43 paid']",
        "audit [b'refund order 42']",
        "[('orders.*.refund', 'audit'), ('orders.>', 'billing'), ('orders.>', 'emails')]",
    ]


def test_readme_schedules_example_runs_as_written(broker: BrokerProcess) -> None:
    [code] = readme_python_blocks("Recurring schedules")
    out = run_example(code, broker)
    assert out.splitlines() == [
        "next digest at 09:00 New York time",
        "True digest",
        "3 pings, one per slot",
        "True",
    ]
    with broker.client() as client:
        [ping] = client.schedules()  # the digest was removed
        health = client.stats("health")["totals"]
    assert (ping["name"], ping["runs"], ping["next_at"]) == ("ping", 3, None)
    assert health["put"] == health["acked"] == 3


def test_readme_rate_limit_example_runs_as_written(broker: BrokerProcess) -> None:
    [code] = readme_python_blocks("Rate limits and concurrency caps")
    first, timed = run_example(code, broker).splitlines()
    assert first == "3 reserved, then 0"  # the cap, whatever the time
    took = re.fullmatch(r"the other 17 took (\d+\.\d) s", timed)
    assert took is not None, timed
    # 7 tokens were left of the burst of 10; the other 10 come one every 0.2 s.
    assert 1.8 <= float(took.group(1)) <= 5.0
    with broker.client() as client:  # all acked and both limits off: forgotten
        assert client.queues() == []


def test_help_names_every_flag_and_its_environment_variable() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "broker", "--help"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0
    for flag in ("--host", "--port", "--data-dir", "--log-level", "--max-frame", "--auth-token"):
        assert flag in done.stdout
    assert "SLUICE_" in done.stdout
    assert "sluice listening on HOST:PORT" in done.stdout


def test_environment_variable_sets_a_flag_and_the_command_line_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLUICE_PORT", "7811")
    assert parse_config([]).port == 7811
    assert parse_config(["--port", "7812"]).port == 7812


def usage_error(*flags: str, env: dict[str, str] | None = None) -> str:
    """The broker's stderr for ``flags`` (and ``env``) it must refuse as a usage error
    (exit 2)."""
    done = subprocess.run(
        [sys.executable, "-m", "broker", *flags],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 2
    return done.stderr


def test_bad_flag_value_is_a_usage_error_that_says_why() -> None:
    assert "port must be 0-65535" in usage_error("--port", "70000")


def test_background_sync_takes_three_choices_from_the_flag_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert parse_config([]).background_sync == "auto"
    monkeypatch.setenv("SLUICE_BACKGROUND_SYNC", "off")
    assert parse_config([]).background_sync == "off"
    assert parse_config(["--background-sync", "on"]).background_sync == "on"
    refused = usage_error("--background-sync", "sometimes")
    assert "argument --background-sync: invalid choice: 'sometimes'" in refused
    assert "'auto', 'on', 'off'" in refused


@pytest.mark.parametrize(
    ("variable", "choices"),
    [("SLUICE_BACKGROUND_SYNC", "'auto', 'on', 'off'"), ("SLUICE_FSYNC", "'always', 'interval'")],
)
def test_a_choice_from_the_environment_is_checked_as_the_flag_is(
    variable: str, choices: str
) -> None:
    refused = usage_error("--in-memory", "--port", "0", env={variable: "sometimes"})
    assert f"{variable}: invalid choice: 'sometimes'" in refused
    assert choices in refused


def readme_api_examples() -> tuple[str, str]:
    """The README's block of curl examples, and its one example of an error."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## HTTP admin API") :]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    commands = next(block for block in blocks if "/api/v1" in block)
    error = re.findall(r"```text\n(\$ curl .*?)```", section, re.DOTALL)[0]
    return commands, error


def run_curl(script: str, broker: BrokerProcess) -> list[str]:
    script = script.replace("http://127.0.0.1:7701", broker.http)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env={"PATH": "/usr/bin:/bin", "SLUICE_AUTH_TOKEN": API_TOKEN},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


API_TOKEN = "docs-token"


def test_readme_curl_examples_run_as_written(tmp_path: Path) -> None:
    running = start_broker(tmp_path / "broker.log", "--auth-token", API_TOKEN, http=True)
    try:
        with running.client(auth_token=API_TOKEN) as client:
            client.put_many("emails", [b"first", b"second"])  # ids 1 and 2
            client.put("emails", b"urgent", priority=9)  # id 3, reserved first, then dead
            (urgent,) = client.reserve("emails")
            client.bury(urgent, reason="bad address")
            commands, error = readme_api_examples()
            lines = run_curl(commands, running)
            answers = [json.loads(line) for line in lines]
            assert len(answers) == commands.count("curl ")
            assert [answer for answer in answers if "code" in answer] == []  # no errors
            assert {"replayed": 1} in answers and {"cancelled": True} in answers
            assert answers[-2:] == [{"purged": 0}, {"purged": 2}]  # dead, then ready
            assert client.configure("emails")["max_attempts"] == 10
            command, expected = error.removeprefix("$ ").strip().split("\n")
            assert run_curl(command, running) == [expected]
    finally:
        stop_broker(running)
