"""Unit tests of the bench harness's parts: the histogram, the exactly-once accounting,
the limited scenario's windows, how work is dealt out, the workload checks, the /proc
readers, the peer list and the report's text."""

from __future__ import annotations

import array
import itertools
import math
import os
import random
import shutil
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from bench.__main__ import build_parser, build_workload, check_workload, exit_status
from bench._accounting import MIN_BODY, account, make_body, read_body, token
from bench._harness import PhaseResult, Progress, deal
from bench._hist import Histogram
from bench._load import ChildPlan, ChildResult, LoadProcess, QueueLimit, Shared, Workload
from bench._output import describe_workload, format_comparison, format_run
from bench._peers import BeanstalkdServer, RedisServer, parse_peers
from bench._proc import cpu_seconds, peak_rss_bytes, rss_bytes
from bench._scenarios import RunReport, _Context
from bench._servers import Endpoint, Unsupported
from bench._sluice import SluiceServer
from bench._windows import busiest, median_rate, whole_windows

# Histogram ---------------------------------------------------------------------------------


def test_small_values_are_exact() -> None:
    histogram = Histogram()
    for value in range(1, 1001):
        histogram.record(value)
    assert histogram.percentile(50) == 500
    assert histogram.percentile(99.9) == 999
    assert histogram.percentile(100) == histogram.max == 1000
    assert histogram.percentile(0) == histogram.min == 1
    assert histogram.count == 1000 and histogram.mean == 500.5


@pytest.mark.parametrize("digits", [1, 2, 3, 4])
def test_percentiles_stay_within_the_precision(digits: int) -> None:
    values = [random.Random(digits).randrange(1, 10**9) for _ in range(20_000)]
    histogram = Histogram(significant_digits=digits)
    for value in values:
        histogram.record(value)
    ordered = sorted(values)
    for percent in (1, 10, 50, 90, 99, 99.9):
        exact = ordered[max(1, math.ceil(round(len(ordered) * percent / 100, 9))) - 1]
        assert abs(histogram.percentile(percent) - exact) <= exact * 10**-digits


def test_every_value_lands_in_a_bucket_that_holds_it() -> None:
    for value in [*range(0, 3000), 2**20 - 1, 2**20, 2**40 + 12345]:
        histogram = Histogram(significant_digits=2)
        histogram.record(value)
        [index] = histogram.counts
        lowest, highest = histogram.bucket_bounds(index)
        assert lowest <= value <= highest
        assert highest - lowest <= max(lowest, 1) / 100


def test_bucket_bounds_tile_the_number_line() -> None:
    histogram = Histogram(significant_digits=2)
    expected_lowest = 0
    for index in range(3000):
        lowest, highest = histogram.bucket_bounds(index)
        assert lowest == expected_lowest
        expected_lowest = highest + 1


def test_merge_equals_recording_everything_in_one() -> None:
    rng = random.Random(7)
    parts = [[rng.randrange(0, 10**7) for _ in range(1000)] for _ in range(3)]
    whole, merged = Histogram(), Histogram()
    for part in parts:
        piece = Histogram()
        for value in part:
            piece.record(value)
            whole.record(value)
        merged.merge(piece)
    merged.merge(Histogram())  # an empty one changes nothing
    assert merged == whole


def test_merge_into_empty_takes_the_other_min() -> None:
    merged, other = Histogram(), Histogram()
    other.record(70)
    merged.merge(other)
    assert (merged.min, merged.max, merged.count) == (70, 70, 1)


def test_merge_refuses_another_precision() -> None:
    with pytest.raises(ValueError, match="precision"):
        Histogram(significant_digits=2).merge(Histogram(significant_digits=3))


def test_empty_negative_and_bad_input() -> None:
    histogram = Histogram()
    assert histogram.percentile(99) == 0 and histogram.mean == 0.0
    histogram.record(-5)  # a clock step backwards counts as zero
    assert histogram.min == histogram.max == 0
    with pytest.raises(ValueError):
        histogram.percentile(101)
    with pytest.raises(ValueError):
        Histogram(significant_digits=0)


def test_summary_scales_every_value() -> None:
    histogram = Histogram()
    for value in (1000, 2000, 3000):
        histogram.record(value)
    summary = histogram.summary(scale=1000)
    assert summary["count"] == 3
    assert summary["p50"] == 2.0 and summary["max"] == 3.0 and summary["min"] == 1.0
    assert set(summary) == {"count", "mean", "min", "p50", "p90", "p99", "p99.9", "max"}


# Accounting --------------------------------------------------------------------------------


def test_body_carries_due_time_and_token() -> None:
    body = make_body(123_456_789, token(3, 42), b"x" * 84)
    assert len(body) == 100 and MIN_BODY == 16
    assert read_body(body) == (123_456_789, token(3, 42))


def test_each_put_acked_once_is_ok() -> None:
    acks = [token(slot, seq) for slot in (0, 5) for seq in range(100)]
    random.Random(1).shuffle(acks)
    accounting = account({0: 100, 5: 100}, acks)
    assert accounting.ok
    assert (accounting.expected, accounting.acks) == (200, 200)
    assert "exactly once (200)" in accounting.describe()


def test_missing_duplicated_and_unknown_acks_fail() -> None:
    acks = [token(0, seq) for seq in range(10) if seq != 4]  # 4 never acked
    acks += [token(0, 7), token(0, 7)]  # 7 acked three times in all
    acks += [token(1, 0), token(0, 10)]  # a slot nobody put on; a seq past the slot's count
    accounting = account({0: 10}, acks)
    assert not accounting.ok
    assert (accounting.missing, accounting.duplicated, accounting.unknown) == (1, 1, 2)
    assert accounting.acks == 13
    assert accounting.describe().startswith("FAILED")


def test_a_failed_accounting_fails_the_run() -> None:
    puts = PhaseResult(put_counts={0: 3})
    acks = PhaseResult(acked_tokens=[array.array("Q", [token(0, 0), token(0, 1), token(0, 1)])])
    report = RunReport("sluice", "memory")
    context = _Context(SluiceServer("memory"), Workload(), Progress(False), report)
    context.check_exactly_once(puts, acks)
    assert report.status == "failed"
    assert report.exactly_once is not None and report.exactly_once.missing == 1
    assert "never acked" in report.reasons[0]
    skipped = RunReport("redis", "aof off", status="skipped", reasons=["not installed"])
    assert exit_status([RunReport("sluice", "memory"), skipped]) == 0
    assert exit_status([report, skipped]) == 1


# Windows of the limited scenario -----------------------------------------------------------


def test_the_busiest_window_is_half_open() -> None:
    assert busiest([], 1.0) == 0
    assert busiest([0.0, 0.5, 0.999, 1.0], 1.0) == 3  # [0, 1) leaves out 1.0
    assert busiest([5.0] * 4 + [6.5], 1.0) == 4


def test_the_busiest_window_counts_what_a_brute_force_finds() -> None:
    rng = random.Random(12)
    for _ in range(50):
        times = sorted(rng.uniform(0, 5) for _ in range(rng.randrange(1, 60)))
        brute = max(sum(start <= t < start + 1 for t in times) for start in times)
        assert busiest(times, 1.0) == brute


def test_whole_windows_leave_out_the_last_partial_one() -> None:
    times = [0.0, 0.1, 0.2, 1.0, 1.5, 2.9, 3.2]
    assert whole_windows(times, 1.0) == [3, 2, 1]
    assert median_rate(times, 1.0) == 2
    assert median_rate([0.0, 0.3], 1.0) is None and whole_windows([], 1.0) == []
    assert median_rate(times, 0.5) == 2.0  # counts per half second, per second


def test_a_token_bucket_drain_stays_within_its_bound() -> None:
    limit = QueueLimit(rate=200.0, burst=20)
    times = [0.0] * 20 + [(k + 1) / 200 for k in range(limit.allowance(3.0) - 20)]
    assert len(times) == 620 and limit.bound(1.0) == 220
    assert busiest(times, 1.0) <= limit.bound(1.0)
    assert median_rate(times, 1.0) == 200


# Dealing out work --------------------------------------------------------------------------


def test_deal_spreads_items_round_robin() -> None:
    assert deal(8, 3) == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert deal(2, 8) == [[0], [1]]
    assert deal(0, 4) == []


@pytest.mark.parametrize(("queues", "workers"), [(1, 8), (3, 8), (8, 3), (10, 10), (250, 4)])
def test_every_queue_has_a_worker_and_every_worker_a_queue(queues: int, workers: int) -> None:
    workload = Workload(queues=queues, workers=workers)
    served = [workload.worker_queues("ns", worker) for worker in range(workers)]
    assert all(served)
    assert {name for names in served for name in names} == set(workload.queue_names("ns"))


def test_shares_add_up_to_the_messages() -> None:
    workload = Workload(messages=1003, producers=4)
    assert [workload.share(slot) for slot in range(4)] == [251, 251, 251, 250]
    assert Workload(duration=5.0).share(0) is None


# What a load process puts ------------------------------------------------------------------


def _producer(**workload: Any) -> LoadProcess:
    """The load logic of one producer process with connection slot 0, outside a process."""
    plan = ChildPlan(
        role="producer",
        index=0,
        endpoint=Endpoint("sluice", "127.0.0.1", 0, "ns"),
        workload=Workload(**workload),
        connections=[0],
    )
    stop, failed = SimpleNamespace(value=0), SimpleNamespace(value=0)
    shared = Shared(None, None, stop=stop, failed=failed, puts=[0], acks=[0], finished=[0])
    return LoadProcess(plan, shared, ChildResult("producer", 0))


def test_put_frames_carry_the_share_in_batches_over_queues_and_priorities() -> None:
    load = _producer(messages=10, batch=3, priorities=2, queues=2)
    frames = list(load.put_frames(0))
    assert [len(frame.bodies) for frame in frames] == [3, 3, 3, 1]
    assert [frame.priority for frame in frames] == [0, 1, 0, 1]
    assert [frame.queue for frame in frames] == ["ns.0", "ns.1", "ns.0", "ns.1"]
    tokens = [read_body(body)[1] for frame in frames for body in frame.bodies]
    assert tokens == [token(0, seq) for seq in range(10)]
    assert load.result.put_counts == {0: 10}


def test_open_loop_frames_are_stamped_one_interval_apart() -> None:
    load = _producer(messages=12, batch=3, rate=1000.0, delay_fraction=0.5, delay_seconds=2.0)
    frames = list(load.put_frames(0))
    gaps = [later.sent_ns - earlier.sent_ns for earlier, later in itertools.pairwise(frames)]
    assert all(abs(gap - 3_000_000) <= 1 for gap in gaps)  # 3 messages at 1,000/s
    assert [frame.delay for frame in frames] == [0.0, 2.0, 0.0, 2.0]
    for frame in frames:
        due_ns = frame.sent_ns + int(frame.delay * 1e9)
        assert {read_body(body)[0] for body in frame.bodies} == {due_ns}


def test_put_frames_end_when_the_parent_says_stop() -> None:
    load = _producer(messages=100)
    frames = load.put_frames(0)
    next(frames)
    load.shared.stop.value = 1
    assert list(frames) == []
    assert load.result.put_counts == {0: 1}


# Options -----------------------------------------------------------------------------------


def _workload(*argv: str) -> tuple[str, Workload]:
    args = build_parser().parse_args(list(argv))
    return args.scenario, build_workload(args)


def test_scenario_defaults_and_flags() -> None:
    _, throughput = _workload()
    assert (throughput.messages, throughput.producers, throughput.workers) == (50_000, 1, 8)
    assert (throughput.batch, throughput.body_size, throughput.rate) == (1, 100, None)
    _, latency = _workload("--scenario", "latency")
    assert (latency.rate, latency.duration, latency.messages) == (1000.0, 10.0, None)
    _, sized = _workload("--scenario", "latency", "--messages", "500")
    assert (sized.messages, sized.duration) == (500, None)
    _, backlog = _workload("--scenario", "backlog", "--batch", "10")
    assert (backlog.messages, backlog.batch) == (1_000_000, 10)
    _, many = _workload("--scenario", "many-workers", "--idle-workers", "20")
    assert many.idle_workers == 20


def test_client_form_defaults_to_async_and_is_described() -> None:
    scenario, default = _workload()
    assert default.client == "async"
    assert describe_workload(scenario, default).endswith("closed loop, asyncio clients on uvloop")
    _, sync = _workload("--client", "sync")
    assert sync.client == "sync"
    assert "blocking clients in a thread per connection" in describe_workload(scenario, sync)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--client", "gevent"])


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--batch", "1001"], "--batch"),
        (["--body-size", "8"], "--body-size"),
        (["--workers", "0"], "--workers"),
        (["--delay-fraction", "2"], "--delay-fraction"),
        (["--scenario", "backlog", "--duration", "5"], "use --messages"),
        (["--queues", "500", "--workers", "2"], "at most 100 queues"),
    ],
)
def test_bad_workloads_say_what_to_change(argv: list[str], complaint: str) -> None:
    scenario, workload = _workload(*argv)
    problem = check_workload(scenario, workload)
    assert problem is not None and complaint in problem


def test_limited_defaults_and_flags() -> None:
    _, limited = _workload("--scenario", "limited")
    assert (limited.duration, limited.messages, limited.workers) == (10.0, None, 8)
    assert limited.limit == QueueLimit(rate=200.0, per=1.0, burst=20, max_in_flight=None)
    _, fast = _workload("--scenario", "limited", "--limit-rate", "5000", "--limit-per", "2")
    assert fast.limit == QueueLimit(rate=5000.0, per=2.0, burst=250)  # 0.1 s worth
    _, capped = _workload("--scenario", "limited", "--limit-burst", "3", "--max-in-flight", "4")
    assert capped.limit is not None and (capped.limit.burst, capped.limit.max_in_flight) == (3, 4)
    assert capped.limit.settings() == {
        "rate_limit": {"rate": 200.0, "per": 1.0, "burst": 3},
        "max_in_flight": 4,
    }
    _, throughput = _workload()
    assert throughput.limit is None
    assert "rate limit 200 per 1 s, burst 20" in describe_workload("limited", limited)


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--max-in-flight", "3"], "apply to --scenario limited"),
        (["--scenario", "latency", "--limit-rate", "10"], "apply to --scenario limited"),
        (["--scenario", "limited", "--queues", "2"], "one queue"),
        (["--scenario", "limited", "--rate", "100"], "leave out --rate"),
        (["--scenario", "limited", "--limit-rate", "0"], "--limit-rate"),
        (["--scenario", "limited", "--limit-burst", "0"], "--limit-burst"),
        (["--scenario", "limited", "--max-in-flight", "0"], "--max-in-flight"),
        (["--scenario", "limited", "--limit-rate", "1", "--limit-per", "60"], "--stall-timeout"),
    ],
)
def test_bad_limited_workloads_say_what_to_change(argv: list[str], complaint: str) -> None:
    scenario, workload = _workload(*argv)
    problem = check_workload(scenario, workload)
    assert problem is not None and complaint in problem


def test_peers_refuse_a_limited_workload() -> None:
    limited = Workload(limit=QueueLimit(rate=200.0, burst=20))
    for server in (BeanstalkdServer("off"), RedisServer("off")):
        with pytest.raises(Unsupported, match="no rate limit"):
            server.check(limited)


def test_a_good_workload_passes() -> None:
    assert check_workload(*_workload("--queues", "3", "--priorities", "4")) is None


# /proc readers and peers -------------------------------------------------------------------


def test_proc_readers_measure_a_live_process_and_not_a_gone_one() -> None:
    cpu = cpu_seconds(os.getpid())
    assert cpu is not None and cpu >= 0
    rss, peak = rss_bytes(os.getpid()), peak_rss_bytes(os.getpid())
    assert rss is not None and peak is not None and 0 < rss <= peak
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert cpu_seconds(gone.pid) is None and peak_rss_bytes(gone.pid) is None


def test_peer_list_parses_names_and_modes() -> None:
    every = parse_peers("beanstalkd,redis", 100)
    assert [(s.name, s.mode) for s in every] == [
        ("beanstalkd", "binlog off"),
        ("beanstalkd", "binlog on"),
        ("beanstalkd", "binlog, fsync each write"),
        ("redis", "aof off"),
        ("redis", "aof everysec"),
        ("redis", "aof always"),
    ]
    assert [s.mode for s in parse_peers("redis:always, beanstalkd:fsync", 100)] == [
        "aof always",
        "binlog, fsync each write",
    ]
    again = parse_peers("sluice:memory,sluice:never", 100)
    assert [(s.name, s.mode, s.durable) for s in again] == [
        ("sluice", "memory", False),
        ("sluice", "fsync never", True),
    ]
    with pytest.raises(ValueError, match="choose from beanstalkd, redis, sluice"):
        parse_peers("rabbitmq", 100)
    with pytest.raises(ValueError, match="unknown sluice mode '': choose from always"):
        parse_peers("sluice", 100)  # Sluice in the mode it already runs in: say which
    with pytest.raises(ValueError, match="choose from off, everysec, always"):
        parse_peers("redis:sometimes", 100)


def test_beanstalkd_commands_per_mode() -> None:
    assert "-b" not in BeanstalkdServer("off").command("beanstalkd", "/d")
    assert BeanstalkdServer("binlog").command("beanstalkd", "/d")[-2:] == ["-b", "/d"]
    assert BeanstalkdServer("fsync").command("beanstalkd", "/d")[-4:] == ["-b", "/d", "-f", "0"]


@pytest.mark.skipif(shutil.which("beanstalkd") is None, reason="beanstalkd is not installed")
def test_beanstalkd_names_the_client_each_form_uses() -> None:
    server = BeanstalkdServer("off")
    server.check(Workload(batch=10))
    assert server.client_module == "" and server.notes == []
    try:
        server.check(Workload(batch=10, client="sync"))
    except Unsupported as why:
        assert "greenstalk" in str(why)
        return
    assert server.client_module == "greenstalk"
    assert "greenstalk python client" in server.versions()
    assert server.notes == ["greenstalk does not pipeline: a batch is that many round trips"]


def test_redis_skips_what_a_list_cannot_do() -> None:
    server = RedisServer("always")
    command = server.command("redis-server", "/d")
    assert command[command.index("--appendfsync") + 1] == "always"
    with pytest.raises(Unsupported, match="no priorities"):
        server.check(Workload(priorities=3))
    with pytest.raises(Unsupported, match="no delays"):
        server.check(Workload(delay_fraction=0.5))


# Reports -----------------------------------------------------------------------------------


def _report(server: str, mode: str, jobs_per_s: float, client_us: float) -> RunReport:
    figures = {
        "jobs_per_s": jobs_per_s,
        "server_cpu_s": 0.5,
        "server_cpu_us_per_job": 50.0,
        "client_cpu_s": client_us / 100,
        "client_cpu_us_per_job": client_us,
    }
    return RunReport(server, mode, figures=figures)


def test_a_run_shows_server_and_client_cpu_per_job() -> None:
    lines = format_run(_report("sluice", "memory", 1000.0, 1234.5)).splitlines()
    assert "  CPU per job         50.0 µs (server)" in lines
    assert "  client CPU per job  1234.5 µs (all load processes)" in lines


def test_the_comparison_has_a_client_cpu_per_job_column() -> None:
    reports = [_report("sluice", "memory", 1000.0, 1234.5), _report("redis", "aof off", 500.0, 80)]
    header, _, sluice, redis, legend = format_comparison("throughput", reports).splitlines()
    assert header.index("client µs/job") < header.index("sluice/this")
    assert sluice.endswith("1,234.5  1.00") and redis.endswith("80.0  2.00")
    assert "client µs/job: CPU of all load processes per job" in legend
