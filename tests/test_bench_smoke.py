"""The benchmarks still run: tiny sizes, no timing asserted. The bench exits non-zero if
any message was not acked exactly once, so these runs also check that accounting (and
test_bench_harness.py checks that a bad accounting does fail a run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench._load import CLIENT_FORMS
from bench._sluice import broker_has_durable_mode

ROOT = Path(__file__).resolve().parent.parent
EXACTLY_ONCE = "every message delivered and acked exactly once"


@pytest.mark.parametrize(
    ("module", "args", "expected"),
    [
        ("bench.micro_core", ["--messages", "1000", "--repeat", "1"], "put+reserve+ack/s"),
        ("bench.micro_codec", ["--frames", "1000", "--repeat", "1"], "decode whole/s"),
        ("bench.micro_server", ["--jobs", "500", "--repeat", "1"], "µs/request"),
        ("bench.micro_server", ["--jobs", "500", "--repeat", "1", "--long-poll"], "--long-poll"),
        ("bench.micro_server", ["--jobs", "300", "--repeat", "1", "--log"], "--log"),
        ("bench.micro_server", ["--jobs", "300", "--repeat", "1", "--long-poll", "--log"], "--log"),
        ("bench.micro_server", ["--jobs", "300", "--repeat", "1", "--batch", "7"], "--batch 7"),
        ("bench.micro_server", ["--jobs", "2000", "--repeat", "1", "--batch", "1000"], "1000"),
        (
            "bench.micro_server",
            ["--jobs", "300", "--log", "--repeat", "1", "--batch", "9"],
            "--log",
        ),
        ("bench.micro_client", ["--jobs", "500", "--repeat", "1"], "µs/call"),
        ("bench.micro_sync_client", ["--jobs", "500", "--repeat", "1"], "µs/call"),
        ("bench.roundtrip", ["--messages", "300", "--workers", "4"], "acked exactly once"),
    ],
)
def test_benchmark_runs(module: str, args: list[str], expected: str) -> None:
    done = _run("-m", module, *args)
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout


def test_sync_micro_benchmark_measures_each_way_and_leaves_nothing(tmp_path: Path) -> None:
    done = _run("-m", "bench.micro_sync", "--dir", str(tmp_path), "--syncs", "20", "--repeat", "1")
    assert done.returncode == 0, done.stderr
    for way in ("on the thread", "RWF_DSYNC", "a thread", "two at once"):
        assert f"{way}: µs per sync" in done.stdout
        assert f"{way}: µs CPU per sync" in done.stdout
    assert "a thread: µs of hand-off" in done.stdout
    assert list(tmp_path.iterdir()) == []  # its file is gone


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--dir", "/nonexistent-sluice-dir"], "--dir /nonexistent-sluice-dir: not a directory"),
        (["--syncs", "0"], "must be at least 1"),
        (["--syncs", "100000", "--record-size", "4096"], "must be at most 16 MiB"),
    ],
)
def test_sync_micro_benchmark_refuses_bad_options(args: list[str], error: str) -> None:
    done = _run("-m", "bench.micro_sync", *args)
    assert done.returncode == 2
    assert error in done.stderr


@pytest.mark.parametrize("batch", ["0", "-3", "many", "1.5", "1001"])
def test_server_micro_benchmark_refuses_a_batch_the_protocol_does_not_take(batch: str) -> None:
    """From 1 to the protocol's max batch (1,000): above it the put itself is refused."""
    done = _run("-m", "bench.micro_server", "--jobs", "10", "--batch", batch)
    assert done.returncode == 2
    assert f"--batch: expected a whole number from 1 to 1000, got {batch!r}" in done.stderr
    assert "Traceback" not in done.stderr


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def _bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run ``python -m bench`` with ``args`` and --json; the process and the document."""
    path = tmp_path / "bench.json"
    done = _run("-m", "bench", *args, "--json", str(path))
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done, json.loads(path.read_text())


def _only_run(document: dict[str, Any]) -> dict[str, Any]:
    [run] = document["runs"]
    assert run["server"] == "sluice"
    return run


def _assert_exactly_once(run: dict[str, Any], messages: int) -> None:
    assert run["status"] == "ok", run["reasons"]
    accounting = run["exactly_once"]
    assert accounting["ok"] is True
    assert accounting["expected"] == accounting["acks"] == messages
    assert accounting["missing"] == accounting["duplicated"] == accounting["unknown"] == 0


def _assert_client_cpu(stdout: str, figures: dict[str, Any]) -> None:
    """The load processes' CPU per job is in the figures and on the report's line."""
    assert figures["client_cpu_s"] > 0 and figures["client_cpu_us_per_job"] > 0
    assert "client CPU per job" in stdout


@pytest.mark.parametrize("client", list(CLIENT_FORMS))
@pytest.mark.parametrize(
    "args",
    [
        ["--fsync", "memory"],
        [
            *("--batch", "50", "--priorities", "3", "--queues", "2", "--producers", "2"),
            *("--delay-fraction", "0.2", "--delay-seconds", "0.1"),
        ],
    ],
    ids=["unbatched", "batch-50-delayed"],
)
def test_throughput_reports_every_figure(tmp_path: Path, args: list[str], client: str) -> None:
    done, document = _bench(
        tmp_path, "--messages", "300", "--workers", "4", "--client", client, *args
    )
    assert EXACTLY_ONCE in done.stdout
    assert CLIENT_FORMS[client] in done.stdout.splitlines()[0]
    assert document["scenario"] == "throughput" and document["ok"] is True
    workload = document["config"]["workload"]
    assert workload["messages"] == 300 and workload["workers"] == 4
    assert workload["client"] == client
    assert "python" in document["versions"] and document["command"].startswith("python -m")
    run = _only_run(document)
    _assert_exactly_once(run, 300)
    assert "sluice broker" in run["versions"]
    figures = run["figures"]
    for key in ("jobs_per_s", "elapsed_s", "put_per_s", "server_peak_rss_mib"):
        assert figures[key] > 0, key
    _assert_client_cpu(done.stdout, figures)
    # CPU time is counted in clock ticks (10 ms): a 300-message run may take none.
    assert isinstance(figures["server_cpu_s"], float) and figures["server_cpu_s"] >= 0
    for key in ("put_confirm_ms", "put_to_deliver_ms"):
        summary = figures[key]
        assert set(summary) >= {"p50", "p90", "p99", "p99.9", "max", "count"}
        assert summary["p50"] <= summary["p99"] <= summary["max"]
    assert figures["put_to_deliver_ms"]["count"] == 300


def test_sluice_in_another_mode_runs_beside_it(tmp_path: Path) -> None:
    done, document = _bench(tmp_path, "--messages", "200", "--against", "sluice:memory")
    durable, in_memory = document["runs"]
    assert (durable["server"], durable["mode"]) == ("sluice", "fsync always")
    assert (in_memory["server"], in_memory["mode"]) == ("sluice", "memory")
    for run in (durable, in_memory):
        _assert_exactly_once(run, 200)
    assert "sluice/this" in done.stdout  # the comparison table, one row each


@pytest.mark.parametrize("client", list(CLIENT_FORMS))
def test_latency_runs_open_loop(tmp_path: Path, client: str) -> None:
    done, document = _bench(
        tmp_path,
        *("--scenario", "latency", "--rate", "200", "--duration", "1", "--fsync", "memory"),
        *("--client", client),
    )
    assert EXACTLY_ONCE in done.stdout
    run = _only_run(document)
    messages = run["exactly_once"]["expected"]
    assert messages > 0
    _assert_exactly_once(run, messages)
    assert run["figures"]["offered_per_s"] == 200


@pytest.mark.parametrize("client", list(CLIENT_FORMS))
def test_many_workers_keeps_idle_connections(tmp_path: Path, client: str) -> None:
    done, document = _bench(
        tmp_path,
        *("--scenario", "many-workers", "--messages", "300", "--idle-workers", "20"),
        *("--fsync", "memory", "--client", client),
    )
    assert EXACTLY_ONCE in done.stdout
    run = _only_run(document)
    _assert_exactly_once(run, 300)
    assert run["figures"]["idle_workers"] == 20


def test_backlog_fills_then_drains(tmp_path: Path) -> None:
    done, document = _bench(
        tmp_path, "--scenario", "backlog", "--messages", "300", "--fsync", "memory"
    )
    assert EXACTLY_ONCE in done.stdout
    run = _only_run(document)
    _assert_exactly_once(run, 300)
    figures = run["figures"]
    assert figures["fill_per_s"] > 0 and figures["drain_per_s"] > 0
    assert figures["fill_server_rss_mib"] > 0
    _assert_client_cpu(done.stdout, figures)


def test_recovery_restarts_a_killed_broker(tmp_path: Path) -> None:
    done, document = _bench(tmp_path, "--scenario", "recovery", "--messages", "300")
    run = _only_run(document)
    if not broker_has_durable_mode():
        assert run["status"] == "skipped"
        assert "no durable mode" in run["reasons"][0]
        return
    assert EXACTLY_ONCE in done.stdout
    _assert_exactly_once(run, 300)
    figures = run["figures"]
    assert figures["recovered"] == 300
    assert 0 < figures["restart_listening_s"] <= figures["restart_ready_s"]


def test_limited_keeps_every_second_within_the_bucket(tmp_path: Path) -> None:
    """300 messages through a queue limited to 200/s, burst 20, 2 in flight: about 1.4 s
    of draining. The peers have no such limit: each is skipped before it is started."""
    done, document = _bench(
        tmp_path,
        *("--scenario", "limited", "--messages", "300", "--workers", "4", "--fsync", "memory"),
        *("--limit-rate", "200", "--limit-burst", "20", "--max-in-flight", "2"),
        *("--against", "beanstalkd,redis"),
    )
    assert EXACTLY_ONCE in done.stdout
    sluice, *peers = document["runs"]
    assert sluice["server"] == "sluice"
    _assert_exactly_once(sluice, 300)
    assert document["config"]["workload"]["limit"] == {
        "rate": 200.0,
        "per": 1.0,
        "burst": 20,
        "max_in_flight": 2,
    }
    figures = sluice["figures"]
    assert figures["limit_per_s"] == 200 and figures["limit_burst"] == 20
    assert figures["window_bound"] == 220
    assert 0 < figures["busiest_window"] <= figures["window_bound"]
    assert figures["busiest_window_received"] > 0
    assert figures["delivered_windows"] >= 1
    assert figures["delivered_per_s"] > 0 and figures["delivered_ratio"] > 0
    assert figures["overall_ratio"] > 0
    assert figures["throttled_s"] > 0 and figures["parked_by_limit"] >= 0
    assert figures["broker_limits"]["max_in_flight"] == figures["limit_max_in_flight"] == 2
    assert {"tokens", "in_flight"} <= set(figures["broker_limits"])
    for line in ("delivered", "of the limit", "busiest 1 s", "bound", "throttled"):
        assert f"\n  {line} " in done.stdout, line
    assert [run["status"] for run in peers] == ["skipped"] * 6
    assert all("no rate limit" in run["reasons"][0] for run in peers)


@pytest.mark.parametrize(
    ("scenario", "peers", "client"),
    [
        ("throughput", "beanstalkd:off,redis:off", "async"),
        ("throughput", "beanstalkd:off,redis:off", "sync"),
        ("recovery", "beanstalkd:binlog,redis:always", "async"),
        ("recovery", "beanstalkd:binlog,redis:always", "sync"),
    ],
)
def test_peers_run_or_are_skipped(tmp_path: Path, scenario: str, peers: str, client: str) -> None:
    """Each peer either runs the same workload exactly once or says why it was skipped
    (server or client not installed): neither fails the bench. Under ``make test``, which
    installs every peer (SLUICE_TEST_PEERS=required), each must run."""
    done, document = _bench(
        tmp_path,
        *("--scenario", scenario, "--messages", "200", "--against", peers, "--client", client),
    )
    runs = {run["server"]: run for run in document["runs"]}
    assert set(runs) == {"sluice", "beanstalkd", "redis"}
    required = os.environ.get("SLUICE_TEST_PEERS") == "required"
    for name, run in runs.items():
        if run["status"] == "skipped":
            assert not required, f"{name} was skipped: {run['reasons']}"
            assert name == "sluice" or "install" in run["reasons"][0]
            continue
        _assert_exactly_once(run, 200)
        assert run["figures"]["client_cpu_us_per_job"] > 0
        if scenario == "recovery":
            assert run["figures"]["recovered"] == 200
    if client == "sync" and runs["beanstalkd"]["status"] == "ok":
        assert "greenstalk python client" in runs["beanstalkd"]["versions"]
    header = next(line for line in done.stdout.splitlines() if "sluice/this" in line)
    assert "client µs/job" in header


def test_bad_options_are_refused_with_the_fix() -> None:
    done = _run("-m", "bench", "--batch", "5000")
    assert done.returncode == 2
    assert "--batch must be 1..1000" in done.stderr
