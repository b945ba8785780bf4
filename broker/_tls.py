"""TLS for the broker port and the HTTP port: one server context from the config.

TLS 1.2 at least. With a client CA, a client must present a certificate it signed (mutual
TLS).
"""

from __future__ import annotations

import logging
import ssl

log = logging.getLogger("sluice.tls")


class TlsError(ValueError):
    """The TLS flags or files are not usable; says which and why."""


def server_context(
    cert: str | None, key: str | None, client_ca: str | None
) -> ssl.SSLContext | None:
    """The context both ports serve with, None without ``cert``. Raises ``TlsError``."""
    if cert is None:
        if key is not None or client_ca is not None:
            raise TlsError("--tls-key and --tls-client-ca need --tls-cert")
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
        if client_ca is not None:
            context.load_verify_locations(cafile=client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as error:
        raise TlsError(f"cannot load the TLS certificate, key or client CA: {error}") from None
    return context


def quiet_tls_noise() -> None:
    """A failed handshake (plain TCP to a TLS port, a wrong CA, no client certificate)
    closes that connection and logs nothing: asyncio and uvloop report handshake errors
    only in debug mode. What is left is a warning on every EOF: TLS has no half-close, so
    a peer's EOF closes the connection, which is all the warning says."""
    logging.getLogger("asyncio").addFilter(_no_half_close_warning)


def _no_half_close_warning(record: logging.LogRecord) -> bool:
    return "eof_received() has no effect when using ssl" not in record.getMessage()
