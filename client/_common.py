"""What both clients share: where the broker is, the hello request, reading a reply."""

from __future__ import annotations

import inspect
import math
import os
import ssl
from collections.abc import Callable
from typing import Any, Final, NamedTuple, TypeVar
from urllib.parse import urlsplit

from protocol import HEADER_SIZE, PROTOCOL_VERSION, SluiceError, TooLarge, split_reply

from ._calls import Call

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 7700
DEFAULT_URL: Final = f"sluice://{DEFAULT_HOST}:{DEFAULT_PORT}"
URL_VARIABLE: Final = "SLUICE_URL"  # the environment variable that names the broker
DEFAULT_TIMEOUT: Final = 30.0
DEFAULT_MAX_BATCH: Final = 1000  # messages per frame, where the broker's hello says none
# Replies are not bound by the broker's max_frame (that limits requests); the broker keeps
# reserve replies near it, and this cap only guards against a corrupt length prefix.
MAX_REPLY_FRAME: Final = 1024**3
T = TypeVar("T")


TLS_SCHEME: Final = "sluices"  # sluices://host:port: the same protocol over TLS
Tls = bool | ssl.SSLContext | None  # True: verify against the system's CAs; None: by URL


def parse_url(url: str) -> tuple[str, int]:
    """``sluice://host:port`` or ``sluices://host:port`` (port defaults to 7700) ->
    (host, port)."""
    parts = urlsplit(url)
    if parts.scheme not in ("sluice", TLS_SCHEME) or not parts.hostname:
        raise ValueError(
            f"expected a URL like sluice://127.0.0.1:7700 (or sluices:// for TLS), got {url!r}"
        )
    return parts.hostname, parts.port or DEFAULT_PORT


def tls_context(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> ssl.SSLContext:
    """A client context: verifies the broker's certificate and host name against
    ``ca_file`` (default: the system's CAs), TLS 1.2 or later, and presents
    ``cert_file``/``key_file`` if given (for a broker with ``--tls-client-ca``)."""
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context


def add_tls_options(add: Callable[..., Any], default: Callable[[Any], Any] = lambda v: v) -> None:
    """``--tls-ca``, ``--tls-cert`` and ``--tls-key`` for a command line (see ``cli_tls``)."""
    add(
        "--tls-ca",
        metavar="FILE",
        default=default(os.environ.get("SLUICE_TLS_CA") or None),
        help="PEM CA file to verify the broker's certificate with: connects with TLS "
        "(env SLUICE_TLS_CA; a sluices:// URL alone uses the system's CAs)",
    )
    add(
        "--tls-cert",
        metavar="FILE",
        default=default(os.environ.get("SLUICE_TLS_CERT") or None),
        help="PEM client certificate, for a broker that requires one (env SLUICE_TLS_CERT)",
    )
    add(
        "--tls-key",
        metavar="FILE",
        default=default(os.environ.get("SLUICE_TLS_KEY") or None),
        help="PEM key of --tls-cert, if not in it (env SLUICE_TLS_KEY)",
    )


def cli_tls(ca_file: str | None, cert_file: str | None, key_file: str | None) -> Tls:
    """The ``tls`` of a command line's options: a context if any is given, else None
    (the URL's scheme decides). Raises ``ValueError`` naming a file that will not load."""
    if ca_file is None and cert_file is None and key_file is None:
        return None
    try:
        return tls_context(ca_file, cert_file, key_file)
    except (OSError, ssl.SSLError) as error:
        raise ValueError(f"cannot load the TLS CA, certificate or key: {error}") from None


def broker_tls(
    tls: Tls, url: str | None = None, host: str | None = None, port: int | None = None
) -> ssl.SSLContext | None:
    """The TLS context to connect with, by the same rule as ``broker_address``: ``tls``
    if it is a context; True or False as said; None: TLS if the URL (``url``, or else
    ``SLUICE_URL`` when no host or port is given) is ``sluices://``."""
    if isinstance(tls, ssl.SSLContext):
        return tls
    if tls is None:
        if url is None and host is None and port is None:
            url = os.environ.get(URL_VARIABLE)
        tls = url is not None and urlsplit(url).scheme == TLS_SCHEME
    return tls_context() if tls else None


def broker_address(
    url: str | None = None, host: str | None = None, port: int | None = None
) -> tuple[str, int]:
    """Where the broker is, the one rule for every client, worker and command: ``url``
    (``sluice://host:port``), else ``host`` and ``port`` (each defaulting to 127.0.0.1 and
    7700), else the ``SLUICE_URL`` environment variable, else sluice://127.0.0.1:7700."""
    if url is not None:
        if host is not None or port is not None:
            raise ValueError("name the broker with url= or with host=/port=, not both")
        return parse_url(url)
    if host is not None or port is not None:
        return host or DEFAULT_HOST, DEFAULT_PORT if port is None else port
    return parse_url(os.environ.get(URL_VARIABLE) or DEFAULT_URL)


def format_url(host: str, port: int, tls: bool = False) -> str:
    """The ``sluice://`` (``sluices://`` with ``tls``) URL of ``host`` and ``port`` (an
    IPv6 host in brackets)."""
    scheme = TLS_SCHEME if tls else "sluice"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def hello_args(client_name: str, auth_token: str | None) -> dict[str, Any]:
    args: dict[str, Any] = {"version": PROTOCOL_VERSION, "client": client_name}
    if auth_token is not None:
        args["token"] = auth_token
    return args


ReplyParts = tuple[int | None, bool, Any]  # (request id, ok, result or SluiceError)


def split_reply_frame(frame: Any) -> ReplyParts:
    """``(request_id, ok, result or SluiceError)`` of a reply frame; a frame that is not a
    reply is a ``SluiceError`` (the stream from the broker cannot be trusted after it)."""
    try:
        return split_reply(frame)
    except SluiceError as error:
        raise SluiceError(f"broker sent a frame that is not a reply: {error}") from None


def result_of(call: Call[T], ok: bool, value: Any) -> T:
    """The parsed result, or the reply's error raised as its exception class."""
    if not ok:
        raise value
    return call.parse(value)


def as_method(method: Callable[..., Any], build: Callable[..., Call[Any]]) -> None:
    """Give the client ``method`` that runs ``build``'s call the name, docs and signature
    of ``build`` (with ``self`` first, returning what the call's result is), so that
    ``help(Client.put)`` and editors show the real parameters."""
    method.__name__ = method.__qualname__ = build.__name__
    method.__doc__ = build.__doc__
    signature = inspect.signature(build)
    returns = signature.return_annotation
    if isinstance(returns, str) and returns.startswith("Call[") and returns.endswith("]"):
        returns = returns[len("Call[") : -1]
    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    method.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[this, *signature.parameters.values()], return_annotation=returns
    )


class Limits(NamedTuple):
    """What one request may hold, from the broker's hello (until then, no limit)."""

    max_batch: int = DEFAULT_MAX_BATCH  # messages or items in one frame
    frame_bytes: float = math.inf  # bytes of one frame, its length prefix included

    @classmethod
    def of(cls, server_info: dict[str, Any]) -> Limits:
        max_frame = server_info.get("max_frame")
        frame_bytes = math.inf if max_frame is None else max_frame + HEADER_SIZE
        return cls(server_info.get("max_batch", DEFAULT_MAX_BATCH), frame_bytes)


def too_large(frame: bytes, op: str, limits: Limits) -> TooLarge:
    """The error for a request frame over the broker's ``max_frame``: sent, it would make
    the broker close the connection, so it is refused before sending."""
    size, limit = len(frame) - HEADER_SIZE, int(limits.frame_bytes) - HEADER_SIZE
    return TooLarge(
        f"{op}: this request is {size} bytes, over the broker's max_frame of {limit}; "
        "send fewer or smaller messages per call"
    )
