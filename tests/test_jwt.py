"""JWTs as hello tokens (``--jwt-key``), against a real broker: a good token's grants
apply; an expired, not-yet-valid, wrongly signed, ``alg: none``, HMAC-with-the-public-key
or wrong-audience token is refused; RS256 keys work too; a bad key stops the start."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from tests.conftest import REPO_ROOT, BrokerProcess, RawConnection, start_broker, stop_broker

AUDIENCE = "sluice-test"
GRANTS = {"grants": [{"queues": "jwt.*", "allow": ["produce", "read"]}]}


def public_pem(private: Any) -> bytes:
    return private.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def claims(**changes: Any) -> dict[str, Any]:
    now = time.time()
    base = {"sub": "billing", "aud": AUDIENCE, "exp": now + 600, "nbf": now - 5, "sluice": GRANTS}
    base.update(changes)
    return {name: value for name, value in base.items() if value is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], payload: dict[str, Any], key: bytes = b"") -> str:
    """A token made by hand: ``alg: none`` (no key) or HS256 with ``key`` as the secret."""
    head = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    if not key:
        return head + "."
    return head + "." + b64(hmac.new(key, head.encode(), hashlib.sha256).digest())


@pytest.fixture(scope="module")
def signing_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory, signing_key: Any) -> Path:
    path = tmp_path_factory.mktemp("jwt") / "public.pem"
    path.write_bytes(public_pem(signing_key))
    return path


@pytest.fixture(scope="module")
def secured(key_file: Path) -> Iterator[BrokerProcess]:
    running = start_broker(
        key_file.parent / "broker.log",
        "--in-memory",
        "--jwt-key",
        str(key_file),
        "--jwt-audience",
        AUDIENCE,
    )
    yield running
    stop_broker(running)


def hello(broker: BrokerProcess, token: str) -> tuple[RawConnection, list[Any]]:
    connection = RawConnection(broker.host, broker.port)
    reply = connection.request("hello", {"version": 1, "client": "jwt-test", "token": token})
    return connection, reply


def test_a_good_token_gives_its_grants(secured: BrokerProcess, signing_key: Any) -> None:
    token = jwt.encode(claims(), signing_key, algorithm="EdDSA")
    connection, reply = hello(secured, token)
    with connection:
        assert reply[1] is True, reply
        assert connection.request("put", {"queue": "jwt.a", "messages": [{"body": b"x"}]})[1]
        refused = connection.request("put", {"queue": "other", "messages": [{"body": b"x"}]})
        assert refused[1] is False and refused[2]["code"] == "FORBIDDEN"
        assert "jwt:billing" in refused[2]["message"]
        consume = connection.request("reserve", {"queues": ["jwt.a"]})
        assert consume[1] is False and consume[2]["code"] == "FORBIDDEN"


@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("expired", "expired"),
        ("not yet valid", "not yet valid"),
        ("no exp", "exp"),
        ("other audience", "Audience"),
        ("another key", "Signature verification failed"),
        ("alg none", "takes EdDSA only"),
        ("HS256 with the public key", "takes EdDSA only"),
        ("bad grants", "allow must be"),
        ("garbage", "refused"),
    ],
)
def test_bad_tokens_are_refused_and_say_why(
    secured: BrokerProcess, signing_key: Any, key_file: Path, how: str, says: str
) -> None:
    now = time.time()
    token = {
        "expired": lambda: jwt.encode(claims(exp=now - 120), signing_key, algorithm="EdDSA"),
        "not yet valid": lambda: jwt.encode(claims(nbf=now + 600), signing_key, "EdDSA"),
        "no exp": lambda: jwt.encode(claims(exp=None), signing_key, algorithm="EdDSA"),
        "other audience": lambda: jwt.encode(claims(aud="other"), signing_key, "EdDSA"),
        "another key": lambda: jwt.encode(
            claims(), ed25519.Ed25519PrivateKey.generate(), algorithm="EdDSA"
        ),
        "alg none": lambda: unsigned({"alg": "none", "typ": "JWT"}, claims()),
        "HS256 with the public key": lambda: unsigned(
            {"alg": "HS256", "typ": "JWT"}, claims(), key_file.read_bytes()
        ),
        "bad grants": lambda: jwt.encode(
            claims(sluice={"grants": [{"queues": "jwt.*", "allow": ["everything"]}]}),
            signing_key,
            algorithm="EdDSA",
        ),
        "garbage": lambda: "eyJhbGciOi.not-a.token",
    }[how]()
    connection, reply = hello(secured, token)
    with connection:
        assert reply[1] is False and reply[2]["code"] == "UNAUTHORIZED", reply
        assert says in reply[2]["message"], reply[2]["message"]
        connection.assert_closed()


def test_an_rsa_key_pins_rs256(tmp_path: Path, brokers: list[BrokerProcess]) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "rsa.pem"
    path.write_bytes(public_pem(private))
    brokers.append(start_broker(tmp_path / "broker.log", "--in-memory", "--jwt-key", str(path)))
    good = jwt.encode(claims(aud=None), private, algorithm="RS256")
    weaker = jwt.encode(claims(aud=None), private, algorithm="RS512")  # not the pinned one
    connection, reply = hello(brokers[-1], good)
    with connection:
        assert reply[1] is True, reply
    connection, reply = hello(brokers[-1], weaker)
    with connection:
        assert reply[1] is False and "takes RS256 only" in reply[2]["message"]
    stop_broker(brokers[-1])


def test_a_key_that_is_not_a_public_key_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "not-a-key.pem"
    path.write_text("hello\n")
    done = subprocess.run(
        [sys.executable, "-m", "broker", "--port", "0", "--in-memory", "--jwt-key", str(path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1 and "--jwt-key" in done.stderr and "PEM" in done.stderr
    assert "Traceback" not in done.stderr
