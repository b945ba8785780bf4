"""A queue's ready messages in delivery order: the highest priority first, and within a
priority the message that became ready first.

One FIFO of messages per priority present, and a heap of those priorities. A message goes
in at the back of its priority's FIFO as it becomes ready (it gets a fresh ``seq`` then,
above every other message's but those put with it, which share it and go in id order), so
each FIFO is in ``(seq, id)`` order; it leaves from the front when it is reserved. A ready
message that is cancelled or purged stays in its slot, stale, until it reaches the front or
the FIFOs are compacted (``discard`` counts them).

The contract that makes a slot's liveness plain: a message holds at most one slot. It can
become ready again only after leaving ready, and it leaves ready either from the front
(reserve: the slot goes with it) or for good (cancel, purge: the slot goes stale). So a
slot is live exactly while its message is READY.

A ready message costs one 8-byte slot here (a heap of ``(-priority, seq, id)`` tuples took
72 bytes), and push and pop are O(1) for a priority already present.
"""

from __future__ import annotations

import collections
import heapq
from collections.abc import Iterable, Iterator
from operator import attrgetter
from typing import Final

from ._lifecycle import READY
from ._message import Message

COMPACT_MIN: Final = 1024  # stale slots tolerated before compacting is considered
_seq: Final = attrgetter("seq")
_id: Final = attrgetter("id")


def delivery_order(message: Message) -> tuple[int, int, int]:
    """The key ready messages are delivered in, smallest first (across queues too)."""
    return -message.priority, message.seq, message.id


class ReadyIndex:
    __slots__ = ("_fifos", "_priorities", "_slots", "_stale")

    def __init__(self) -> None:
        self._fifos: dict[int, collections.deque[Message]] = {}  # priority -> messages
        self._priorities: list[int] = []  # a heap of -priority, one per FIFO
        self._slots = 0  # live and stale
        self._stale = 0

    def __len__(self) -> int:
        """Live slots (exact as long as every stale one was ``discard``-ed once)."""
        return self._slots - self._stale

    @property
    def slots(self) -> int:
        """Every slot held, stale ones included."""
        return self._slots

    def push(self, message: Message) -> None:
        """``message`` became ready (with a ``seq`` above every other ready message's)."""
        fifo = self._fifos.get(message.priority)
        if fifo is None:
            fifo = self._fifos[message.priority] = collections.deque()
            heapq.heappush(self._priorities, -message.priority)
        fifo.append(message)
        self._slots += 1

    def peek(self) -> Message | None:
        """The next message to deliver, or None. Drops the stale slots found in front."""
        priorities = self._priorities
        while priorities:
            fifo = self._fifos[-priorities[0]]
            while fifo:
                message = fifo[0]
                if message.state is READY:
                    return message
                fifo.popleft()
                self._slots -= 1
                self._stale = max(0, self._stale - 1)
            del self._fifos[-heapq.heappop(priorities)]
        return None

    def pop(self) -> Message | None:
        """Take the next message to deliver out (the caller reserves it)."""
        message = self.peek()
        if message is not None:
            self.take(message)
        return message

    def take(self, message: Message) -> None:
        """Take out ``message``, the one ``peek`` has just returned (the caller reserves
        it): no second look for it."""
        self._fifos[message.priority].popleft()
        self._slots -= 1

    def discard(self) -> None:
        """Note that a ready message left for good (its slot is stale now); compact when
        stale slots dominate."""
        self._stale += 1
        if self._stale > COMPACT_MIN and self._stale * 2 > self._slots:
            self.compact()

    def compact(self) -> None:
        live = list(self.in_order())
        self._fifos, self._priorities, self._slots, self._stale = {}, [], 0, 0
        self.load(live)

    def load(self, messages: Iterable[Message]) -> None:
        """Fill an empty index with ready messages in any order (recovery, compacting)."""
        if self._slots:
            raise RuntimeError("load() needs an empty index")
        by_priority: dict[int, list[Message]] = {}
        for message in messages:
            same = by_priority.get(message.priority)
            if same is None:
                same = by_priority[message.priority] = []
            same.append(message)
        for priority, same in by_priority.items():
            # By (seq, id): two stable sorts, not a tuple key, which would allocate one
            # tuple per message (56 MiB more at the peak of a 1M recovery).
            same.sort(key=_id)  # (recovery gives them in id order already: one pass)
            same.sort(key=_seq)
            self._fifos[priority] = collections.deque(same)
            self._slots += len(same)
        self._priorities = [-priority for priority in by_priority]
        heapq.heapify(self._priorities)

    def in_order(self) -> Iterator[Message]:
        """The live messages in delivery order. O(n) to the end: an admin look, never on
        the hot path."""
        for priority in sorted(self._fifos, reverse=True):
            for message in self._fifos[priority]:
                if message.state is READY:
                    yield message
