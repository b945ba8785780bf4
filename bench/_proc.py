"""CPU time and memory of a server process, read from Linux's /proc (no psutil).

Each reader returns None when the process is gone or /proc is not there, so a report
can say "n/a" instead of failing a finished run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds the process has used so far."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; the fields after its ")" are fixed.
    fields = text[text.rindex(")") + 2 :].split()
    user_ticks, system_ticks = int(fields[11]), int(fields[12])
    return (user_ticks + system_ticks) / _CLOCK_TICKS


def _status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_bytes(pid: int) -> int | None:
    """The most resident memory the process has had (VmHWM)."""
    kib = _status_kib(pid, "VmHWM")
    return None if kib is None else kib * 1024


def rss_bytes(pid: int) -> int | None:
    """Resident memory now (VmRSS)."""
    kib = _status_kib(pid, "VmRSS")
    return None if kib is None else kib * 1024


@dataclass(frozen=True, slots=True)
class Usage:
    """A server's CPU seconds over an interval, and its memory at the end of it."""

    cpu_seconds: float | None
    rss_bytes: int | None
    peak_rss_bytes: int | None


class UsageMeter:
    """Measures one process from ``start()`` to ``stop()``; a None pid measures nothing."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self._cpu_start: float | None = None

    def cpu_now(self) -> float | None:
        return None if self.pid is None else cpu_seconds(self.pid)

    def start(self) -> None:
        self._cpu_start = self.cpu_now()

    def stop(self) -> Usage:
        if self.pid is None:
            return Usage(None, None, None)
        cpu_end = cpu_seconds(self.pid)
        used = None
        if cpu_end is not None and self._cpu_start is not None:
            used = cpu_end - self._cpu_start
        return Usage(used, rss_bytes(self.pid), peak_rss_bytes(self.pid))
