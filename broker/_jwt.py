"""JWTs as hello tokens, for teams with an identity provider (``--jwt-key``).

The broker holds only a public key (PEM). Its algorithm is pinned by the key's type:
Ed25519 -> EdDSA, RSA -> RS256, EC P-256 -> ES256; a token signed any other way (``none``,
an HMAC made with the public key as its secret, another curve) is refused, and so is one
whose signature does not verify. ``exp`` is required and ``nbf`` honoured, with
``LEEWAY`` seconds of clock skew; with ``--jwt-audience`` the ``aud`` claim must name it.
The principal is the token's ``sub``; its grants are the ``sluice`` claim's ``grants``, in
the auth file's form: ``{"sluice": {"grants": [{"queues": "orders.*", "allow": ["produce"]}]}}``.

A token is checked when the connection says hello; the connection keeps its rights until
it closes (a client reconnects with a fresh token).
"""

from __future__ import annotations

from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from protocol import Unauthorized

from ._auth import AuthFileError, Principal, parse_grants

LEEWAY: Final = 30.0  # seconds of clock skew allowed on exp and nbf


class JwtVerifier:
    def __init__(self, key_path: str, audience: str | None = None) -> None:
        try:
            with open(key_path, "rb") as pem:
                key = serialization.load_pem_public_key(pem.read())
        except (OSError, ValueError) as error:
            raise AuthFileError(
                f"--jwt-key {key_path}: cannot read a PEM public key ({error})"
            ) from None
        self.key = key
        self.algorithm = _algorithm_of(key, key_path)
        self.audience = audience

    def principal(self, token: str) -> Principal:
        """The principal ``token`` names, or ``Unauthorized`` saying why not."""
        try:
            claims = jwt.decode(
                token,
                self.key,  # type: ignore[arg-type]
                algorithms=[self.algorithm],
                audience=self.audience,
                leeway=LEEWAY,
                options={"require": ["exp", "sub"], "verify_aud": self.audience is not None},
            )
        except jwt.InvalidAlgorithmError as error:
            raise Unauthorized(
                f"hello: the JWT was refused: {error} (this broker takes {self.algorithm} only)"
            ) from None
        except jwt.InvalidTokenError as error:
            raise Unauthorized(f"hello: the JWT was refused: {error}") from None
        return Principal(f"jwt:{claims['sub']}", _grants_of(claims.get("sluice")), from_token=True)


def _grants_of(claim: Any) -> tuple[Any, ...]:
    if claim is None:
        return ()
    try:
        if not isinstance(claim, dict) or set(claim) - {"grants"}:
            raise AuthFileError('the sluice claim is {"grants": [...]}')
        return parse_grants("the JWT's sluice claim", claim.get("grants", []))
    except AuthFileError as error:
        raise Unauthorized(f"hello: the JWT was refused: {error}") from None


def _algorithm_of(key: Any, key_path: str) -> str:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    raise AuthFileError(
        f"--jwt-key {key_path}: an Ed25519, RSA or P-256 public key is needed, not "
        f"{type(key).__name__}"
    )
