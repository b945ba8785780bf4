"""Bindings: which queues a publish on a channel also puts a copy into (durable fan-out,
like a topic exchange's bindings). Pure state with change tracking for the store; the
core holds one (``Core.bindings``) and the publish handler asks it which queues a channel
reaches."""

from __future__ import annotations

from typing import Final

from protocol import BadRequest

from ._subjects import SubjectTrie

MAX_BINDINGS: Final = 10_000
Binding = tuple[str, str]  # (pattern, queue)


class Bindings:
    """The (pattern, queue) pairs, filed in a trie by pattern. ``changed`` (when
    tracking): pair -> True (added) or False (removed), since the store last took it."""

    def __init__(self, track_changes: bool = False) -> None:
        self._trie: SubjectTrie[str] = SubjectTrie()
        self._pairs: set[Binding] = set()
        self.changed: dict[Binding, bool] | None = {} if track_changes else None

    def bind(self, pattern: str, queue: str) -> bool:
        """Add a binding (valid names assumed); False if it existed. ``BadRequest`` past
        ``MAX_BINDINGS``."""
        if (pattern, queue) in self._pairs:
            return False
        if len(self._pairs) >= MAX_BINDINGS:
            raise BadRequest(f"bind: the broker holds {MAX_BINDINGS} bindings, its limit")
        self._add(pattern, queue)
        return True

    def unbind(self, pattern: str, queue: str) -> bool:
        """Remove a binding; False if there was none."""
        if (pattern, queue) not in self._pairs:
            return False
        self._pairs.remove((pattern, queue))
        self._trie.remove(pattern, queue)
        if self.changed is not None:
            self.changed[pattern, queue] = False
        return True

    def restore(self, pairs: list[Binding]) -> None:
        """Load stored bindings (recovery): no change is recorded for them."""
        changed, self.changed = self.changed, None
        for pattern, queue in pairs:
            self._add(pattern, queue)
        self.changed = changed

    def _add(self, pattern: str, queue: str) -> None:
        self._pairs.add((pattern, queue))
        self._trie.add(pattern, queue)
        if self.changed is not None:
            self.changed[pattern, queue] = True

    def queues_for(self, channel: str) -> list[str]:
        """The queues bound by a pattern matching ``channel``, each once, sorted."""
        return sorted(self._trie.match(channel)) if self._pairs else []

    def patterns_into(self, queue: str) -> list[str]:
        """The patterns bound to ``queue``, sorted. O(bindings): for deleting a queue."""
        return sorted(pattern for pattern, bound in self._pairs if bound == queue)

    def __contains__(self, binding: Binding) -> bool:
        return binding in self._pairs

    def listed(self) -> list[Binding]:
        return sorted(self._pairs)

    def take_changes(self) -> dict[Binding, bool]:
        changed, self.changed = self.changed or {}, {}
        return changed

    def __bool__(self) -> bool:
        return bool(self._pairs)
