"""The bench's output: a block of figures per run, a side-by-side table when peers ran,
and the JSON document with every figure, the configuration and the versions."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._hist import PERCENTILES
from ._load import CLIENT_FORMS
from ._scenarios import RunReport

LABEL_WIDTH = 20  # the column of labels in a run's block of figures
# (label, figure key, format) of the one-line figures, in the order shown.
_LINES: list[tuple[str, str, str]] = [
    ("end to end", "jobs_per_s", "{:,.0f} jobs/s (first put to last ack)"),
    ("elapsed", "elapsed_s", "{:.2f} s"),
    ("offered", "offered_per_s", "{:,.0f} messages/s (open loop)"),
    ("puts", "put_per_s", "{:,.0f} messages/s"),
    ("fill", "fill_per_s", "{:,.0f} messages/s (no workers)"),
    ("server RSS full", "fill_server_rss_mib", "{:,.1f} MiB with the backlog queued"),
    ("restart", "restart_listening_s", "{:.2f} s to the listening line"),
    ("ready", "restart_ready_s", "{:.2f} s to the first answered ping"),
    ("recovered", "recovered", "{:,} messages queued after the restart"),
    ("RSS restarted", "restart_rss_mib", "{:,.1f} MiB"),
    ("drain", "drain_per_s", "{:,.0f} messages/s"),
    ("limit", "limit_per_s", "{:,.0f} messages/s (the queue's rate limit)"),
    ("burst", "limit_burst", "{:,} messages"),
    ("max in flight", "limit_max_in_flight", "{:,} messages reserved at once"),
    ("delivered", "delivered_per_s", "{:,.0f} messages/s (median whole 1-s window)"),
    ("of the limit", "delivered_ratio", "{:.2f} (delivered / limit)"),
    ("overall", "overall_ratio", "{:.2f} of the limit (drain rate, first burst included)"),
    ("busiest 1 s", "busiest_window", "{:,} messages (by the broker's lease times)"),
    ("bound", "window_bound", "{:,.0f} messages in any 1 s (burst + 1 s at the limit)"),
    (
        "received busiest",
        "busiest_window_received",
        "{:,} messages in 1 s (as the workers got them)",
    ),
    ("throttled", "throttled_s", "{:.2f} s (broker: ready messages held back by the limit)"),
    ("parked by limit", "parked_by_limit", "{:,} long-polls (broker)"),
    ("idle workers", "idle_workers", "{:,} connections long-polling an empty queue"),
    ("fill CPU", "fill_server_cpu_s", "{:.2f} s (server, while filling)"),
    ("server CPU", "server_cpu_s", "{:.2f} s"),
    ("CPU per job", "server_cpu_us_per_job", "{:.1f} µs (server)"),
    ("server RSS peak", "server_peak_rss_mib", "{:,.1f} MiB"),
    ("client CPU", "client_cpu_s", "{:.2f} s (all load processes)"),
    ("client CPU per job", "client_cpu_us_per_job", "{:.1f} µs (all load processes)"),
]
_HISTOGRAMS = [("put confirm", "put_confirm_ms"), ("put to deliver", "put_to_deliver_ms")]
_HEADLINES = {
    "throughput": ("jobs_per_s", None, "jobs/s", "{:,.0f}"),
    "many-workers": ("jobs_per_s", None, "jobs/s", "{:,.0f}"),
    "latency": ("put_to_deliver_ms", "p99", "p99 deliver ms", "{:,.2f}"),
    "backlog": ("drain_per_s", None, "drain/s", "{:,.0f}"),
    "recovery": ("restart_ready_s", None, "ready s", "{:,.2f}"),
    "limited": ("delivered_per_s", None, "delivered/s", "{:,.0f}"),
}


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def describe_workload(scenario: str, workload: Any) -> str:
    amount = (
        f"{workload.messages:,} messages"
        if workload.messages is not None
        else f"{workload.duration:g} s"
    )
    loop = "closed loop" if workload.rate is None else f"open loop at {workload.rate:,.0f}/s"
    text = (
        f"{scenario}: {amount}, {_count(workload.producers, 'producer')}, "
        f"{_count(workload.workers, 'worker')}, batch {workload.batch}, "
        f"{workload.body_size}-byte bodies, {_count(workload.queues, 'queue')}, {loop}, "
        f"{CLIENT_FORMS[workload.client]}"
    )
    if workload.idle_workers:
        text += f", {_count(workload.idle_workers, 'idle worker')}"
    if workload.priorities > 1:
        text += f", {workload.priorities} priorities"
    if workload.delay_fraction:
        text += f", {workload.delay_fraction:.0%} delayed {workload.delay_seconds:g} s"
    if workload.limit is not None:
        limit = workload.limit
        text += f", rate limit {limit.rate:g} per {limit.per:g} s, burst {limit.burst:,}"
        if limit.max_in_flight is not None:
            text += f", max {limit.max_in_flight:,} in flight"
    return text


def format_run(report: RunReport) -> str:
    lines = [f"{report.server} ({report.mode}): {report.status}"]
    for reason in report.reasons:
        lines.append(f"  {'reason' if report.status == 'skipped' else 'ERROR'}: {reason}")
    figures = report.figures
    for label, key, form in _LINES:
        if figures.get(key) is not None:
            lines.append(f"  {label:<{LABEL_WIDTH}}{form.format(figures[key])}")
    if any(figures.get(key) for _, key in _HISTOGRAMS):
        heads = "".join(f"{'p' + format(p, 'g'):>9}" for p in PERCENTILES)
        lines.append(f"  {'latency (ms)':<{LABEL_WIDTH}}{heads}{'max':>9}{'samples':>11}")
    for label, key in _HISTOGRAMS:
        summary = figures.get(key)
        if summary and summary["count"]:
            cells = "".join(f"{summary['p' + format(p, 'g')]:>9.2f}" for p in PERCENTILES)
            row = f"{cells}{summary['max']:>9.2f}{summary['count']:>11,}"
            lines.append(f"  {label:<{LABEL_WIDTH}}{row}")
    if report.exactly_once is not None:
        lines.append(f"  {'exactly once':<{LABEL_WIDTH}}{report.exactly_once.describe()}")
    lines.extend(f"  note: {note}" for note in report.notes)
    return "\n".join(lines)


def _headline(scenario: str, report: RunReport) -> float | None:
    key, percentile, _, _ = _HEADLINES[scenario]
    value = report.figures.get(key)
    if percentile is not None and isinstance(value, dict):
        value = value.get(percentile)
    return float(value) if isinstance(value, int | float) and report.status == "ok" else None


def _cell(value: Any, form: str) -> str:
    return "-" if value is None else form.format(value)


def format_comparison(scenario: str, reports: Sequence[RunReport]) -> str:
    """One row per run, with Sluice's headline figure divided by each run's."""
    _, _, title, form = _HEADLINES[scenario]
    base = _headline(scenario, reports[0])
    header = (
        f"{'server':<11}{'mode':<26}{title:>14}{'deliver p50':>12}{'deliver p99':>12}"
        f"{'put p99':>9}{'CPU s':>7}{'RSS MiB':>9}{'client µs/job':>15}  sluice/this"
    )
    rows = [header, "-" * len(header)]
    for report in reports:
        start = f"{report.server:<11}{report.mode:<26}"
        if report.status != "ok":
            rows.append(f"{start}{report.status}: {'; '.join(report.reasons)}")
            continue
        deliver = report.figures.get("put_to_deliver_ms") or {}
        confirm = report.figures.get("put_confirm_ms") or {}
        value = _headline(scenario, report)
        ratio = f"{base / value:.2f}" if base is not None and value else "-"
        rows.append(
            f"{start}{_cell(value, form):>14}{_cell(deliver.get('p50'), '{:.2f}'):>12}"
            f"{_cell(deliver.get('p99'), '{:.2f}'):>12}{_cell(confirm.get('p99'), '{:.2f}'):>9}"
            f"{_cell(report.figures.get('server_cpu_s'), '{:.1f}'):>7}"
            f"{_cell(report.figures.get('server_peak_rss_mib'), '{:.1f}'):>9}"
            f"{_cell(report.figures.get('client_cpu_us_per_job'), '{:,.1f}'):>15}  {ratio}"
        )
    rows.append(
        "latencies in ms; CPU s and RSS MiB (peak) of the server process; client µs/job: "
        "CPU of all load processes per job"
    )
    return "\n".join(rows)


def report_json(report: RunReport) -> dict[str, Any]:
    document = dataclasses.asdict(report)
    if report.exactly_once is not None:
        document["exactly_once"]["ok"] = report.exactly_once.ok
    return document


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
