"""Runs one phase of load against a server: starts the producer and worker processes,
watches their counters (live progress line, stall and failure detection), decides when
the phase is over, and merges what the processes measured. ``run_child`` is what each
process runs."""

from __future__ import annotations

import array
import dataclasses
import multiprocessing
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from ._accounting import now_ns
from ._hist import Histogram
from ._load import ChildPlan, ChildResult, Shared, Workload
from ._load_async import run_async
from ._load_sync import run_threads
from ._proc import Usage, UsageMeter
from ._servers import Endpoint

POLL_SECONDS = 0.1
PROGRESS_SECONDS = 0.5
START_TIMEOUT = 120.0  # seconds for every process to connect (1,000 idle workers included)
RESULT_TIMEOUT = 120.0  # seconds for a process to send its result once told to stop


class Progress:
    """One status line on stderr, rewritten in place; silent unless ``enabled``."""

    def __init__(self, enabled: bool, stream: TextIO = sys.stderr) -> None:
        self.enabled, self.stream = enabled, stream
        self.width = 0

    def show(self, text: str) -> None:
        if self.enabled:
            self.stream.write("\r" + text.ljust(self.width))
            self.stream.flush()
            self.width = len(text)

    def clear(self) -> None:
        if self.enabled and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


@dataclass
class PhaseResult:
    """Everything the load processes of one phase measured, merged."""

    put_counts: dict[int, int] = field(default_factory=dict)
    acked_tokens: list[array.array[int]] = field(default_factory=list)
    put_confirm_us: Histogram = field(default_factory=Histogram)
    deliver_us: Histogram = field(default_factory=Histogram)
    lease_deadlines: list[array.array[float]] = field(default_factory=list)
    received_ns: list[array.array[int]] = field(default_factory=list)
    first_put_ns: int | None = None
    last_put_ns: int | None = None
    last_ack_ns: int | None = None
    client_cpu_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    server: Usage = field(default_factory=lambda: Usage(None, None, None))
    started_ns: int = 0  # when every process was ready and the phase began
    wall_seconds: float = 0.0

    @property
    def puts(self) -> int:
        return sum(self.put_counts.values())

    @property
    def acks(self) -> int:
        return sum(len(tokens) for tokens in self.acked_tokens)

    def add(self, child: ChildResult) -> None:
        self.put_counts.update(child.put_counts)
        self.acked_tokens.append(child.acked_tokens)
        self.put_confirm_us.merge(child.put_confirm_us)
        self.deliver_us.merge(child.deliver_us)
        self.lease_deadlines.append(child.lease_deadlines)
        self.received_ns.append(child.received_ns)
        self.first_put_ns = _earliest(self.first_put_ns, child.first_put_ns)
        self.last_put_ns = _latest(self.last_put_ns, child.last_put_ns)
        self.last_ack_ns = _latest(self.last_ack_ns, child.last_ack_ns)
        self.client_cpu_seconds += child.cpu_seconds
        self.errors.extend(child.errors)


def _earliest(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _latest(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def deal(items: int, processes: int) -> list[list[int]]:
    """Items 0..items-1 dealt round-robin over at most ``processes`` non-empty lists."""
    count = max(1, min(processes, items))
    return [list(range(start, items, count)) for start in range(count)] if items else []


@dataclass
class _Watch:
    """The parent's view of a running phase."""

    label: str
    produce: bool
    consume: bool
    drain_target: int | None
    stall_timeout: float
    producer_indexes: list[int]
    last_counts: tuple[int, int] = (0, 0)
    last_change: float = field(default_factory=time.monotonic)
    last_shown: tuple[float, int, int] = (0.0, 0, 0)

    def finished(self, shared: Shared, puts: int, acks: int) -> bool:
        producers_done = all(shared.finished[i] for i in self.producer_indexes)
        if not self.consume:
            return producers_done
        target = puts if self.produce else self.drain_target
        return (producers_done or not self.produce) and target is not None and acks >= target

    def stalled(self, puts: int, acks: int) -> bool:
        now = time.monotonic()
        if (puts, acks) != self.last_counts:
            self.last_counts, self.last_change = (puts, acks), now
        return now - self.last_change > self.stall_timeout

    def line(self, puts: int, acks: int, cpu_percent: float | None) -> str | None:
        now = time.monotonic()
        shown_at, shown_puts, shown_acks = self.last_shown
        if now - shown_at < PROGRESS_SECONDS:
            return None
        span = max(now - shown_at, 1e-9) if shown_at else None
        self.last_shown = (now, puts, acks)
        if span is None:
            return None
        text = f"[{self.label}] put {puts:,} ({(puts - shown_puts) / span:,.0f}/s)"
        text += f"  acked {acks:,} ({(acks - shown_acks) / span:,.0f}/s)"
        if cpu_percent is not None:
            text += f"  server CPU {cpu_percent:.0f}%"
        return text


def run_child(plan: ChildPlan, shared: Shared) -> None:
    """Process entry point: run the plan with the client form its workload names, and
    always send back a result."""
    result = ChildResult(plan.role, plan.index)
    run = run_threads if plan.workload.client == "sync" else run_async
    try:
        run(plan, shared, result)
    except BaseException as error:
        result.errors.append(f"{plan.role} process {plan.index}: {error!r}")
        shared.failed.value = 1
    shared.finished[plan.index] = 1
    shared.results.put(result)


def run_phase(
    endpoint: Endpoint,
    server_pid: int | None,
    workload: Workload,
    *,
    produce: bool,
    consume: bool,
    drain_target: int | None = None,
    label: str = "",
    progress: Progress | None = None,
) -> PhaseResult:
    """Run producers (if ``produce``) and workers (if ``consume``) until done.

    A phase that produces ends when every producer finished and, if it also consumes,
    every message put was acked; a drain-only phase ends at ``drain_target`` acks. It
    also ends, with an error in the result, when a process fails or nothing moves for
    ``workload.stall_timeout`` seconds."""
    context = multiprocessing.get_context("fork")
    plans = _plans(endpoint, workload, produce=produce, consume=consume)
    shared = Shared(
        barrier=context.Barrier(len(plans) + 1, timeout=START_TIMEOUT),
        results=context.Queue(),
        stop=context.RawValue("b", 0),
        failed=context.RawValue("b", 0),
        puts=context.RawArray("q", len(plans)),
        acks=context.RawArray("q", len(plans)),
        finished=context.RawArray("b", len(plans)),
    )
    watch = _Watch(
        label=label,
        produce=produce,
        consume=consume,
        drain_target=drain_target,
        stall_timeout=workload.stall_timeout,
        producer_indexes=[plan.index for plan in plans if plan.role == "producer"],
    )
    processes = [context.Process(target=run_child, args=(plan, shared)) for plan in plans]
    for process in processes:
        process.start()
    result = PhaseResult()
    meter = UsageMeter(server_pid)
    try:
        try:
            shared.barrier.wait()
        except threading.BrokenBarrierError:
            result.errors.append(f"the load processes were not ready within {START_TIMEOUT:.0f}s")
            return result
        meter.start()
        result.started_ns = now_ns()
        started = time.monotonic()
        _watch_until_done(watch, shared, processes, meter, result, progress or Progress(False))
        result.server = meter.stop()
        result.wall_seconds = time.monotonic() - started
    finally:
        shared.stop.value = 1
        _collect(shared, processes, result)
        if progress is not None:
            progress.clear()
    return result


def _plans(
    endpoint: Endpoint, workload: Workload, *, produce: bool, consume: bool
) -> list[ChildPlan]:
    """One plan per load process: producers first, then workers, which also share out
    the idle connections. ``index`` is each process's slot in the shared counters."""
    plans: list[ChildPlan] = []
    for connections in deal(workload.producers, workload.processes) if produce else []:
        plans.append(
            ChildPlan(
                role="producer",
                index=len(plans),
                endpoint=endpoint,
                workload=workload,
                connections=connections,
            )
        )
    worker_groups = deal(workload.workers, workload.processes) if consume else []
    idle_shares = deal(workload.idle_workers, len(worker_groups))
    for group, connections in enumerate(worker_groups):
        plans.append(
            ChildPlan(
                role="worker",
                index=len(plans),
                endpoint=endpoint,
                workload=workload,
                connections=connections,
                idle_connections=len(idle_shares[group]) if group < len(idle_shares) else 0,
            )
        )
    return plans


def _watch_until_done(
    watch: _Watch,
    shared: Shared,
    processes: list[Any],
    meter: UsageMeter,
    result: PhaseResult,
    progress: Progress,
) -> None:
    cpu_before = (time.monotonic(), meter.cpu_now())
    while True:
        time.sleep(POLL_SECONDS)
        puts, acks = sum(shared.puts), sum(shared.acks)
        if shared.failed.value:
            return
        if watch.finished(shared, puts, acks):
            return
        if any(p.exitcode is not None and p.exitcode != 0 for p in processes):
            result.errors.append("a load process died")
            return
        if watch.stalled(puts, acks):
            result.errors.append(
                f"nothing was put or acked for {watch.stall_timeout:.0f}s: gave up with "
                f"{puts:,} put and {acks:,} acked (raise --stall-timeout if this is expected)"
            )
            return
        cpu_percent = None
        cpu_now = meter.cpu_now()
        if cpu_now is not None and cpu_before[1] is not None:
            elapsed = time.monotonic() - cpu_before[0]
            cpu_percent = 100 * (cpu_now - cpu_before[1]) / max(elapsed, 1e-9)
        text = watch.line(puts, acks, cpu_percent)
        if text is not None:
            progress.show(text)
            cpu_before = (time.monotonic(), cpu_now)


def _collect(shared: Shared, processes: list[Any], result: PhaseResult) -> None:
    """Take every process's result (before joining: a big result blocks its sender)."""
    for _ in processes:
        try:
            result.add(shared.results.get(timeout=RESULT_TIMEOUT))
        except Exception:
            result.errors.append(f"a load process sent no result within {RESULT_TIMEOUT:.0f}s")
            break
    for process in processes:
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join()


def namespaced(endpoint: Endpoint, namespace: str) -> Endpoint:
    return dataclasses.replace(endpoint, namespace=namespace)
