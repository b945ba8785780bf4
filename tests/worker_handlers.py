"""Handlers for tests that run ``python -m client.worker`` as a subprocess.

Each blocks until the test releases its job: it creates ``started-<body>`` in the directory
named by ``SLUICE_TEST_GATES``, then waits for the test to create ``release-<body>`` there.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from client.worker import AsyncJob, Job

POLL = 0.01  # seconds between looks for the release file


def _gates(body: bytes) -> tuple[Path, Path]:
    directory = Path(os.environ["SLUICE_TEST_GATES"])
    name = body.decode()
    return directory / f"started-{name}", directory / f"release-{name}"


def block_until_released(job: Job) -> None:
    started, release = _gates(job.body)
    started.touch()
    while not release.exists():
        time.sleep(POLL)


async def block_until_released_async(job: AsyncJob) -> None:
    started, release = _gates(job.body)
    started.touch()
    while not release.exists():
        await asyncio.sleep(POLL)
