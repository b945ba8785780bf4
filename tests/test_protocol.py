"""Tests for the sans-IO wire protocol (``protocol/``), in the style of h11's tests.

Every reader is driven three ways (whole, one byte at a time, with trailing data), frame
streams are split at every possible point, round trips and the decoder's refusal of hostile
input are checked with hypothesis.
"""

from __future__ import annotations

import contextlib
import itertools
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import protocol
from protocol import (
    DEFAULT_MAX_FRAME,
    ERROR_CLASSES,
    HEADER_SIZE,
    MAX_REQUEST_ID,
    NEED_DATA,
    BadFrame,
    BadRequest,
    ErrorCode,
    FrameDecoder,
    InternalError,
    NotFound,
    Reply,
    Request,
    SluiceError,
    TooLarge,
    decode_payload,
    encode_frame,
    error_from_wire,
    pack,
    parse_reply,
    parse_request,
    request_id_of,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- helpers


def header(length: int) -> bytes:
    return struct.pack(">I", length)


def raw_frame(payload: bytes) -> bytes:
    """A frame around arbitrary payload bytes (not necessarily valid msgpack)."""
    return header(len(payload)) + payload


def drain(decoder: FrameDecoder) -> list[Any]:
    """Pull every complete frame out of ``decoder``."""
    out = []
    while True:
        obj = decoder.next_frame()
        if obj is NEED_DATA:
            return out
        out.append(obj)


def feed_chunks(decoder: FrameDecoder, chunks: list[bytes]) -> list[Any]:
    out = []
    for chunk in chunks:
        decoder.feed(chunk)
        out += drain(decoder)
    return out


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def normalize(x: Any) -> Any:
    """Comparable form of a Request/Reply (exceptions compare by identity otherwise)."""
    if isinstance(x, Reply):
        err = x.error
        if err is None:
            return ("reply", x.request_id, True, x.result)
        return ("reply", x.request_id, False, type(err), err.message, err.details)
    return x


def assert_broken(decoder: FrameDecoder) -> None:
    """After a framing error the decoder refuses every further use."""
    with pytest.raises(BadFrame):
        decoder.next_frame()
    with pytest.raises(BadFrame):
        decoder.feed(encode_frame([1, "ping", {}]))
    with pytest.raises(BadFrame):
        decoder.next_frame()


def identity(obj: Any) -> Any:
    return obj


TRAILER_OBJ = [99, "ping", {"trailing": True}]
TRAILER = encode_frame(TRAILER_OBJ)


def t_reader(frames: list[bytes], expected: list[Any], parse: Any = identity) -> None:
    """Drive a FrameDecoder (+ ``parse``) over ``frames`` the h11 way.

    ``frames[i]`` is the encoding of ``expected[i]`` (compared after ``parse``/``normalize``).
    """
    assert len(frames) == len(expected)
    data = b"".join(frames)
    want = [normalize(e) for e in expected]

    def parsed(objs: list[Any]) -> list[Any]:
        return [normalize(parse(o)) for o in objs]

    # Whole, in one feed (several frames in one feed when len(frames) > 1).
    d = FrameDecoder()
    d.feed(data)
    assert d.buffered == len(data)
    assert parsed(drain(d)) == want
    assert d.buffered == 0
    assert d.next_frame() is NEED_DATA

    # One byte at a time: each frame appears exactly when its last byte arrives.
    ends = set()
    pos = 0
    for f in frames:
        pos += len(f)
        ends.add(pos)
    d = FrameDecoder()
    got: list[Any] = []
    for i in range(len(data)):
        d.feed(data[i : i + 1])
        new = drain(d)
        if i + 1 in ends:
            assert len(new) == 1, f"no frame after byte {i}"
        else:
            assert new == [], f"premature frame after byte {i}"
        got += new
    assert parsed(got) == want
    assert d.buffered == 0

    # With trailing data: any prefix of a following frame stays buffered, and completing it
    # yields that frame.
    for cut in range(len(TRAILER)):
        d = FrameDecoder()
        d.feed(data + TRAILER[:cut])
        assert parsed(drain(d)) == want
        assert d.buffered == cut
        assert d.next_frame() is NEED_DATA
        assert d.buffered == cut
        d.feed(TRAILER[cut:])
        assert drain(d) == [TRAILER_OBJ]
        assert d.buffered == 0


# --------------------------------------------------------------------------- strategies

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
request_ids = st.integers(min_value=0, max_value=MAX_REQUEST_ID)
ops = st.text(min_size=1, max_size=20)
args_maps = st.dictionaries(st.text(max_size=12), values, max_size=5)
requests = st.builds(Request, request_id=request_ids, op=ops, args=args_maps)
details_maps = st.none() | st.dictionaries(st.text(max_size=8), values, max_size=3)
ok_replies = st.builds(Reply, request_id=st.none() | request_ids, result=values)


@st.composite
def error_replies(draw: st.DrawFn) -> Reply:
    code = draw(st.sampled_from(list(ErrorCode)))
    err = ERROR_CLASSES[code](draw(st.text(max_size=30)), draw(details_maps))
    return Reply(request_id=draw(st.none() | request_ids), error=err)


def decode_in_chunks(frame: bytes, data: st.DataObject) -> Any:
    cuts = data.draw(st.lists(st.integers(0, len(frame)), max_size=4), label="cuts")
    d = FrameDecoder()
    objs = feed_chunks(d, split_at(frame, cuts))
    assert len(objs) == 1
    assert d.buffered == 0
    return objs[0]


# --------------------------------------------------------------------------- readers

SAMPLE_REQUESTS = [
    Request(request_id=0, op="ping"),
    Request(
        request_id=MAX_REQUEST_ID,
        op="put",
        args={"queue": "jobs", "body": b"\x00\xff\x00", "priority": -3, "delay": 1.5},
    ),
    Request(request_id=7, op="ack", args={"ids": [1, 2, 3], "nested": {"a": [None, True]}}),
]
SAMPLE_OK_REPLIES = [
    Reply(request_id=0, result=None),
    Reply(request_id=MAX_REQUEST_ID, result={"ids": [1, 2], "body": b"\x80\x81"}),
    Reply(request_id=None, result="pong"),
]
SAMPLE_ERROR_REPLIES = [
    Reply(request_id=1, error=NotFound("no such queue")),
    Reply(request_id=None, error=BadFrame("garbage", {"offset": 12})),
    Reply(request_id=3, error=TooLarge("body too large", {"max_body": 1024, "got": b"x"})),
]


def _frames(items: list[Any]) -> list[bytes]:
    return [encode_frame(x.to_wire()) for x in items]


@pytest.mark.parametrize(
    ("items", "parse"),
    [
        (SAMPLE_REQUESTS, parse_request),
        (SAMPLE_OK_REPLIES, parse_reply),
        (SAMPLE_ERROR_REPLIES, parse_reply),
        (SAMPLE_OK_REPLIES + SAMPLE_ERROR_REPLIES, parse_reply),
    ],
    ids=["requests", "ok-replies", "error-replies", "mixed-replies"],
)
def test_readers(items: list[Any], parse: Any) -> None:
    frames = _frames(items)
    # Each frame alone, then the whole stream.
    for frame, item in zip(frames, items, strict=True):
        t_reader([frame], [item], parse)
    t_reader(frames, items, parse)


@pytest.mark.parametrize(
    "obj",
    [None, 0, -1, 2**64 - 1, -(2**63), 1.25, "", "héllo", b"", b"\x00" * 300, [], {}, [[[]]]],
)
def test_reader_arbitrary_objects(obj: Any) -> None:
    t_reader([encode_frame(obj)], [obj])


def test_encode_frame_layout() -> None:
    frame = encode_frame([1, "ping", {}])
    payload = pack([1, "ping", {}])
    assert frame == header(len(payload)) + payload
    assert len(frame) == HEADER_SIZE + len(payload)
    assert HEADER_SIZE == 4
    assert decode_payload(payload) == [1, "ping", {}]
    # str packs as str, bytes as bin
    assert pack("a") == b"\xa1a"
    assert pack(b"a") == b"\xc4\x01a"


def test_need_data_on_empty_and_is_idempotent() -> None:
    d = FrameDecoder()
    assert d.next_frame() is NEED_DATA
    assert d.next_frame() is NEED_DATA
    assert d.buffered == 0
    assert repr(NEED_DATA) == "NEED_DATA"
    d.feed(b"")
    assert d.next_frame() is NEED_DATA


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_feed_accepts_bytes_like(kind: Any) -> None:
    frame = encode_frame([5, "ping", {}])
    d = FrameDecoder()
    d.feed(kind(frame[:3]))
    d.feed(kind(frame[3:]))
    assert drain(d) == [[5, "ping", {}]]


def test_several_frames_in_one_feed() -> None:
    objs = [[i, "put", {"body": bytes([i]) * i}] for i in range(20)]
    d = FrameDecoder()
    d.feed(b"".join(encode_frame(o) for o in objs))
    assert drain(d) == objs
    assert d.buffered == 0


def test_split_at_every_point() -> None:
    items = [*SAMPLE_REQUESTS, *SAMPLE_OK_REPLIES]
    objs = [x.to_wire() for x in items]
    data = b"".join(encode_frame(o) for o in objs)
    for cut in range(len(data) + 1):
        d = FrameDecoder()
        got = feed_chunks(d, [data[:cut], data[cut:]])
        assert got == objs, cut
        assert d.buffered == 0


def test_split_single_frame_at_every_pair_of_points() -> None:
    obj = [3, "put", {"queue": "q", "body": b"\x01\x02\x03"}]
    frame = encode_frame(obj)
    n = len(frame)
    for i in range(n + 1):
        for j in range(i, n + 1):
            d = FrameDecoder()
            got = []
            for end, chunk in ((i, frame[:i]), (j, frame[i:j]), (n, frame[j:])):
                d.feed(chunk)
                got += drain(d)
                assert got == ([obj] if end == n else []), (i, j)
                assert d.buffered == (0 if end == n else end)
            assert got == [obj]


@given(
    sizes=st.lists(st.sampled_from([0, 1, 100, 16 * 1024, 16 * 1024 + 1, 70_000]), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=200_000), max_size=12),
    kinds=st.lists(st.sampled_from([bytes, bytearray, memoryview]), min_size=1),
)
def test_frames_small_and_large_in_any_pieces_of_any_kind(
    sizes: list[int], cuts: list[int], kinds: list[Any]
) -> None:
    # Small payloads are decoded from a copy, large ones from a view of the buffer; a
    # feed may land on an empty buffer (kept as it came) or on leftover bytes.
    objs = [[n, "put", {"body": bytes([n % 251]) * size}] for n, size in enumerate(sizes)]
    data = b"".join(encode_frame(o) for o in objs)
    pieces = split_at(data, [cut % (len(data) + 1) for cut in cuts])
    d = FrameDecoder()
    got = feed_chunks(d, [kinds[n % len(kinds)](p) for n, p in enumerate(pieces)])
    assert got == objs
    assert d.buffered == 0


# --------------------------------------------------------------------------- round trips


@given(req=requests, data=st.data())
@example(
    req=Request(request_id=MAX_REQUEST_ID, op="put", args={"body": b"\x00\xff", "n": [b""]}),
    data=None,
)
def test_request_round_trip(req: Request, data: st.DataObject | None) -> None:
    frame = encode_frame(req.to_wire())
    if data is None:
        d = FrameDecoder()
        d.feed(frame)
        [obj] = drain(d)
    else:
        obj = decode_in_chunks(frame, data)
    back = parse_request(obj)
    assert back == req
    assert type(back.request_id) is int
    assert request_id_of(obj) == req.request_id


@given(reply=ok_replies, data=st.data())
def test_ok_reply_round_trip(reply: Reply, data: st.DataObject) -> None:
    obj = decode_in_chunks(encode_frame(reply.to_wire()), data)
    back = parse_reply(obj)
    assert back.ok
    assert back == reply


@given(reply=error_replies(), data=st.data())
def test_error_reply_round_trip(reply: Reply, data: st.DataObject) -> None:
    obj = decode_in_chunks(encode_frame(reply.to_wire()), data)
    back = parse_reply(obj)
    assert not back.ok
    assert back.result is None
    assert back.request_id == reply.request_id
    assert reply.error is not None and back.error is not None
    assert type(back.error) is type(reply.error)
    assert back.error.code == reply.error.code
    assert back.error.message == reply.error.message
    assert back.error.details == reply.error.details


@pytest.mark.parametrize("details", [None, {}, {"ids": [1, 2], "raw": b"\xff"}])
@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_reply_round_trip_every_code(code: ErrorCode, details: Any) -> None:
    cls = ERROR_CLASSES[code]
    reply = Reply(request_id=42, error=cls("it went wrong", details))
    d = FrameDecoder()
    d.feed(encode_frame(reply.to_wire()))
    [obj] = drain(d)
    assert obj[1] is False
    assert obj[2]["code"] == code.value
    assert ("details" in obj[2]) == bool(details)
    back = parse_reply(obj)
    assert type(back.error) is cls
    assert back.error is not None
    assert back.error.code is code
    assert back.error.message == "it went wrong"
    assert back.error.details == (details or {})
    assert back.request_id == 42


# --------------------------------------------------------------------------- size limits


@pytest.mark.parametrize("max_frame", [0, 1, 1024, DEFAULT_MAX_FRAME, 0xFFFFFFFE])
def test_max_length_prefix_refused_after_header_alone(max_frame: int) -> None:
    d = FrameDecoder(max_frame)
    d.feed(b"\xff\xff\xff")
    assert d.next_frame() is NEED_DATA
    assert d.buffered == 3
    d.feed(b"\xff")
    with pytest.raises(TooLarge):
        d.next_frame()
    assert d.buffered == HEADER_SIZE  # only the header was ever held
    assert_broken(d)


def test_too_large_after_valid_frames_in_same_feed() -> None:
    d = FrameDecoder(64)
    d.feed(encode_frame([1, "ping", {}]) + header(65) + b"x" * 10)
    assert d.next_frame() == [1, "ping", {}]
    with pytest.raises(TooLarge):
        d.next_frame()
    assert_broken(d)


@pytest.mark.parametrize("body_len", [0, 1, 100, 70_000])
def test_exactly_max_frame_accepted_one_more_refused(body_len: int) -> None:
    obj = b"\xab" * body_len
    frame = encode_frame(obj)
    size = len(frame) - HEADER_SIZE

    d = FrameDecoder(max_frame=size)
    d.feed(frame)
    assert drain(d) == [obj]

    d = FrameDecoder(max_frame=size - 1)
    d.feed(frame[:HEADER_SIZE])  # refused on the header alone
    with pytest.raises(TooLarge):
        d.next_frame()
    assert_broken(d)


def test_default_max_frame_boundary() -> None:
    assert FrameDecoder().max_frame == DEFAULT_MAX_FRAME
    # bin32 has a 5-byte header: this payload is exactly DEFAULT_MAX_FRAME bytes.
    frame = encode_frame(b"\x00" * (DEFAULT_MAX_FRAME - 5))
    assert len(frame) == HEADER_SIZE + DEFAULT_MAX_FRAME
    d = FrameDecoder()
    d.feed(frame)
    [obj] = drain(d)
    assert len(obj) == DEFAULT_MAX_FRAME - 5

    d = FrameDecoder()
    d.feed(header(DEFAULT_MAX_FRAME + 1))
    with pytest.raises(TooLarge):
        d.next_frame()
    assert_broken(d)


def test_header_at_limit_waits_for_payload() -> None:
    d = FrameDecoder(max_frame=10)
    d.feed(header(10))
    assert d.next_frame() is NEED_DATA
    d.feed(pack(b"12345678"))  # 10 bytes: bin8 header (2) + 8
    assert drain(d) == [b"12345678"]


# --------------------------------------------------------------------------- bad frames


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x01\x02", id="trailing-bytes"),
        pytest.param(pack([1, "ping", {}]) + b"\xc0", id="extra-object"),
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(b"\x93\x01", id="truncated-array"),
        pytest.param(b"\xdd\xff\xff\xff\xff", id="array32-huge"),
        pytest.param(b"\xdf\xff\xff\xff\xff", id="map32-huge"),
        pytest.param(b"\xdc\xff\xff\x01", id="array16-huge"),
        pytest.param(b"\xc6\xff\xff\xff\xff", id="bin32-huge"),
        pytest.param(b"\xdb\xff\xff\xff\xff", id="str32-huge"),
        pytest.param(b"\xc9\xff\xff\xff\xff\x05", id="ext32-huge"),
        pytest.param(b"\xa2\xff\xfe", id="invalid-utf8-str"),
        pytest.param(b"\xa3\xed\xa0\x80", id="utf8-surrogate"),
        pytest.param(b"\xa2\xc0\x80", id="overlong-utf8"),
        pytest.param(b"\x81\xa2\xff\xfe\x01", id="invalid-utf8-map-key"),
        pytest.param(b"\x81\x90\x01", id="unhashable-map-key"),
        pytest.param(b"\x81\x80\x01", id="map-as-map-key"),
        pytest.param(b"\xd4\xff\x00", id="bad-timestamp-length"),
        pytest.param(b"\x91" * 5000 + b"\xc0", id="nested-too-deep"),
        pytest.param(b"\x81\xa1k" * 3000 + b"\xc0", id="nested-maps-too-deep"),
    ],
)
def test_bad_payload_is_bad_frame(payload: bytes) -> None:
    with pytest.raises(BadFrame):
        decode_payload(payload)
    good = encode_frame([1, "ping", {}])
    d = FrameDecoder()
    d.feed(good + raw_frame(payload) + good)
    assert d.next_frame() == [1, "ping", {}]
    with pytest.raises(BadFrame):
        d.next_frame()
    assert_broken(d)


def _deep(depth: int, leaf: Any = 0) -> bytes:
    """msgpack bytes of ``depth`` nested one-element arrays around ``leaf``."""
    return b"\x91" * depth + pack(leaf)


# Decodable (msgpack allows ~1024 levels) yet deeper than Python's recursion limit, so any
# recursive repr()/str() of it blows up.
DEEP = 1020


def _decode_frame(payload: bytes) -> Any:
    d = FrameDecoder()
    d.feed(raw_frame(payload))
    [obj] = drain(d)
    return obj


def test_deep_nesting_as_whole_request() -> None:
    obj = _decode_frame(_deep(DEEP))
    with pytest.raises(BadRequest):
        parse_request(obj)
    with pytest.raises(BadRequest):
        parse_reply(obj)
    assert request_id_of(obj) is None


@pytest.mark.parametrize(
    "parts",
    [
        pytest.param(lambda deep: [deep, pack("ping"), pack({})], id="request-id"),
        pytest.param(lambda deep: [pack(1), deep, pack({})], id="op"),
    ],
)
def test_deep_nesting_inside_request_is_bad_request(parts: Any) -> None:
    payload = b"\x93" + b"".join(parts(_deep(DEEP)))
    obj = _decode_frame(payload)
    with pytest.raises(BadRequest):
        parse_request(obj)


def _error_map(code: bytes, message: bytes) -> bytes:
    return b"\x82" + pack("code") + code + pack("message") + message


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        pytest.param(lambda deep: [deep, pack(True), pack(None)], BadRequest, id="reply-id"),
        pytest.param(lambda deep: [pack(1), pack(False), deep], InternalError, id="error-not-map"),
        pytest.param(
            lambda deep: [pack(1), pack(False), _error_map(deep, pack("m"))],
            InternalError,
            id="error-code",
        ),
        pytest.param(
            lambda deep: [pack(1), pack(False), _error_map(pack("NOPE"), deep)],
            InternalError,
            id="error-message-unknown-code",
        ),
        pytest.param(
            lambda deep: [pack(1), pack(False), _error_map(pack("NOT_FOUND"), deep)],
            NotFound,
            id="error-message",
        ),
    ],
)
def test_deep_nesting_inside_reply_is_typed(parts: Any, expected: type[SluiceError]) -> None:
    obj = _decode_frame(b"\x93" + b"".join(parts(_deep(DEEP))))
    if expected is BadRequest:
        with pytest.raises(BadRequest):
            parse_reply(obj)
        return
    reply = parse_reply(obj)
    assert type(reply.error) is expected
    assert isinstance(reply.error.message, str)
    str(reply.error)


def test_deep_nesting_error_from_wire_never_raises() -> None:
    deep = _decode_frame(_deep(DEEP))
    for wire in [
        deep,
        {"code": deep, "message": "m"},
        {"code": "NOPE", "message": deep},
        {"code": "NOT_FOUND", "message": deep},
        {"code": "NOT_FOUND", "message": "m", "details": deep},
    ]:
        err = error_from_wire(wire)
        assert isinstance(err, SluiceError)
        str(err)


# --------------------------------------------------------------------------- fuzzing


@st.composite
def mutated_payloads(draw: st.DrawFn) -> bytes:
    """A packed value with some bytes overwritten and maybe truncated/extended."""
    buf = bytearray(pack(draw(values)))
    for _ in range(draw(st.integers(0, 3))):
        if buf:
            buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
    buf = buf[: draw(st.integers(0, len(buf)))] + draw(st.binary(max_size=3))
    return bytes(buf)


segments = st.one_of(
    st.binary(max_size=24),  # raw noise, including random headers
    st.binary(max_size=24).map(raw_frame),  # well-framed noise
    mutated_payloads().map(raw_frame),  # well-framed near-msgpack
    values.map(encode_frame),  # any valid object
    requests.map(lambda r: encode_frame(r.to_wire())),
    st.lists(values, max_size=4).map(encode_frame),  # request-ish arrays
    st.tuples(values, st.text(max_size=5), values).map(lambda t: encode_frame(list(t))),
    # a request whose id nests n arrays deep (msgpack refuses past ~1024 levels)
    st.sampled_from([0, 1, 50, 990, 1000, 1010, 1020, 1022, 1023, 1024, 1100]).map(
        lambda n: _deep_request(n)
    ),
)


def _check_after_decoder_error(d: FrameDecoder, exc: SluiceError) -> None:
    assert type(exc) in (BadFrame, TooLarge)
    assert_broken(d)


USUAL_RECURSION_LIMIT = sys.getrecursionlimit()  # at import, outside any hypothesis test


def _deep_request(depth: int) -> bytes:
    return raw_frame(b"\x93" + _deep(depth) + pack("op") + pack({}))


@settings(
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    parts=st.lists(segments, max_size=6),
    max_frame=st.sampled_from([0, 5, 40, DEFAULT_MAX_FRAME]),
    cut_seeds=st.lists(st.integers(min_value=0, max_value=2**20), max_size=8),
)
# Hostile but well-framed payloads, each one byte at a time and whole.
@example(parts=[_deep_request(DEEP)], max_frame=DEFAULT_MAX_FRAME, cut_seeds=[])
@example(parts=[raw_frame(_deep(DEEP))], max_frame=DEFAULT_MAX_FRAME, cut_seeds=[])
@example(parts=[raw_frame(_deep(100_000))], max_frame=DEFAULT_MAX_FRAME, cut_seeds=[])
@example(parts=[raw_frame(b"\xdd\xff\xff\xff\xff")], max_frame=64, cut_seeds=[1, 2, 3, 4, 5, 6])
@example(parts=[raw_frame(b"\xdf\xff\xff\xff\xff")], max_frame=64, cut_seeds=[])
@example(parts=[raw_frame(b"\xc6\xff\xff\xff\xff")], max_frame=64, cut_seeds=[])
@example(parts=[raw_frame(b"\x93\x01\xa2\xff\xfe\x80")], max_frame=64, cut_seeds=[])
@example(parts=[encode_frame([1, "a", {}]) + b"\xff\xff\xff\xff"], max_frame=64, cut_seeds=[])
def test_fuzz_only_typed_errors_escape(
    parts: list[bytes], max_frame: int, cut_seeds: list[int]
) -> None:
    # Hypothesis raises the recursion limit while a test runs; restore the interpreter's
    # usual one so a value that only a recursive repr()/str() chokes on still shows up.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(USUAL_RECURSION_LIMIT)
    try:
        _run_stream(parts, max_frame, cut_seeds)
    finally:
        sys.setrecursionlimit(limit)


def _run_stream(parts: list[bytes], max_frame: int, cut_seeds: list[int]) -> None:
    stream = b"".join(parts)
    cuts = [c % (len(stream) + 1) for c in cut_seeds]
    d = FrameDecoder(max_frame)
    for chunk in split_at(stream, cuts):
        # Anything but BadFrame/TooLarge/BadRequest escapes these handlers and fails the test.
        try:
            d.feed(chunk)
        except (BadFrame, TooLarge) as exc:
            _check_after_decoder_error(d, exc)
            return
        while True:
            try:
                obj = d.next_frame()
            except (BadFrame, TooLarge) as exc:
                _check_after_decoder_error(d, exc)
                return
            if obj is NEED_DATA:
                break
            try:
                req = parse_request(obj)
            except BadRequest:
                rid = request_id_of(obj)
                assert rid is None or (type(rid) is int and 0 <= rid <= MAX_REQUEST_ID)
            else:
                assert request_id_of(obj) == req.request_id
            with contextlib.suppress(BadRequest):
                parse_reply(obj)
            assert isinstance(error_from_wire(obj), SluiceError)
    assert 0 <= d.buffered <= len(stream)


def _outcomes(d: FrameDecoder, chunks: list[bytes], shortcut: bool) -> list[Any]:
    """What a reader sees feeding ``chunks``: each frame, each ``NEED_DATA`` and the
    decoder's ``buffered`` after it, and the type of the error that ends the stream. With
    ``shortcut``, each chunk goes in through ``feed_and_next``."""
    seen: list[Any] = []
    try:
        for chunk in chunks:
            if shortcut:
                seen.append(d.feed_and_next(chunk))
            else:
                d.feed(chunk)
                seen.append(d.next_frame())
            while seen[-1] is not NEED_DATA:
                seen.append(d.next_frame())
            seen.append(d.buffered)
    except (BadFrame, TooLarge) as error:
        seen.append(type(error))
        assert_broken(d)
    return seen


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    parts=st.lists(segments, max_size=6),
    max_frame=st.sampled_from([0, 5, 40, DEFAULT_MAX_FRAME]),
    cut_seeds=st.lists(st.integers(min_value=0, max_value=2**20), max_size=8),
)
@example(parts=[encode_frame([1, True, {"acked": 1}])], max_frame=40, cut_seeds=[])
@example(parts=[encode_frame([1, True, {"acked": 1}])], max_frame=5, cut_seeds=[])
@example(parts=[raw_frame(b"\xc1")], max_frame=DEFAULT_MAX_FRAME, cut_seeds=[])
@example(parts=[encode_frame(b"x" * 20_000)], max_frame=DEFAULT_MAX_FRAME, cut_seeds=[])
def test_feed_and_next_is_feed_then_next_frame(
    parts: list[bytes], max_frame: int, cut_seeds: list[int]
) -> None:
    # The shortcut for one whole frame must not differ from the long way in any result,
    # error or state, whatever the bytes and however they are cut.
    stream = b"".join(parts)
    chunks = split_at(stream, [c % (len(stream) + 1) for c in cut_seeds])
    shortcut = _outcomes(FrameDecoder(max_frame), chunks, shortcut=True)
    assert shortcut == _outcomes(FrameDecoder(max_frame), chunks, shortcut=False)


@given(stream=st.binary(max_size=200), data=st.data())
def test_fuzz_random_bytes_default_decoder(stream: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8), label="cuts")
    d = FrameDecoder()
    try:
        for obj in feed_chunks(d, split_at(stream, cuts)):
            with contextlib.suppress(BadRequest):
                parse_request(obj)
    except (BadFrame, TooLarge) as exc:
        _check_after_decoder_error(d, exc)


# --------------------------------------------------------------------------- parse_request


GOOD_ARGS: dict[str, Any] = {"queue": "q"}


@pytest.mark.parametrize(
    ("obj", "rid"),
    [
        pytest.param(None, None, id="none"),
        pytest.param(7, None, id="int"),
        pytest.param("ping", None, id="str"),
        pytest.param(b"ping", None, id="bytes"),
        pytest.param({0: 1, 1: "ping", 2: {}}, None, id="map"),
        pytest.param([], None, id="empty-list"),
        pytest.param([1], 1, id="len-1"),
        pytest.param([1, "ping"], 1, id="len-2"),
        pytest.param([1, "ping", {}, None], 1, id="len-4"),
        pytest.param([-1, "ping", {}], None, id="negative-id"),
        pytest.param([True, "ping", {}], None, id="bool-id-true"),
        pytest.param([False, "ping", {}], None, id="bool-id-false"),
        pytest.param([1.0, "ping", {}], None, id="float-id"),
        pytest.param([2**64, "ping", {}], None, id="huge-id"),
        pytest.param([None, "ping", {}], None, id="none-id"),
        pytest.param(["1", "ping", {}], None, id="str-id"),
        pytest.param([[1], "ping", {}], None, id="list-id"),
        pytest.param([5, 1, GOOD_ARGS], 5, id="int-op"),
        pytest.param([5, b"ping", GOOD_ARGS], 5, id="bytes-op"),
        pytest.param([5, None, GOOD_ARGS], 5, id="none-op"),
        pytest.param([5, ["ping"], GOOD_ARGS], 5, id="list-op"),
        pytest.param([5, "", GOOD_ARGS], 5, id="empty-op"),
        pytest.param([5, "ping", None], 5, id="none-args"),
        pytest.param([5, "ping", []], 5, id="list-args"),
        pytest.param([5, "ping", [["queue", "q"]]], 5, id="pairs-args"),
        pytest.param([5, "ping", "queue=q"], 5, id="str-args"),
        pytest.param([5, "ping", 0], 5, id="int-args"),
        pytest.param([5, "ping", {1: "q"}], 5, id="int-key"),
        pytest.param([5, "ping", {b"queue": "q"}], 5, id="bytes-key"),
        pytest.param([5, "ping", {"queue": "q", None: 1}], 5, id="mixed-keys"),
        pytest.param([5, "ping", {(1, 2): "q"}], 5, id="tuple-key"),
    ],
)
def test_parse_request_rejects(obj: Any, rid: int | None) -> None:
    with pytest.raises(BadRequest):
        parse_request(obj)
    assert request_id_of(obj) == rid
    # The same through the wire, where the wire can carry it: 2**64 does not encode, and a
    # map key that is an array does not decode (see test_bad_payload_is_bad_frame).
    if (
        isinstance(obj, list)
        and obj
        and isinstance(obj[-1], dict)
        and any(isinstance(k, tuple) for k in obj[-1])
    ):
        return
    try:
        frame = encode_frame(obj)
    except OverflowError:
        assert obj[0] == 2**64
        return
    d = FrameDecoder()
    d.feed(frame)
    [wire] = drain(d)
    with pytest.raises(BadRequest):
        parse_request(wire)
    assert request_id_of(wire) == rid


def test_parse_request_accepts() -> None:
    req = parse_request([0, "put", {"queue": "q", "body": b"x"}])
    assert req == Request(request_id=0, op="put", args={"queue": "q", "body": b"x"})
    assert parse_request((MAX_REQUEST_ID, "x", {})).request_id == MAX_REQUEST_ID
    # op is not checked against OPS here (that is UNKNOWN_OP, the broker's business).
    assert parse_request([1, "no-such-op", {}]).op == "no-such-op"
    assert "ping" in protocol.OPS


@pytest.mark.parametrize(
    "kwargs",
    [
        {"request_id": -1, "op": "ping"},
        {"request_id": True, "op": "ping"},
        {"request_id": 2**64, "op": "ping"},
        {"request_id": 1, "op": ""},
        {"request_id": 1, "op": "ping", "args": {1: 2}},
        {"request_id": 1, "op": "ping", "args": []},
    ],
)
def test_request_constructor_validates(kwargs: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        Request(**kwargs)


@pytest.mark.parametrize(
    "obj",
    [
        None,
        [],
        [1, True],
        [1, True, None, None],
        [1, 1, None],  # ok must be a bool
        [1, None, None],
        [-1, True, None],
        [True, True, None],
        [2**64, False, {"code": "NOT_FOUND", "message": "m"}],
        ["1", True, None],
    ],
)
def test_parse_reply_rejects(obj: Any) -> None:
    with pytest.raises(BadRequest):
        parse_reply(obj)


def test_reply_constructor_validates() -> None:
    with pytest.raises(BadRequest):
        Reply(request_id=1, result=1, error=NotFound("x"))
    with pytest.raises(BadRequest):
        Reply(request_id=-1, result=1)
    assert Reply(request_id=None, result=1).ok


# --------------------------------------------------------------------------- error_from_wire


def test_error_classes_one_per_code() -> None:
    assert set(ERROR_CLASSES) == set(ErrorCode)
    assert len(set(ERROR_CLASSES.values())) == len(ErrorCode)
    for code, cls in ERROR_CLASSES.items():
        assert issubclass(cls, SluiceError)
        assert cls.code is code
        assert getattr(protocol, cls.__name__) is cls


@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_from_wire_every_code(code: ErrorCode) -> None:
    err = error_from_wire({"code": code.value, "message": "boom"})
    assert type(err) is ERROR_CLASSES[code]
    assert err.code is code
    assert err.message == "boom"
    assert err.details == {}
    assert str(err) == f"{code.value}: boom"
    assert err.to_wire() == {"code": code.value, "message": "boom"}

    err = error_from_wire({"code": code.value, "message": "boom", "details": {"n": [1]}})
    assert type(err) is ERROR_CLASSES[code]
    assert err.details == {"n": [1]}


@pytest.mark.parametrize(
    "wire",
    [
        {"code": "NO_SUCH_CODE", "message": "boom"},
        {"code": "not_found", "message": "boom"},
        {"code": b"NOT_FOUND", "message": "boom"},
        {"code": 404, "message": "boom"},
        {"code": None, "message": "boom"},
        {"code": ["NOT_FOUND"], "message": "boom"},
        {"message": "boom"},
        {},
        {1: 2},
        None,
        "NOT_FOUND",
        b"NOT_FOUND",
        404,
        ["NOT_FOUND", "boom"],
        ("NOT_FOUND", "boom"),
    ],
)
def test_error_from_wire_unknown_or_malformed_is_internal(wire: Any) -> None:
    err = error_from_wire(wire)
    assert type(err) is InternalError
    assert isinstance(err.message, str)
    assert isinstance(err.details, dict)
    if isinstance(wire, dict) and "code" in wire:
        assert "boom" in err.message  # the peer's message survives
        assert str(wire["code"]) in err.message  # and so does the code it did not know


def test_error_from_wire_odd_fields() -> None:
    err = error_from_wire({"code": "NOT_FOUND", "message": 12, "details": [1, 2]})
    assert type(err) is NotFound
    assert err.message == "12"
    assert err.details == {}
    err = error_from_wire({"code": "NOT_FOUND"})
    assert type(err) is NotFound
    assert isinstance(err.message, str)


@given(wire=values | st.dictionaries(st.sampled_from(["code", "message", "details"]), values))
def test_error_from_wire_never_raises(wire: Any) -> None:
    err = error_from_wire(wire)
    assert isinstance(err, SluiceError)
    assert isinstance(err.message, str)
    assert isinstance(err.details, dict)
    code = wire.get("code") if isinstance(wire, dict) else None
    if isinstance(code, str) and code in set(ErrorCode):
        assert type(err) is ERROR_CLASSES[ErrorCode(code)]
    else:
        assert type(err) is InternalError


# --------------------------------------------------------------------------- isolation


def _printed_by(script: str) -> str:
    """What ``script`` prints, run in a fresh interpreter from the repository root."""
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout


def _imported_after(prelude: str) -> list[str]:
    script = (
        f"{prelude}import protocol, sys; "
        "print(' '.join(str(m in sys.modules) for m in ('asyncio', 'socket')))"
    )
    return _printed_by(script).split()


def test_protocol_imports_neither_asyncio_nor_socket() -> None:
    assert _imported_after("") == ["False", "False"]


def test_import_check_can_detect_imports() -> None:
    # The probe above is meaningful: it does see the modules when they are imported.
    assert _imported_after("import asyncio; ") == ["True", "True"]


# --------------------------------------------------------------------------- memory

_RETAINED_AFTER_PACKING = """
import sys
from protocol import encode_frame, pack
def anon_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon"))
body = bytes(64 << 20)
before = anon_kib()
frame = encode_frame([1, "put", {"body": body}])
del frame
pack([1])  # a small one after it
print(anon_kib() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_packing_a_large_frame_keeps_no_buffer_of_its_size() -> None:
    """The shared Packer grows its buffer to the largest object it packs and keeps it:
    after a 64 MiB frame it is replaced, so the process holds none of that (about 64 MiB
    stayed with the one Packer kept)."""
    assert int(_printed_by(_RETAINED_AFTER_PACKING)) < 8 << 10  # KiB
