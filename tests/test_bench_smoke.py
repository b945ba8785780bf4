"""The benchmarks still run: tiny sizes, no timing asserted. bench.roundtrip exits non-zero
if any message was not acked exactly once, so this also checks that accounting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("module", "args", "expected"),
    [
        ("bench.micro_core", ["--messages", "1000", "--repeat", "1"], "put+reserve+ack/s"),
        ("bench.micro_codec", ["--frames", "1000", "--repeat", "1"], "decode whole/s"),
        ("bench.roundtrip", ["--messages", "300", "--workers", "4"], "acked exactly once"),
        ("bench.roundtrip", ["--messages", "300", "--batch", "50"], "acked exactly once"),
    ],
)
def test_benchmark_runs(module: str, args: list[str], expected: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout
