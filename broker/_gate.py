"""Admission: at most ``max_connections`` connections, and each must say hello within
``hello_timeout`` seconds.

One timer for every connection still waiting for its hello: they time out in the order
they opened (the timeout is the same for all), so an insertion-ordered dict is already
ordered by deadline. The timer is armed for the oldest one only; a thousand silent
sockets cost a dict entry each, not a timer each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Final

from protocol import BadRequest, Quota, SluiceError

from ._logging import event

log = logging.getLogger("sluice.server")

DEFAULT_MAX_CONNECTIONS: Final = 10_000
DEFAULT_HELLO_TIMEOUT: Final = 5.0  # seconds


class Gate:
    """``fail(connection, error)`` gives a connection its last error frame and closes it."""

    def __init__(
        self,
        max_connections: int,
        hello_timeout: float,
        fail: Callable[[Any, SluiceError], None],
    ) -> None:
        self.max_connections = max_connections
        self.hello_timeout = hello_timeout
        self._fail = fail
        self._ungreeted: dict[int, tuple[float, Any]] = {}  # id -> (deadline, connection)
        self._timer: asyncio.TimerHandle | None = None

    def admit(
        self, connection: Any, open_connections: int, loop: asyncio.AbstractEventLoop
    ) -> bool:
        """False (and the connection refused with ``QUOTA``) if the broker is full;
        else the connection's hello deadline starts."""
        if open_connections >= self.max_connections:
            log.warning(
                "refused connection from %s: %d connections open (--max-connections)",
                connection.peer,
                open_connections,
                extra=event("connection_refused", peer=connection.peer, open=open_connections),
            )
            self._fail(
                connection,
                Quota(
                    f"the broker has {self.max_connections} connections (its limit); retry later"
                ),
            )
            return False
        self._ungreeted[connection.id] = (loop.time() + self.hello_timeout, connection)
        if self._timer is None:
            self._arm(loop)
        return True

    def greeted(self, connection: Any) -> None:
        self._ungreeted.pop(connection.id, None)

    def forget(self, connection: Any) -> None:
        self._ungreeted.pop(connection.id, None)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._ungreeted:
            self._timer = None
            return
        deadline, _ = next(iter(self._ungreeted.values()))
        self._timer = loop.call_at(deadline, self._expire, loop)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        while self._ungreeted:
            connection_id, (deadline, connection) = next(iter(self._ungreeted.items()))
            if deadline > now:
                break
            del self._ungreeted[connection_id]
            self._fail(connection, BadRequest(f"no hello within {self.hello_timeout:g}s"))
        self._arm(loop)
