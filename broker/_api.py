"""The JSON admin API under ``/api/v1``: a thin view of the wire protocol's handlers.

Each route names one wire op and maps the path, the query and the JSON body onto that
op's arguments; ``BrokerServer.run_confirmed`` runs it exactly as a wire request, so the
arguments are checked by the same code, the semantics live once, and a change is answered
only after the batch that holds it is durable, as a wire reply would be.

Errors are ``{"code", "message"}`` with the protocol's codes (``protocol/_errors.py``) and
an HTTP status that fits (``STATUS``). Mutating routes (POST) need:

- the header ``X-Sluice-Request: 1``, which a cross-site form or a simple cross-origin
  request cannot send (so a page elsewhere cannot make a browser post here), and
- if the broker has an ``--auth-token`` or an ``--auth-file``, ``Authorization: Bearer
  <token>`` (401 when missing, 403 when wrong).

Reads need neither, unless the broker has an ``--auth-file``: then every route needs a
token, and a principal's grants apply as on the wire (the same ``authorize``); broker-wide
reads (overview, connections) need ``read`` on every queue (a grant ``queues = "*"``).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from protocol import BadRequest, ErrorCode, Forbidden, SluiceError, TooLarge, Unauthorized

from ._audit import UNKNOWN, refused_request
from ._auth import Authority, Principal, require_everywhere
from ._logging import event
from ._metrics import QueueTotals, deepest_queues
from ._rates import RateSampler

if TYPE_CHECKING:
    from ._server import BrokerServer

log = logging.getLogger("sluice.api")

PREFIX: Final = "/api/v1"
MAX_BODY: Final = 4 * 1024 * 1024  # bytes of a request body (a replay of 100,000 ids fits)
PREVIEW_BYTES: Final = 1024  # of a message body shown by messages/{id}
OVERVIEW_QUEUES: Final = 100  # the deepest queues the overview lists
CSRF_HEADER: Final = "X-Sluice-Request"
STATUS: Final = {
    ErrorCode.BAD_FRAME: 400,
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNKNOWN_OP: 400,
    ErrorCode.UNSUPPORTED_VERSION: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.LEASE_LOST: 409,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.STORAGE_FULL: 507,
    ErrorCode.QUOTA: 429,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.INTERNAL: 500,
}
# What aiohttp refuses before a route runs, as the protocol's codes.
_HTTP_CODES: Final = {
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.BAD_REQUEST,
    413: ErrorCode.TOO_LARGE,
}

Route = Callable[[web.Request], Awaitable[Any]]


# ----------------------------------------------------------------- encoding


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return preview(bytes(value))
    raise TypeError(f"{type(value).__name__} is not JSON")


def preview(body: bytes) -> dict[str, Any]:
    """A body as JSON: its first ``PREVIEW_BYTES`` as text when they are UTF-8, else as
    base64; ``truncated`` says whether there was more."""
    head = body[:PREVIEW_BYTES]
    try:
        shown: dict[str, Any] = {"text": head.decode()}
    except UnicodeDecodeError:
        shown = {"base64": base64.b64encode(head).decode()}
    return shown | {"size": len(body), "truncated": len(body) > PREVIEW_BYTES}


def json_response(result: Any, status: int = 200) -> web.Response:
    """``result`` as one line of JSON (ended by a newline, for a terminal)."""
    text = json.dumps(result, default=_json_default, allow_nan=False, separators=(",", ":"))
    return web.Response(status=status, text=text + "\n", content_type="application/json")


def error_response(error: SluiceError) -> web.Response:
    code = error.code or ErrorCode.INTERNAL
    return json_response(error.to_wire(), STATUS[code])


# ----------------------------------------------------------------- requests


def _query_value(text: str) -> Any:
    """A query parameter as the op's argument: an integer if it reads as one (the op then
    checks its range), else the string (the op then says what it wanted)."""
    try:
        return int(text)
    except ValueError:
        return text


def query_args(request: web.Request, allowed: tuple[str, ...]) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for name, text in request.query.items():
        if name not in allowed:
            raise BadRequest(f"unknown query parameter {name!r}; allowed: {list(allowed)}")
        args[name] = text if name == "state" else _query_value(text)
    return args


def message_id(request: web.Request) -> int:
    text = request.match_info["id"]
    if not text.isdigit() or int(text) < 1 or int(text) > 2**63 - 1:
        raise BadRequest(f"a message id is a positive integer, got {text!r}")
    return int(text)


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object (an empty body is ``{}``)."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise TooLarge(f"the request body is over {MAX_BODY} bytes") from None
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as error:
        raise BadRequest(f"the request body is not JSON: {error}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


class Guard:
    """The checks of a route (see the module docstring). Each refusal is an audit event
    (``refused_request``), as the wire's refusals are."""

    def __init__(self, authority: Authority) -> None:
        self.authority = authority

    def check(self, request: web.Request, *, mutating: bool = True) -> Principal | None:
        """The request's principal (None: nothing to check); raises if it has none."""
        if mutating and request.headers.get(CSRF_HEADER) != "1":
            raise refused(
                request,
                f"no {CSRF_HEADER} header",
                Forbidden(
                    f"a mutating request needs the header '{CSRF_HEADER}: 1' (it keeps other "
                    "sites' pages from posting here)"
                ),
            )
        authority = self.authority
        if not authority.required or (not mutating and authority.path is None):
            return None
        sent = request.headers.get("Authorization", "")
        scheme, _, token = sent.partition(" ")
        if not sent:
            needed = "this broker needs an auth token: 'Authorization: Bearer <token>'"
            raise refused(request, "no token", Unauthorized(needed))
        principal = authority.principal_of(token.strip()) if scheme.lower() == "bearer" else None
        if principal is None:
            wrong = "wrong auth token (send 'Authorization: Bearer <token>')"
            raise refused(request, "wrong token", Forbidden(wrong))
        return None if principal.everything else principal


def refused(
    request: web.Request, reason: str, error: SluiceError, principal: str = UNKNOWN
) -> SluiceError:
    """``error``, once its refusal of ``request`` is audited: raise what it returns."""
    route = f"{request.method} {request.path}"
    refused_request(route, principal, request.remote or "http", reason, error)
    return error


# ----------------------------------------------------------------- routes


class Api:
    def __init__(self, server: BrokerServer, rates: RateSampler) -> None:
        self.server = server
        self.rates = rates
        self.guard = Guard(server.authority)

    async def op(self, request: web.Request, op: str, args: dict[str, Any]) -> Any:
        """Run ``op`` as the request's principal; the guard has checked a mutating
        request's header before any body was read."""
        principal = self.guard.check(request, mutating=request.method == "POST")
        peer = request.remote or "http"
        return await self.server.run_confirmed(op, args, principal, peer)

    def broker_wide(self, request: web.Request, what: str) -> None:
        principal = self.guard.check(request, mutating=False)
        if principal is not None:
            try:
                require_everywhere(principal, "read", what)
            except Forbidden as error:
                refused(request, "read on every queue needed", error, principal.name)
                raise

    # reads

    async def overview(self, request: web.Request) -> Any:
        """Totals over every queue and the ``OVERVIEW_QUEUES`` deepest queues' summaries,
        from one walk of the queues that yields to the loop as it goes."""
        query_args(request, ())
        self.broker_wide(request, "overview")
        self.rates.look()
        totals = QueueTotals()
        deepest = await deepest_queues(self.server.core, OVERVIEW_QUEUES, totals)
        return {
            "queues": totals.queues,
            "messages": {state.value: count for state, count in totals.depth.items()},
            "totals": totals.totals,
            "rates": self.rates.rates(),
            "history": self.rates.history(),
            "deepest": [queue.summary() for queue in deepest],
            "connections": len(self.server.connections),
            "time": self.server.clock(),
        }

    async def queues(self, request: web.Request) -> Any:
        query_args(request, ())
        return await self.op(request, "queues", {})

    async def queue(self, request: web.Request) -> Any:
        query_args(request, ())
        return await self.op(request, "stats", {"queue": request.match_info["queue"]})

    async def messages(self, request: web.Request) -> Any:
        args = query_args(request, ("state", "limit", "after"))
        args["queue"] = request.match_info["queue"]
        if args.get("state") == "dead":
            del args["state"]
            return await self.op(request, "dead_letters", args)
        return await self.op(request, "peek", args)

    async def dead(self, request: web.Request) -> Any:
        args = query_args(request, ("limit", "after"))
        return await self.op(request, "dead_letters", args | {"queue": request.match_info["queue"]})

    async def message(self, request: web.Request) -> Any:
        query_args(request, ())
        found = message_id(request)
        status = await self.op(request, "status", {"id": found})
        message = self.server.core.messages.get(found)
        if message is not None:
            status["body"] = preview(message.body)
        return status

    async def connections(self, request: web.Request) -> Any:
        query_args(request, ())
        self.broker_wide(request, "connections")
        return {
            "connections": [
                {
                    "id": connection.id,
                    "peer": connection.peer,
                    "client": connection.client_name,
                    "consumer": connection.consumer,
                    "delivered": connection.delivered,
                    "waiting": len(connection.waiting),
                    "requests": connection.requests,
                    "opened_at": connection.opened_at,
                }
                for connection in self.server.connections.values()
            ]
        }

    # writes: each names its op; the path gives the queue or the id

    def queue_action(self, op: str, *, with_body: bool = False) -> Route:
        async def route(request: web.Request) -> Any:
            self.guard.check(request)
            args = await json_body(request) if with_body else {}
            if "queue" in args:
                raise BadRequest(f"{op}: the queue is named by the path, not the body")
            return await self.op(request, op, args | {"queue": request.match_info["queue"]})

        return route

    async def configure(self, request: web.Request) -> Any:
        self.guard.check(request)
        settings = await json_body(request)
        queue = request.match_info["queue"]
        return await self.op(request, "configure", {"queue": queue, "settings": settings})

    async def cancel(self, request: web.Request) -> Any:
        self.guard.check(request)
        return await self.op(request, "cancel", {"id": message_id(request)})

    # schedules

    async def schedules(self, request: web.Request) -> Any:
        query_args(request, ())
        queue = request.match_info.get("queue")
        return await self.op(request, "schedules", {} if queue is None else {"queue": queue})

    async def schedule(self, request: web.Request) -> Any:
        """Create or replace: the JSON body holds the schedule's fields, its ``body`` a
        string (sent as UTF-8)."""
        self.guard.check(request)
        fields = await json_body(request)
        if "queue" in fields or "name" in fields:
            raise BadRequest("schedule: the queue and the name are named by the path")
        if isinstance(fields.get("body"), str):
            fields["body"] = fields["body"].encode()
        return await self.op(request, "schedule", fields | self._schedule_path(request))

    def schedule_action(self, op: str) -> Route:
        async def route(request: web.Request) -> Any:
            return await self.op(request, op, self._schedule_path(request))

        return route

    @staticmethod
    def _schedule_path(request: web.Request) -> dict[str, str]:
        return {"queue": request.match_info["queue"], "name": request.match_info["name"]}


def _json_route(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            return json_response(await route(request))
        except SluiceError as error:
            return error_response(error)
        except Exception:
            log.exception(
                "internal error on %s %s",
                request.method,
                request.path,
                extra=event("internal_error", path=request.path),
            )
            return error_response(SluiceError(f"internal error on {request.path}"))

    return handler


@web.middleware
async def _api_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """What aiohttp itself refuses under the API's prefix (no such route, wrong method)
    answers as JSON too."""
    try:
        return await handler(request)
    except web.HTTPException as refused:
        if not request.path.startswith(PREFIX) or refused.status < 400:
            raise
        code = _HTTP_CODES.get(refused.status, ErrorCode.BAD_REQUEST)
        message = f"{request.method} {request.path}: {refused.reason}"
        return json_response({"code": code.value, "message": message}, refused.status)


def add_api_routes(app: web.Application, server: BrokerServer, rates: RateSampler) -> None:
    api = Api(server, rates)
    app.middlewares.append(_api_errors)
    queue = f"{PREFIX}/queues/{{queue}}"
    gets: list[tuple[str, Route]] = [
        (f"{PREFIX}/overview", api.overview),
        (f"{PREFIX}/queues", api.queues),
        (queue, api.queue),
        (f"{queue}/messages", api.messages),
        (f"{queue}/dead", api.dead),
        (f"{PREFIX}/messages/{{id}}", api.message),
        (f"{PREFIX}/connections", api.connections),
        (f"{PREFIX}/schedules", api.schedules),
        (f"{queue}/schedules", api.schedules),
    ]
    posts: list[tuple[str, Route]] = [
        (f"{queue}/pause", api.queue_action("pause")),
        (f"{queue}/resume", api.queue_action("resume")),
        (f"{queue}/purge", api.queue_action("purge")),
        (f"{queue}/replay", api.queue_action("replay", with_body=True)),
        (f"{queue}/purge-dead", api.queue_action("purge_dead")),
        (f"{queue}/delete", api.queue_action("delete_queue", with_body=True)),
        (f"{queue}/configure", api.configure),
        (f"{PREFIX}/messages/{{id}}/cancel", api.cancel),
        (f"{queue}/schedules/{{name}}", api.schedule),
        (f"{queue}/schedules/{{name}}/trigger", api.schedule_action("trigger")),
        (f"{queue}/schedules/{{name}}/unschedule", api.schedule_action("unschedule")),
    ]
    for path, route in gets:
        app.router.add_get(path, _json_route(route))
    for path, route in posts:
        app.router.add_post(path, _json_route(route))
