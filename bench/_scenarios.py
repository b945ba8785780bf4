"""The named scenarios: what each runs, and the figures it reports.

- ``throughput``: closed loop. Producers put as fast as confirmations come back; workers
  reserve and ack. Jobs/s from the first put to the last ack.
- ``latency``: open loop. Producers offer a fixed rate (``--rate``) whatever the server
  does; the put-confirm and put-to-deliver percentiles are the point.
- ``many-workers``: the throughput load while 1,000 (``--idle-workers``) more worker
  connections long-poll a queue that stays empty: what idle consumers cost.
- ``backlog``: put every message first (no workers), then drain: fill and drain rates and
  the server's memory with the whole backlog queued.
- ``recovery``: fill a durable server, SIGKILL it, restart it on the same data directory:
  time until it listens and answers, then a check that every message is still there and a
  drain that acks each exactly once. Modes that keep nothing on disk are skipped.
- ``limited``: give the queue a rate limit (``--limit-rate``/``--limit-per``/
  ``--limit-burst``, optionally ``--max-in-flight``), fill it with what the limit lets
  through in ``--duration`` (or ``--messages``), then drain it with greedy workers: the
  delivered rate against the limit, the busiest second against the bucket's bound, and
  the broker's throttle counters. Sluice only: the peers have no such limit.
"""

from __future__ import annotations

import dataclasses
import itertools
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._accounting import Accounting, account
from ._harness import PhaseResult, Progress, namespaced, run_phase
from ._load import QueueLimit, Workload
from ._proc import rss_bytes
from ._servers import Server, Unsupported
from ._sluice import SluiceServer, broker_has_durable_mode
from ._windows import busiest, median_rate, whole_windows

MIB = 1024 * 1024
WINDOW = 1.0  # seconds: the limited scenario counts deliveries in windows this long


@dataclass
class RunReport:
    """One scenario against one server: its status, figures and exactly-once check."""

    server: str
    mode: str
    status: str = "ok"  # "ok", "failed" or "skipped"
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    exactly_once: Accounting | None = None

    def fail(self, reason: str) -> None:
        self.status = "failed"
        self.reasons.append(reason)


@dataclass
class _Context:
    server: Server
    workload: Workload
    progress: Progress
    report: RunReport
    namespace: str = field(default_factory=lambda: f"bench.{secrets.token_hex(4)}")

    def phase(self, name: str, **options: Any) -> PhaseResult:
        label = f"{self.server.name} {self.server.mode}: {name}"
        result = run_phase(
            namespaced(self.server.endpoint(), self.namespace),
            self.server.pid,
            self.workload,
            label=label,
            progress=self.progress,
            **options,
        )
        for error in result.errors:
            self.report.fail(f"{name}: {error}")
        return result

    def check_exactly_once(self, puts: PhaseResult, acks: PhaseResult) -> None:
        tokens = (token for group in acks.acked_tokens for token in group)
        accounting = account(puts.put_counts, tokens)
        self.report.exactly_once = accounting
        if not accounting.ok:
            self.report.fail(accounting.describe())


def _seconds(start_ns: int | None, end_ns: int | None) -> float | None:
    if start_ns is None or end_ns is None:
        return None
    return max(end_ns - start_ns, 1) / 1e9


def _rate(count: int, seconds: float | None) -> float | None:
    return count / seconds if seconds else None


def _mib(size: int | None) -> float | None:
    return None if size is None else size / MIB


def _server_figures(phase: PhaseResult, jobs: int, prefix: str = "server") -> dict[str, Any]:
    usage = phase.server
    per_job = None
    if usage.cpu_seconds is not None and jobs:
        per_job = usage.cpu_seconds / jobs * 1e6
    return {
        f"{prefix}_cpu_s": usage.cpu_seconds,
        f"{prefix}_cpu_us_per_job": per_job,
        f"{prefix}_rss_mib": _mib(usage.rss_bytes),
        f"{prefix}_peak_rss_mib": _mib(usage.peak_rss_bytes),
    }


def _client_figures(cpu_seconds: float, jobs: int) -> dict[str, Any]:
    """CPU of every load process (producers and workers) over the run, in all and per job."""
    return {
        "client_cpu_s": cpu_seconds,
        "client_cpu_us_per_job": cpu_seconds / jobs * 1e6 if jobs else None,
    }


def _load_figures(phase: PhaseResult) -> dict[str, Any]:
    """The figures of a phase that both put and acked."""
    elapsed = _seconds(phase.first_put_ns, phase.last_ack_ns)
    return {
        "messages": phase.puts,
        "elapsed_s": elapsed,
        "jobs_per_s": _rate(phase.puts, elapsed),
        "put_per_s": _rate(phase.puts, _seconds(phase.first_put_ns, phase.last_put_ns)),
        "put_confirm_ms": phase.put_confirm_us.summary(scale=1000),
        "put_to_deliver_ms": phase.deliver_us.summary(scale=1000),
        **_server_figures(phase, phase.puts),
        **_client_figures(phase.client_cpu_seconds, phase.puts),
    }


def _steady(context: _Context) -> None:
    """throughput, latency and many-workers: producers and workers at once."""
    phase = context.phase("load", produce=True, consume=True)
    context.report.figures.update(_load_figures(phase))
    if context.workload.rate is not None:
        context.report.figures["offered_per_s"] = context.workload.rate
    if context.workload.idle_workers:
        context.report.figures["idle_workers"] = context.workload.idle_workers
    context.check_exactly_once(phase, phase)


def _fill(context: _Context) -> PhaseResult:
    fill = context.phase("fill", produce=True, consume=False)
    seconds = _seconds(fill.first_put_ns, fill.last_put_ns)
    context.report.figures.update(
        {
            "messages": fill.puts,
            "fill_per_s": _rate(fill.puts, seconds),
            "put_confirm_ms": fill.put_confirm_us.summary(scale=1000),
            **_server_figures(fill, fill.puts, "fill_server"),
        }
    )
    return fill


def _drain(context: _Context, fill: PhaseResult) -> PhaseResult | None:
    if context.report.status == "failed":
        return None
    drain = context.phase("drain", produce=False, consume=True, drain_target=fill.puts)
    seconds = _seconds(drain.started_ns, drain.last_ack_ns)
    context.report.figures.update(
        {
            "drain_per_s": _rate(drain.acks, seconds),
            "drain_s": seconds,
            "put_to_deliver_ms": drain.deliver_us.summary(scale=1000),
            **_server_figures(drain, drain.acks),
            **_client_figures(fill.client_cpu_seconds + drain.client_cpu_seconds, drain.acks),
        }
    )
    context.check_exactly_once(fill, drain)
    return drain


def _backlog(context: _Context) -> None:
    _drain(context, _fill(context))


def _recovery(context: _Context) -> None:
    server = context.server
    if isinstance(server, SluiceServer):
        if server.url:
            raise Unsupported("recovery kills and restarts its own broker: leave out --url")
        if not broker_has_durable_mode():
            raise Unsupported("the broker has no durable mode (needs --fsync support)")
    if not server.durable:
        raise Unsupported(f"{server.mode} keeps nothing to recover")
    fill = _fill(context)
    if context.report.status == "failed":
        return
    restart = server.restart_after_kill()
    figures = context.report.figures
    figures["restart_listening_s"] = restart["listening_s"]
    figures["restart_ready_s"] = restart["ready_s"]
    figures["restart_rss_mib"] = _mib(rss_bytes(server.pid)) if server.pid else None
    recovered = server.queued(context.workload.queue_names(context.namespace))
    figures["recovered"] = recovered
    if recovered != fill.puts:
        context.report.fail(f"{fill.puts:,} messages put before the kill, {recovered:,} after")
        return
    _drain(context, fill)


def _limited(context: _Context) -> None:
    server, workload, limit = context.server, context.workload, context.workload.limit
    if not isinstance(server, SluiceServer) or limit is None:
        raise Unsupported(f"{server.name} has no rate limit kept by the server")
    [queue] = workload.queue_names(context.namespace)
    server.limit(queue, limit)
    if workload.messages is None:
        assert workload.duration is not None
        messages = limit.allowance(workload.duration)
        filled = dataclasses.replace(workload, messages=messages, duration=None)
        context = dataclasses.replace(context, workload=filled)
    drain = _drain(context, _fill(context))
    if drain is None:
        return
    figures = context.report.figures
    figures.update(_window_figures(drain, limit, figures.get("drain_per_s")))
    if figures["busiest_window"] > figures["window_bound"]:
        context.report.fail(
            f"the broker delivered {figures['busiest_window']:,} messages within one second, "
            f"more than its bucket allows (burst + 1 s at the limit: "
            f"{figures['window_bound']:,.0f})"
        )
    broker = server.limits(queue)
    figures["broker_limits"] = broker
    figures["throttled_s"] = broker.get("throttled_seconds")
    figures["parked_by_limit"] = broker.get("parked_by_limit")


def _window_figures(
    drain: PhaseResult, limit: QueueLimit, overall_per_s: float | None
) -> dict[str, Any]:
    """The limited scenario's figures: what was delivered in 1-s windows, by the broker's
    lease times (what its bucket bounds) and as the workers received them."""
    leased = sorted(itertools.chain.from_iterable(drain.lease_deadlines))
    received = sorted(ns / 1e9 for ns in itertools.chain.from_iterable(drain.received_ns))
    delivered = median_rate(leased, WINDOW)
    per_second = limit.per_second
    return {
        "limit_per_s": per_second,
        "limit_burst": limit.burst,
        "limit_max_in_flight": limit.max_in_flight,
        "delivered_per_s": delivered,
        "delivered_windows": len(whole_windows(leased, WINDOW)),
        "delivered_ratio": None if delivered is None else delivered / per_second,
        "overall_ratio": None if overall_per_s is None else overall_per_s / per_second,
        "busiest_window": busiest(leased, WINDOW),
        "busiest_window_received": busiest(received, WINDOW),
        "window_bound": limit.bound(WINDOW),
    }


@dataclass(frozen=True)
class Scenario:
    run: Callable[[_Context], None]
    defaults: dict[str, Any]
    summary: str


SCENARIOS: dict[str, Scenario] = {
    "throughput": Scenario(_steady, {"messages": 50_000}, "closed loop, as fast as it goes"),
    "latency": Scenario(
        _steady, {"rate": 1000.0, "duration": 10.0}, "open loop at a fixed offered rate"
    ),
    "many-workers": Scenario(
        _steady,
        {"messages": 50_000, "idle_workers": 1000},
        "throughput load plus idle long-polling connections",
    ),
    "backlog": Scenario(
        _backlog, {"messages": 1_000_000, "batch": 100}, "enqueue everything, then drain"
    ),
    "recovery": Scenario(
        _recovery,
        {"messages": 1_000_000, "batch": 100},
        "fill a durable broker, kill -9, restart, drain",
    ),
    "limited": Scenario(
        _limited, {"duration": 10.0}, "drain a rate-limited queue with greedy workers"
    ),
}


def run_scenario(name: str, server: Server, workload: Workload, progress: Progress) -> RunReport:
    """Start ``server``, run scenario ``name`` against it, stop it. Never raises for a
    server that cannot run it (status "skipped") or that fails (status "failed")."""
    report = RunReport(server.name, server.mode)
    try:
        server.check(workload)
        server.start()
    except Unsupported as why:
        report.status, report.reasons = "skipped", [str(why)]
        return report
    except Exception as error:
        server.stop()  # removes what a failed start left behind
        report.fail(f"could not start: {error}")
        return report
    try:
        report.versions = server.versions()
        SCENARIOS[name].run(_Context(server, workload, progress, report))
    except Unsupported as why:
        report.status, report.reasons = "skipped", [str(why)]
    except Exception as error:
        report.fail(f"{type(error).__name__}: {error}")
    finally:
        server.stop()
        report.notes = list(server.notes)
    return report
