"""Crash and recover, checked against the reference model.

``StoreMachine`` is ``CoreMachine`` (random operations on the core, each checked against a
plain reference model) with a real store (log and LMDB) in a temporary directory, small
enough that segments fill and checkpoints run, and three more rules: ``commit`` writes the
core's changes as one batch, as the server's group commit does; ``checkpoint`` writes the
log into LMDB; ``crash`` drops the in-memory core and the store at any point and recovers
a new one from the data dir, some time later. The model then goes back to what it was at
the last commit, with no long-polls (their connections went with the broker), and moves on
to the recovery time; the inherited invariants then compare everything observable, and
the heaps.

Deliveries made after the last commit are forgotten by the crash (their replies may have
gone out: the contract lets a crash forget an uncommitted delivery), but ids and lease
tokens are never handed out again: the recovered core starts above every one the crashed
core had handed out, committed or not.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import rule

from broker import Core
from broker._events import EventRing
from broker._settings import DEFAULT_SETTINGS
from broker._store import COUNTER_BLOCK, Store
from tests.test_core_machine import EVENTS_KEPT, START, CoreMachine


class StoreMachine(CoreMachine):
    def __init__(self) -> None:
        # On a tmpfs where there is one: the store syncs at every segment and checkpoint,
        # and thousands of those on a real disk would cost minutes, not coverage.
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.directory = tempfile.mkdtemp(prefix="sluice-store-machine-", dir=shm)
        self.store = self._open_store()
        super().__init__()
        self.commit()

    def _open_store(self) -> Store:
        return Store(
            self.directory,
            fsync="never",
            segment_size=16 << 10,
            checkpoint_bytes=4 << 10,
            checkpoint_seconds=3600.0,
        )

    def new_core(self) -> Core:
        """A core recovered from the store at the machine's time."""
        core = Core(random=lambda: 0.5, track_changes=True, events=EventRing(EVENTS_KEPT))
        self.store.recover(core, getattr(self, "now", START))
        return core

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _remember_committed(self) -> None:
        self._read_events()
        self.committed: dict[str, Any] = {
            "told": dict(self.told),
            "model": copy.deepcopy(self.model),
            "tokens": dict(self.tokens),
            "handed_out": list(self.handed_out),
            "settings": self._configured(),
        }

    def _configured(self) -> dict[str, Any]:
        """The settings of each queue whose settings are not the defaults."""
        queues = self.core.queues.items()
        return {name: q.settings for name, q in queues if q.settings != DEFAULT_SETTINGS}

    @rule()
    def commit(self) -> None:
        batch = self.store.encode(self.core.take_changes())
        self.store.commit(batch)
        self.store.committed(batch)
        self._remember_committed()

    @rule()
    def checkpoint(self) -> None:
        self.store.checkpoint_now()

    @rule(step=st.sampled_from([0.0, 0.5, 3.0, 9.0]), encoded=st.booleans())
    def crash(self, step: float, encoded: bool) -> None:
        """The broker dies (perhaps with a batch encoded but not committed), and a new
        one recovers from the store ``step`` seconds later."""
        if encoded:
            self.store.encode(self.core.take_changes())  # never committed
        highest_id = max(self.core._next_id - 1, 0)
        highest_token = max(self.core._next_token - 1, 0)
        highest_event = self.core.events.next_seq - 1
        self.store.close()
        self.store = self._open_store()
        self.now += step
        self.core = self.new_core()
        assert self.core._next_id > highest_id, "an id could be handed out twice"
        assert self.core._next_token > highest_token, "a lease token could be reused"
        # The events of the old run are gone with it; the new run's are numbered above.
        assert self.core.events.first_seq > highest_event, "an event seq could be reused"
        self.told = dict(self.committed["told"])
        self.events_read = self.core.events.first_seq

        self.model = copy.deepcopy(self.committed["model"])
        self.model.waiters = []
        self.model.completions = []
        for queue in self.model.queues.values():  # buckets are not stored: full again
            if queue.rate_limit is not None:
                queue.bucket = queue.full_bucket(queue.rate_limit, self.now)
        for key in sorted(self.model.schedules):  # recovered in key order
            self.model.schedules[key].order = self.model._next_order()
        # Ids jump to the recovered ceiling, before anything recovery fires takes one.
        self.model.next_id = self.store._id_ceiling - COUNTER_BLOCK
        self.model.tick(self.now)
        self.tokens = dict(self.committed["tokens"])
        self.handed_out = list(self.committed["handed_out"])
        assert self._configured() == self.committed["settings"]
        # Recovering is itself a change only if it applied something that fell due.
        self.commit()


StoreMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40)
test_store_machine = StoreMachine.TestCase
