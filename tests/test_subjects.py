"""The token trie against the plain matcher, and the rules for channel names and patterns."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker._subjects import (
    MAX_CHANNEL,
    SubjectTrie,
    match_all,
    matches,
    require_channel,
    require_pattern,
)
from protocol import BadRequest

TOKENS = st.sampled_from(["a", "b", "c", "orders", "eu"])
channels = st.lists(TOKENS, min_size=1, max_size=5).map(".".join)
pattern_tokens = st.lists(st.one_of(TOKENS, st.just("*")), min_size=1, max_size=5)
patterns = st.one_of(
    pattern_tokens.map(".".join),
    pattern_tokens.map(lambda tokens: ".".join([*tokens[:-1], ">"])),
)


@pytest.mark.parametrize(
    ("pattern", "channel", "expected"),
    [
        ("orders.eu", "orders.eu", True),
        ("orders.eu", "orders.us", False),
        ("orders.*", "orders.eu", True),
        ("orders.*", "orders.eu.42", False),
        ("orders.*", "orders", False),
        ("orders.>", "orders.eu.42", True),
        ("orders.>", "orders", False),
        (">", "orders", True),
        ("*.eu.*", "orders.eu.42", True),
        ("*", "orders.eu", False),
    ],
)
def test_matches(pattern: str, channel: str, expected: bool) -> None:
    assert matches(pattern, channel) is expected
    trie: SubjectTrie[str] = SubjectTrie()
    trie.add(pattern, "x")
    assert trie.match(channel) == ({"x"} if expected else set())


@settings(max_examples=300)
@given(
    st.lists(st.tuples(patterns, st.integers(0, 5)), max_size=30),
    st.lists(st.tuples(patterns, st.integers(0, 5)), max_size=30),
    st.lists(channels, min_size=1, max_size=10),
)
def test_trie_agrees_with_scanning(
    added: list[tuple[str, int]], removed: list[tuple[str, int]], probes: list[str]
) -> None:
    trie: SubjectTrie[int] = SubjectTrie()
    held: set[tuple[str, int]] = set()
    for pattern, value in added:
        assert trie.add(pattern, value) is ((pattern, value) not in held)
        held.add((pattern, value))
    for pattern, value in removed:
        assert trie.remove(pattern, value) is ((pattern, value) in held)
        held.discard((pattern, value))
    assert trie.size == len(held)
    for channel in probes:
        assert trie.match(channel) == match_all(held, channel)


@given(st.lists(st.tuples(patterns, st.integers(0, 3)), max_size=20))
def test_removing_everything_leaves_an_empty_trie(pairs: list[tuple[str, int]]) -> None:
    trie: SubjectTrie[int] = SubjectTrie()
    for pattern, value in pairs:
        trie.add(pattern, value)
    for pattern, value in set(pairs):
        assert trie.remove(pattern, value)
    assert not trie
    assert trie._root.empty()  # every node pruned: memory follows what is held


@pytest.mark.parametrize(
    "name",
    ["", ".", "a.", ".a", "a..b", "a b", "a.*", "a.>", "x" * (MAX_CHANNEL + 1), 7, None, b"a"],
)
def test_bad_channel_names(name: object) -> None:
    with pytest.raises(BadRequest):
        require_channel(name, "publish")


@pytest.mark.parametrize("pattern", ["", "a.", "a..b", "a*", "a.>.b", ">.a", "a.b>", "é", 3])
def test_bad_patterns(pattern: object) -> None:
    with pytest.raises(BadRequest):
        require_pattern(pattern, "subscribe")


@pytest.mark.parametrize("pattern", ["a", "a.b", "*", ">", "a.*.c", "*.>", "a-b:c_d.>"])
def test_good_patterns(pattern: str) -> None:
    assert require_pattern(pattern, "subscribe") == pattern


def test_a_job_event_channel_of_the_longest_queue_name_is_a_valid_pattern() -> None:
    longest = "q" * 200  # the longest queue name
    assert require_pattern(f"queue.{longest}.configured", "subscribe")
    assert require_channel(f"queue.{longest}.configured", "publish")
