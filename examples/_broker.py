"""Start a throwaway broker for an example, and stop it afterwards.

The broker runs as ``python -m broker --port 0 --in-memory`` in a child process: it picks a
free port and prints it on its first line, and keeps nothing on disk.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_PREFIX = "sluice listening on "
START_TIMEOUT = 10.0  # seconds the broker gets to print its listening line
STOP_TIMEOUT = 10.0  # seconds the broker gets to exit after SIGTERM


@contextmanager
def running_broker() -> Iterator[tuple[str, int]]:
    """Yield the ``(host, port)`` of a fresh in-memory broker; SIGTERM it on the way out.

    Raises ``RuntimeError`` if the broker does not start. Its log (warnings and errors
    only) goes to this process's stderr."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("SLUICE_")}
    command = [sys.executable, "-m", "broker", "--port", "0", "--in-memory"]
    command += ["--metrics-port", "0", "--log-level", "warning"]
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        readable, _, _ = select.select([process.stdout], [], [], START_TIMEOUT)
        first = process.stdout.readline() if readable else ""  # printed once it listens
        if not first.startswith(READY_PREFIX):
            raise RuntimeError(f"the broker did not start (it printed {first!r}); see above")
        host, _, port = first[len(READY_PREFIX) :].strip().rpartition(":")
        yield host, int(port)
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
    if code != 0:
        print(f"warning: the broker exited with status {code}", file=sys.stderr)
