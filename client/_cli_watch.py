"""``sluice stats`` over every queue and ``sluice watch``: a table of all queues redrawn
every interval, with put and ack rates from the change in each queue's totals between two
refreshes."""

from __future__ import annotations

import os
import select
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, TextIO

from ._cli_text import cell, table, to_json
from ._sync import Client

COUNTS: Final = ("ready", "delayed", "reserved", "dead", "waiting")
TOTALS: Final = ("put", "delivered", "acked", "nacked", "expired", "dead_lettered")
RATES: Final = ("put", "acked")  # the totals whose per-second change watch shows
ALL_ROW: Final = "(all)"  # not a valid queue name, so it cannot be mistaken for one
CLEAR_SCREEN: Final = "\x1b[H\x1b[2J"


def all_queue_stats(client: Client) -> list[dict[str, Any]]:
    """The stats map of every queue, sorted by name. No op deletes a queue, so every
    queue listed has stats."""
    return [client.stats(summary["name"]) for summary in client.queues()]


def sum_stats(every: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts and totals added up over ``every`` queue's stats."""
    summed: dict[str, Any] = {name: sum(s[name] for s in every) for name in COUNTS}
    summed["totals"] = {name: sum(s["totals"].get(name, 0) for s in every) for name in TOTALS}
    return summed


def stats_table(every: Sequence[dict[str, Any]]) -> str:
    """One row per queue (counts, paused, totals) and a last row adding them up."""
    headers = ["queue", *COUNTS, "paused", *TOTALS]
    rows = [
        [s["queue"], *(s[n] for n in COUNTS), s["paused"], *(s["totals"].get(n, 0) for n in TOTALS)]
        for s in every
    ]
    summed = sum_stats(every)
    rows.append([ALL_ROW, *(summed[n] for n in COUNTS), "", *(summed["totals"][n] for n in TOTALS)])
    return table(headers, rows)


# --------------------------------------------------------------------------- watch


@dataclass(frozen=True, slots=True)
class Sample:
    """Every queue's stats, and when they were read (``time.monotonic``)."""

    taken_at: float
    queues: list[dict[str, Any]]


def take_sample(client: Client) -> Sample:
    queues = all_queue_stats(client)
    return Sample(time.monotonic(), queues)


def rates(previous: Sample | None, current: Sample) -> dict[str, dict[str, float]]:
    """Per queue name, the per-second change of each ``RATES`` total from ``previous`` to
    ``current``; empty when there is no previous sample. A queue that appeared in between
    counts from zero."""
    if previous is None:
        return {}
    elapsed = max(current.taken_at - previous.taken_at, 1e-9)
    before = {s["queue"]: s["totals"] for s in previous.queues}
    return {
        s["queue"]: {
            name: (s["totals"].get(name, 0) - before.get(s["queue"], {}).get(name, 0)) / elapsed
            for name in RATES
        }
        for s in current.queues
    }


def _rate_cells(queue_rates: dict[str, float] | None) -> list[str]:
    if queue_rates is None:
        return ["-" for _ in RATES]
    return [f"{queue_rates[name]:.1f}" for name in RATES]


def watch_table(sample: Sample, sample_rates: dict[str, dict[str, float]]) -> str:
    """Depth of every queue and its rates (``-`` before there are two samples), plus a row
    adding them up."""
    headers = ["queue", *COUNTS, "paused", *(f"{name}/s" for name in RATES)]
    rows: list[list[Any]] = []
    for s in sample.queues:
        counts = [s[name] for name in COUNTS]
        rows.append([s["queue"], *counts, s["paused"], *_rate_cells(sample_rates.get(s["queue"]))])
    summed = sum_stats(sample.queues)
    all_rates = (
        {n: sum(r[n] for r in sample_rates.values()) for n in RATES} if sample_rates else None
    )
    rows.append([ALL_ROW, *(summed[n] for n in COUNTS), "", *_rate_cells(all_rates)])
    return table(headers, rows)


def watch_record(sample: Sample, sample_rates: dict[str, dict[str, float]]) -> str:
    """One refresh as one line of JSON: the time and every queue's stats with its
    ``rates`` (null on the first refresh)."""
    queues = [s | {"rates": sample_rates.get(s["queue"])} for s in sample.queues]
    return to_json({"time": time.time(), "queues": queues}, indent=None)


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchOptions:
    url: str
    interval: float
    count: int | None  # stop after this many refreshes; None: until interrupted
    as_json: bool


def _refresh_input(stdin: TextIO) -> int | None:
    """The file descriptor of stdin if a line typed on it should refresh at once: a pipe,
    or a terminal whose foreground we are in (reading it from the background would stop
    us). None otherwise (for example /dev/null)."""
    try:
        fd = stdin.fileno()
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            return fd
        if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
            return fd
    except (AttributeError, ValueError, OSError):
        pass
    return None


def _pause(interval: float, refresh_fd: int | None) -> int | None:
    """Wait ``interval`` seconds, or less if a line arrives on ``refresh_fd``. Returns the
    descriptor to keep listening on: None once it reached end of file."""
    deadline = time.monotonic() + interval
    if refresh_fd is None:
        time.sleep(interval)
        return None
    readable, _, _ = select.select([refresh_fd], [], [], interval)
    if readable and not os.read(refresh_fd, 4096):
        time.sleep(max(0.0, deadline - time.monotonic()))
        return None
    return refresh_fd


def _frame(options: WatchOptions, sample: Sample, sample_rates: Any, to_tty: bool) -> str:
    if options.as_json:
        return watch_record(sample, sample_rates) + "\n"
    clock = time.strftime("%H:%M:%S")
    title = f"sluice watch  {options.url}  {clock}  every {cell(options.interval)}s"
    text = f"{title}\n{watch_table(sample, sample_rates)}\n"
    return CLEAR_SCREEN + text if to_tty else text + "\n"


def watch(client: Client, options: WatchOptions, out: TextIO, stdin: TextIO) -> int:
    """Redraw until ``options.count`` refreshes were shown or Ctrl-C; returns exit code 0.
    On a terminal each refresh clears the screen; otherwise tables follow one another,
    each ended by a blank line (JSON: one line per refresh)."""
    to_tty = out.isatty()
    refresh_fd = _refresh_input(stdin)
    previous: Sample | None = None
    shown = 0
    try:
        while True:
            sample = take_sample(client)
            out.write(_frame(options, sample, rates(previous, sample), to_tty))
            out.flush()
            shown += 1
            if options.count is not None and shown >= options.count:
                return 0
            refresh_fd = _pause(options.interval, refresh_fd)
            previous = sample
    except KeyboardInterrupt:
        if to_tty:
            out.write("\n")
        return 0
