"""Crash and recover, checked against the reference model.

``StoreMachine`` is ``CoreMachine`` (random operations on the core, each checked against a
plain reference model) with a real LMDB store in a temporary directory and two more
rules: ``commit`` writes the core's changes as one batch, as the server's group commit
does; ``crash`` drops the in-memory core at any point and recovers a new one from the
store, some time later. The model then goes back to what it was at the last commit, with
no long-polls (their connections went with the broker), and moves on to the recovery
time; the inherited invariants then compare everything observable, and the heaps.

Ids and lease tokens handed out after the last commit may be handed out again after a
crash: no client saw them, because the server replies only after the commit. So the
machine forgets them too.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import rule

from broker import Core
from broker._store import Store
from tests.test_core_machine import QUEUES, CoreMachine


class StoreMachine(CoreMachine):
    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="sluice-store-machine-")
        self.store = Store(self.directory, fsync="never")
        super().__init__()
        self.commit()

    def new_core(self) -> Core:
        return Core(random=lambda: 0.5, track_changes=True)

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _remember_committed(self) -> None:
        self.committed: dict[str, Any] = {
            "model": copy.deepcopy(self.model),
            "tokens": dict(self.tokens),
            "handed_out": list(self.handed_out),
            "settings": {name: self.core.queues[name].settings for name in QUEUES},
        }

    @rule()
    def commit(self) -> None:
        batch = self.store.encode(self.core.take_changes())
        self.store.commit(batch)
        self.store.committed(batch)
        self._remember_committed()

    @rule(step=st.sampled_from([0.0, 0.5, 3.0, 9.0]), encoded=st.booleans())
    def crash(self, step: float, encoded: bool) -> None:
        """The broker dies (perhaps with a batch encoded but not committed), and a new
        one recovers from the store ``step`` seconds later."""
        if encoded:
            self.store.encode(self.core.take_changes())  # never committed
        self.now += step
        self.core = self.new_core()
        self.store.recover(self.core, self.now)

        self.model = copy.deepcopy(self.committed["model"])
        self.model.waiters = []
        self.model.completions = []
        self.model.tick(self.now)
        self.tokens = dict(self.committed["tokens"])
        self.handed_out = list(self.committed["handed_out"])
        for name, expected in self.committed["settings"].items():
            assert self.core.queues[name].settings == expected
        # Recovering is itself a change only if it applied something that fell due.
        self.commit()


StoreMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_store_machine = StoreMachine.TestCase
