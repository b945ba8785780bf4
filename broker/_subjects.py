"""Channel names, NATS-style patterns, and the token trie that matches one against many.

A channel is ``.``-separated tokens of the queue-name alphabet (``orders.eu.42``). A
pattern is a channel whose tokens may also be ``*`` (exactly one token) or, as the last
token only, ``>`` (one or more tokens). ``SubjectTrie.match`` walks the channel's tokens
down a trie of patterns: its cost grows with the channel's length and the patterns that
share its prefixes, never with every pattern held.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

from protocol import BadRequest, shown

MAX_CHANNEL: Final = 256  # characters: room for a job event's ``queue.<queue>.<event>``
_NAME: Final = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_CHANNEL}}}")
ONE: Final = "*"  # matches exactly one token
REST: Final = ">"  # as the last token: matches one or more tokens
V = TypeVar("V", bound=Hashable)


def _tokens(value: object, where: str, kind: str) -> list[str]:
    if not isinstance(value, str) or _NAME.fullmatch(value) is None:
        raise BadRequest(
            f"{where}: invalid {kind} {shown(value)}: use 1-{MAX_CHANNEL} characters of "
            "A-Z a-z 0-9 _ : - in tokens separated by '.'"
            + (" ('*' one token, '>' the rest)" if kind == "pattern" else "")
        )
    assert isinstance(value, str)
    tokens = value.split(".")
    if "" in tokens:
        raise BadRequest(f"{where}: invalid {kind} {shown(value)}: empty token")
    return tokens


def require_channel(value: object, where: str) -> str:
    """``value`` if it is a channel name, else ``BadRequest``."""
    wild = value.replace(ONE, "").replace(REST, "") if isinstance(value, str) else value
    if isinstance(value, str) and wild != value:
        raise BadRequest(f"{where}: a channel name has no wildcards, got {shown(value)}")
    _tokens(value, where, "channel name")
    return value  # type: ignore[return-value]


def require_pattern(value: object, where: str) -> str:
    """``value`` if it is a pattern, else ``BadRequest``."""
    plain = value.replace(ONE, "a").replace(REST, "a") if isinstance(value, str) else value
    tokens = _tokens(plain, where, "pattern")
    assert isinstance(value, str)
    for index, token in enumerate(value.split(".")):
        if (ONE in token or REST in token) and token not in (ONE, REST):
            raise BadRequest(f"{where}: '*' and '>' must be whole tokens, got {shown(value)}")
        if token == REST and index != len(tokens) - 1:
            raise BadRequest(f"{where}: '>' may only be the last token, got {shown(value)}")
    return value


def matches(pattern: str, channel: str) -> bool:
    """Whether ``pattern`` matches ``channel``, token by token (the plain rule that the
    trie must agree with)."""
    wanted, tokens = pattern.split("."), channel.split(".")
    for index, token in enumerate(wanted):
        if token == REST:
            return len(tokens) > index
        if index >= len(tokens) or token not in (ONE, tokens[index]):
            return False
    return len(tokens) == len(wanted)


@dataclass(slots=True, eq=False)
class _Node(Generic[V]):
    children: dict[str, _Node[V]] = field(default_factory=dict)  # by token, '*' included
    here: set[V] = field(default_factory=set)  # values whose pattern ends at this node
    rest: set[V] = field(default_factory=set)  # values whose pattern has '>' next

    def empty(self) -> bool:
        return not (self.children or self.here or self.rest)


class SubjectTrie(Generic[V]):
    """Values filed under patterns. ``add`` and ``remove`` cost the pattern's length;
    ``match`` returns every value with a pattern that matches a channel (once each)."""

    def __init__(self) -> None:
        self._root: _Node[V] = _Node()
        self.size = 0  # (pattern, value) pairs held

    def add(self, pattern: str, value: V) -> bool:
        """File ``value`` under ``pattern``; False if it already was."""
        node = self._root
        tokens = pattern.split(".")
        for token in tokens[:-1]:
            node = node.children.setdefault(token, _Node())
        last = tokens[-1]
        values = node.rest if last == REST else node.children.setdefault(last, _Node()).here
        if value in values:
            return False
        values.add(value)
        self.size += 1
        return True

    def remove(self, pattern: str, value: V) -> bool:
        """Take ``value`` out from under ``pattern``; False if it was not there. Prunes
        the nodes left empty."""
        tokens = pattern.split(".")
        path = [self._root]
        for token in tokens if tokens[-1] != REST else tokens[:-1]:
            child = path[-1].children.get(token)
            if child is None:
                return False
            path.append(child)
        values = path[-1].rest if tokens[-1] == REST else path[-1].here
        if value not in values:
            return False
        values.remove(value)
        self.size -= 1
        steps = tokens if tokens[-1] != REST else tokens[:-1]
        for depth in range(len(steps), 0, -1):
            if not path[depth].empty():
                break
            del path[depth - 1].children[steps[depth - 1]]
        return True

    def match(self, channel: str) -> set[V]:
        found: set[V] = set()
        self._walk(self._root, channel.split("."), 0, found)
        return found

    def _walk(self, node: _Node[V], tokens: list[str], index: int, found: set[V]) -> None:
        if index == len(tokens):
            found.update(node.here)
            return
        found.update(node.rest)
        for key in (tokens[index], ONE):
            child = node.children.get(key)
            if child is not None:
                self._walk(child, tokens, index + 1, found)

    def __bool__(self) -> bool:
        return self.size > 0


def match_all(pairs: Iterable[tuple[str, V]], channel: str) -> set[V]:
    """Every value whose pattern matches ``channel``, by scanning: for tests."""
    return {value for pattern, value in pairs if matches(pattern, channel)}
