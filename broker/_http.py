"""The broker's HTTP server (aiohttp), on the broker's own event loop.

It serves ``/metrics`` (Prometheus) and ``/healthz`` as they always were, the JSON admin
API under ``/api/v1`` (``_api``), and the dashboard at ``/``: three files of the package
(``broker/dashboard``), read once at start, that only talk to the API. Every handler runs
on the loop thread, so it reads the core without locks; a scrape that walks many queues
yields to the loop as it goes.

``/metrics`` and ``/healthz`` answer ``GET`` and ``HEAD`` (405 otherwise) and close the
connection after each answer, as the hand-written endpoint before this one did.
"""

from __future__ import annotations

import logging
import ssl
from importlib import resources
from typing import TYPE_CHECKING, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST

from ._api import MAX_BODY, add_api_routes
from ._config import HttpUnavailable
from ._logging import event
from ._metrics import exposition, health
from ._rates import RateSampler

if TYPE_CHECKING:
    from ._server import BrokerServer

log = logging.getLogger("sluice.http")

MAX_HEAD_LINE: Final = 8190  # bytes of a request line or of one header (else 400)
_TEXT: Final = "text/plain; charset=utf-8"
SHUTDOWN_GRACE: Final = 5.0  # seconds a stopping broker waits for HTTP answers in flight
DASHBOARD_FILES: Final = {  # the only files served from the package, by name
    "index.html": "text/html",
    "app.js": "application/javascript",
    "style.css": "text/css",
}
# The dashboard loads only its own files and talks only to this server.
_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


class _ClientErrors(logging.Filter):
    """aiohttp logs a request it cannot parse (a client's fault, answered with 400) as an
    error with a traceback: log one debug line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError) and 400 <= (error.code or 400) < 500:
            log.debug("bad HTTP request: %s", error.message, extra=event("bad_http_request"))
            return False
        return True


server_log = logging.getLogger("sluice.http.server")
server_log.addFilter(_ClientErrors())


def dashboard_file(name: str) -> bytes:
    return resources.files("broker").joinpath("dashboard", name).read_bytes()


class HttpServer:
    """The app and its listener. ``top_queues`` bounds the per-queue series of a scrape;
    The server's authority (its auth token and auth file) guards the API."""

    def __init__(self, server: BrokerServer, *, top_queues: int) -> None:
        self.server = server
        self.top_queues = top_queues
        self.rates = RateSampler(server)
        self.app = web.Application(client_max_size=MAX_BODY)
        self.app.router.add_route("*", "/metrics", self._metrics)
        self.app.router.add_route("*", "/healthz", self._healthz)
        add_api_routes(self.app, server, self.rates)
        self._files = {name: dashboard_file(name) for name in DASHBOARD_FILES}
        self.app.router.add_get("/", self._index)
        self.app.router.add_get("/dashboard/{name}", self._asset)
        self._runner: web.AppRunner | None = None

    async def start(
        self, host: str, port: int, tls: ssl.SSLContext | None = None
    ) -> tuple[str, int]:
        """Listen on ``host:port`` (0: a free port); returns the address bound. Raises
        ``HttpUnavailable`` if it cannot."""
        runner = web.AppRunner(
            self.app,
            handle_signals=False,
            access_log=None,
            max_line_size=MAX_HEAD_LINE,
            max_field_size=MAX_HEAD_LINE,
            logger=server_log,
            shutdown_timeout=SHUTDOWN_GRACE,
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=tls)
        try:
            await site.start()
        except OSError as error:
            await runner.cleanup()
            raise HttpUnavailable(
                f"cannot serve metrics on {host}:{port} (the HTTP port: metrics, admin API, "
                f"dashboard): {error}; pick another --http-port (or its old name "
                "--metrics-port), or 0 to turn HTTP off"
            ) from None
        self._runner = runner
        bound = runner.addresses[0]
        return bound[0], bound[1]

    async def close(self) -> None:
        self.rates.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # /metrics and /healthz, as before: GET or HEAD, one answer per connection

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return _closing(405, _TEXT, b"only GET and HEAD are served\n")
        try:
            body = await exposition(self.server, self.top_queues)
        except Exception:
            log.exception("collecting metrics failed", extra=event("metrics_failed"))
            return _closing(500, _TEXT, b"collecting metrics failed; see the broker's log\n")
        return _closing(200, CONTENT_TYPE_LATEST, body)

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return _closing(405, _TEXT, b"only GET and HEAD are served\n")
        reason = health(self.server)
        if reason is None:
            return _closing(200, _TEXT, b"ok\n")
        return _closing(503, _TEXT, f"{reason}\n".encode())

    # the dashboard

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return self._file("index.html")

    async def _asset(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in DASHBOARD_FILES:
            raise web.HTTPNotFound(text=f"no dashboard file {name!r}\n")
        return self._file(name)

    def _file(self, name: str) -> web.Response:
        response = web.Response(body=self._files[name], content_type=DASHBOARD_FILES[name])
        response.charset = "utf-8"
        response.headers["Content-Security-Policy"] = _CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-cache"
        return response


def _closing(status: int, content_type: str, body: bytes) -> web.Response:
    """A response after which the connection closes."""
    response = web.Response(status=status, body=body, headers={"Content-Type": content_type})
    response.force_close()
    return response
