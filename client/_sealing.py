"""Bodies and results sealed in the client with AES-GCM, so the broker stores ciphertext.

``Client(..., body_key=KEY)`` (or ``body_key={"key id": KEY, ...}``: the first encrypts,
every one decrypts, so keys can rotate) seals each body it puts (``put``, ``put_many``,
``put_and_wait``, a ``schedule``'s body) and each result it acks with, and opens them on
the way back (``reserve``, ``peek``, ``result``, ``put_and_wait``, ``status``). A sealed
body is ``nonce (12 bytes) + AES-GCM ciphertext and tag``, with the header
``sluice-key`` naming its key; a sealed result is the map ``{"sluice-sealed": key id,
"data": nonce + ciphertext}`` of its msgpack encoding. Keys are 16, 24 or 32 bytes.

What the broker still sees: queue and schedule names, headers (the key id among them),
priorities, delays, body and result sizes (plus 28 bytes), and every op's timing.
Channel data (``publish``) is not sealed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any, Final

import msgpack

from ._calls import Call
from ._message import Message
from .errors import BadRequest

KEY_HEADER: Final = "sluice-key"
SEALED: Final = "sluice-sealed"
NONCE_BYTES: Final = 12
_AAD: Final = b"sluice body v1"

BodyKey = bytes | Mapping[str, bytes]


class SealError(BadRequest):
    """A sealed body or result this client cannot open: no key of that id, or the data
    is not what that key sealed."""


def key_id(key: bytes) -> str:
    """The id a single key goes by: a short digest of it (not the key)."""
    return "k" + hashlib.sha256(key).hexdigest()[:12]


class Sealer:
    """Seals with the current key, opens with any known one."""

    def __init__(self, body_key: BodyKey) -> None:
        keys = {key_id(body_key): body_key} if isinstance(body_key, bytes) else dict(body_key)
        if not keys:
            raise BadRequest("body_key: give a key (bytes) or a map of key id to key")
        for name, key in keys.items():
            if not isinstance(key, bytes) or len(key) not in (16, 24, 32):
                raise BadRequest(f"body_key {name!r}: a key is 16, 24 or 32 bytes")
        # Imported here: only a client given a key pays for the cryptography package.
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.current = next(iter(keys))
        self._ciphers = {name: AESGCM(key) for name, key in keys.items()}

    # sealing

    def seal_body(self, body: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._ciphers[self.current].encrypt(nonce, body, _AAD)

    def open_body(self, name: str, sealed: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag

        cipher = self._ciphers.get(name)
        if cipher is None:
            raise SealError(f"this client has no body key {name!r}; give it in body_key")
        try:
            opened: bytes = cipher.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], _AAD)
            return opened
        except (InvalidTag, ValueError):  # ValueError: too short to hold its nonce
            raise SealError(f"a body sealed under key {name!r} does not open with it") from None

    def seal_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        headers = {**spec.get("headers", {}), KEY_HEADER: self.current}
        return {**spec, "body": self.seal_body(spec["body"]), "headers": headers}

    def seal_result(self, value: Any) -> dict[str, Any]:
        packed = msgpack.packb(value, use_bin_type=True)
        return {SEALED: self.current, "data": self.seal_body(packed)}

    # opening

    def open_result(self, value: Any) -> Any:
        if isinstance(value, dict) and set(value) == {SEALED, "data"}:
            return msgpack.unpackb(self.open_body(value[SEALED], value["data"]), raw=False)
        return value

    def open_message(self, message: Message) -> Message:
        name = message.headers.get(KEY_HEADER)
        if isinstance(name, str):
            message.body = self.open_body(name, message.body)
        return message

    def open_item(self, item: dict[str, Any]) -> dict[str, Any]:
        """A peek item or status map: its body (if there) and its result opened."""
        name = (item.get("headers") or {}).get(KEY_HEADER)
        if isinstance(name, str) and isinstance(item.get("body"), bytes):
            item = {**item, "body": self.open_body(name, item["body"])}
        if "result" in item:
            item = {**item, "result": self.open_result(item["result"])}
        return item

    # calls

    def seal(self, call: Call[Any]) -> Call[Any]:
        """``call`` with its bodies and results sealed, and its answer opened."""
        args, parse = call.args, call.parse
        op = call.op
        if op == "put":
            args = {**args, "messages": [self.seal_spec(spec) for spec in args["messages"]]}
        elif op == "put_and_wait":
            args = {**args, "message": self.seal_spec(args["message"])}
            return call._replace(args=args, parse=self._opening_outcome(call))
        elif op == "schedule":
            sealed = self.seal_spec({"body": args["body"], "headers": args.get("headers", {})})
            args = {**args, **sealed}
        elif op == "ack":
            items = [[*item[:2], self.seal_result(item[2])] if len(item) == 3 else item
                     for item in args["items"]]  # fmt: skip
            args = {**args, "items": items}
        elif op == "reserve":
            return call._replace(parse=lambda result: [self.open_message(m) for m in parse(result)])
        elif op == "peek" or op == "dead_letters":
            return call._replace(parse=lambda result: [self.open_item(i) for i in parse(result)])
        elif op == "status":
            return call._replace(parse=lambda result: self.open_item(parse(result)))
        elif op == "result":
            return call._replace(parse=self._opening_outcome(call))
        return call._replace(args=args)

    def _opening_outcome(self, call: Call[Any]) -> Any:
        """A parse of an outcome map (``result``, ``put_and_wait``) that opens the result
        before the call's own parse reads it."""
        parse = call.parse

        def opened(result: Any) -> Any:
            if isinstance(result, dict) and "result" in result:
                result = {**result, "result": self.open_result(result["result"])}
            return parse(result)

        return opened
