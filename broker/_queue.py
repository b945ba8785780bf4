"""A named queue's in-memory indexes, and the long-poll waiters that block on queues."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

from sortedcontainers import SortedDict

from ._histogram import PROCESSING_SECONDS, Histogram
from ._lifecycle import DEAD, DELAYED, READY, RESERVED, State
from ._limits import Limits
from ._message import Message
from ._position import ReadyRanks
from ._ready import ReadyIndex
from ._settings import DEFAULT_SETTINGS, QueueSettings

TOTALS = ("put", "delivered", "acked", "nacked", "expired", "dead_lettered")
# Every queue's ``dead`` until its first dead letter: read-only by contract (only
# ``add_dead`` inserts, and it gives the queue its own first). A queue is made again each
# time a put finds it forgotten, and a SortedDict is half of what making one costs.
_NO_DEAD: SortedDict = SortedDict()
# What a new queue copies (a copy costs a fifth of building each anew; same reason).
_NO_COUNTS: dict[State, int] = {READY: 0, DELAYED: 0, RESERVED: 0, DEAD: 0}
_NO_TOTALS: dict[str, int] = dict.fromkeys(TOTALS, 0)
_NO_PROCESSING = Histogram(PROCESSING_SECONDS)


class Waiter:
    """A reserve that found nothing and long-polls until ``deadline``.

    It sits in the ``waiters`` of every queue it names, in arrival order (``seq``), and is
    served once: with messages as soon as one of its queues has some, or empty-handed at its
    deadline or when its connection goes away."""

    __slots__ = ("deadline", "key", "max_messages", "queues", "seq", "visibility_timeout")

    def __init__(
        self,
        key: Hashable,
        seq: int,
        queues: list[Queue],
        max_messages: int,
        visibility_timeout: float | None,
        deadline: float,
    ) -> None:
        self.key = key
        self.seq = seq
        self.queues = queues
        self.max_messages = max_messages
        self.visibility_timeout = visibility_timeout
        self.deadline = deadline


class Queue:
    """Indexes of one queue. Ready messages are in ``ready`` in delivery order: the
    highest priority first, then the one that became ready first. Delayed and reserved messages
    live in the core's broker-wide deadline heaps; only their counts are kept here. Dead
    letters are kept by id (for paging) until replayed, purged or expired. ``processing``
    is the reserve-to-ack time of each ack (in memory only, for metrics). ``ranks`` orders
    the ready messages for ``status``'s position, once someone has asked for one.
    ``anchors`` counts the schedules and bindings that name the queue."""

    __slots__ = (
        "anchors",
        "counts",
        "dead",
        "limits",
        "name",
        "processing",
        "ranks",
        "ready",
        "settings",
        "totals",
        "waiters",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.settings = DEFAULT_SETTINGS
        self.anchors = 0
        self.ready = ReadyIndex()
        self.counts = _NO_COUNTS.copy()
        self.totals = _NO_TOTALS.copy()
        self.dead: SortedDict = _NO_DEAD  # message id -> Message
        self.waiters: OrderedDict[int, Waiter] = OrderedDict()  # waiter seq -> Waiter
        self.processing = _NO_PROCESSING.empty()
        self.limits: Limits | None = None  # set while a rate limit or cap is configured
        self.ranks: ReadyRanks | None = None  # built by the first position asked (_position)

    def apply(self, settings: QueueSettings, now: float) -> None:
        """Take new settings. A changed rate limit starts a new, full bucket; the cap
        alone changing keeps the bucket."""
        old = self.limits
        if not settings.limited:
            self.limits = None
        elif old is None or old.rate_limit != settings.rate_limit:
            self.limits = Limits(settings.rate_limit, settings.max_in_flight, now)
        else:
            old.max_in_flight = settings.max_in_flight
        self.settings = settings

    def unused(self) -> bool:
        """True if forgetting the queue loses nothing but its totals: it holds no message
        (ready, delayed, reserved or dead), has default settings (so it is not paused),
        no schedule or binding names it and nobody waits on it. (With no message there is
        no wait for a message's outcome either.) Cheapest tests first: a queue in use
        fails the first or second."""
        counts = self.counts
        return (
            not counts[READY]
            and not counts[RESERVED]
            and not counts[DELAYED]
            and not counts[DEAD]
            and not self.waiters
            and not self.anchors
            and (self.settings is DEFAULT_SETTINGS or self.settings == DEFAULT_SETTINGS)
        )

    def can_deliver(self, now: float) -> bool:
        if self.counts[READY] == 0 or self.settings.paused:
            return False
        return self.limits is None or self.limits.quota(now, self.counts[RESERVED]) > 0

    def best_ready(self) -> Message | None:
        """The next message this queue would deliver, or None."""
        if self.settings.paused:
            return None
        return self.ready.peek()

    def stats(self, now: float) -> dict[str, Any]:
        stats = {
            "queue": self.name,
            "ready": self.counts[READY],
            "delayed": self.counts[DELAYED],
            "reserved": self.counts[RESERVED],
            "dead": self.counts[DEAD],
            "paused": self.settings.paused,
            "waiting": len(self.waiters),
            "totals": dict(self.totals),
        }
        if self.limits is not None:
            stats["limits"] = self.limits.stats(now, self.counts[RESERVED])
        return stats

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ready": self.counts[READY],
            "delayed": self.counts[DELAYED],
            "reserved": self.counts[RESERVED],
            "dead": self.counts[DEAD],
            "paused": self.settings.paused,
        }

    def add_dead(self, message: Message) -> None:
        if self.dead is _NO_DEAD:
            self.dead = SortedDict()
        self.dead[message.id] = message
