"""Sluice wire protocol, sans-IO.

This package holds no networking at all: no sockets, no asyncio, no storage. Feed received
bytes to a ``FrameDecoder`` and pull decoded frames out (``NEED_DATA`` when it needs more);
turn a ``Request`` or ``Reply`` into bytes with ``encode_frame(x.to_wire())``. The broker
and the client share it. The full wire specification is ``PROTOCOL.md`` beside this file.
"""

from ._errors import (
    ERROR_CLASSES,
    BadFrame,
    BadRequest,
    ErrorCode,
    Forbidden,
    InternalError,
    LeaseLost,
    NotFound,
    ShuttingDown,
    SluiceError,
    StorageFull,
    TooLarge,
    Unauthorized,
    UnknownOp,
    UnsupportedVersion,
    error_from_wire,
)
from ._framing import (
    DEFAULT_MAX_FRAME,
    HEADER_SIZE,
    NEED_DATA,
    FrameDecoder,
    decode_payload,
    encode_frame,
    pack,
)
from ._messages import (
    MAX_REQUEST_ID,
    OPS,
    PROTOCOL_VERSION,
    Reply,
    Request,
    parse_reply,
    parse_request,
    request_id_of,
    require_string_keys,
    split_reply,
    split_request,
)
from ._validate import (
    MAX_WAIT,
    PRIORITY_RANGE,
    QUEUE_NAME_PATTERN,
    is_queue_name,
    require_queue_name,
    shown,
)

__all__ = [
    "DEFAULT_MAX_FRAME",
    "ERROR_CLASSES",
    "HEADER_SIZE",
    "MAX_REQUEST_ID",
    "NEED_DATA",
    "OPS",
    "PROTOCOL_VERSION",
    "MAX_WAIT",
    "PRIORITY_RANGE",
    "QUEUE_NAME_PATTERN",
    "BadFrame",
    "BadRequest",
    "ErrorCode",
    "Forbidden",
    "FrameDecoder",
    "InternalError",
    "LeaseLost",
    "NotFound",
    "Reply",
    "Request",
    "ShuttingDown",
    "SluiceError",
    "StorageFull",
    "TooLarge",
    "Unauthorized",
    "UnknownOp",
    "UnsupportedVersion",
    "decode_payload",
    "encode_frame",
    "error_from_wire",
    "is_queue_name",
    "pack",
    "parse_reply",
    "parse_request",
    "require_string_keys",
    "split_reply",
    "split_request",
    "request_id_of",
    "require_queue_name",
    "shown",
]
