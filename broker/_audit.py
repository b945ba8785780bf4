"""The audit log: who ran which admin op from where, what it changed, and how it ended;
every ``FORBIDDEN`` refusal; and every HTTP API request refused before an op ran.

An audit event is a log record of the logger ``sluice.audit`` named ``audit`` with the
fields ``principal`` (a name; ``auth-token`` for the all-rights token, ``-`` when the
broker checks nothing), ``peer`` (``host:port`` of a wire connection, the client's
address for the HTTP API), ``op``, ``queue`` or ``id`` (a message's), ``changed`` (the
counts of the result and the arguments given, such as configure's settings; never a
body) and ``outcome`` (``ok`` or the error code). The daemon's log carries them, in text
or JSON; ``AuditFile`` writes them as JSON lines to a file of their own as well.

An HTTP API request refused by its checks (no ``X-Sluice-Request`` header on a ``POST``,
no token or a wrong one, a broker-wide read without ``read`` everywhere) is an event of
its own (``refused_request``): ``principal`` (``(unknown)`` when none was established),
``peer``, ``route`` (method and path), ``reason`` and ``outcome`` (the error code).

The admin ops are the ops of verb ``admin`` in ``PERMISSIONS``: the server tests
membership in ``ADMIN_OPS`` and calls ``run_admin`` for those only, and ``refused`` when a
request is refused; other ops cost nothing more. Audit events are logged whatever the
``--log-level``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final, TextIO

from protocol import ErrorCode, SluiceError, shown

from ._auth import PERMISSIONS
from ._handlers import Call
from ._logging import JsonFormatter, event

log = logging.getLogger("sluice.audit")
log.setLevel(logging.INFO)  # an audit trail is not verbosity: always on
status_log = logging.getLogger("sluice")  # about the audit file: not in it

ADMIN_OPS: Final = frozenset(op for op, (verb, _) in PERMISSIONS.items() if verb == "admin")
NOBODY: Final = "-"  # the principal when the broker checks nothing
UNKNOWN: Final = "(unknown)"  # no principal established (a request refused before that)
OK: Final = "ok"
# What an admin op's result says it changed (configure's, pause's and resume's
# ``settings`` are the queue's whole settings: the arguments given say what changed).
RESULT_COUNTS: Final = (
    *("purged", "replayed", "cancelled", "removed", "bound", "unbound", "id"),
    *("deleted", "messages", "schedules", "bindings"),  # delete_queue's
)
NOT_SHOWN: Final = frozenset({"queue", "id", "body", "headers"})  # named apart, or data
MAX_SHOWN: Final = 200  # characters of a string argument kept as it is
MAX_KEYS: Final = 50  # of a mapping argument (configure's settings) shown key by key
MAX_DEPTH: Final = 2  # mappings in mappings shown key by key; deeper ones as a short repr


class AuditFileError(OSError):
    """The ``--audit-log`` file cannot be opened for appending; says which and why."""


def _plain(value: Any, depth: int = 0) -> Any:
    """An argument as it can be logged: bounded in size and depth, and JSON."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str) and len(value) <= MAX_SHOWN:
        return value
    if isinstance(value, dict) and len(value) <= MAX_KEYS and depth < MAX_DEPTH:
        return {str(key)[:MAX_SHOWN]: _plain(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        return {"count": len(value)}  # replay's ids: how many, not which
    return shown(value)


def _given(args: dict[str, Any]) -> dict[str, Any]:
    return {name: _plain(value) for name, value in args.items() if name not in NOT_SHOWN}


def _record(
    op: str, args: dict[str, Any], principal: str, peer: str, changed: dict[str, Any], outcome: str
) -> None:
    target = {"id": _plain(args["id"])} if "id" in args else {"queue": _plain(args.get("queue"))}
    fields = event(
        "audit", principal=principal, peer=peer, op=op, **target, changed=changed, outcome=outcome
    )
    where = " ".join(f"{key} {value}" for key, value in target.items())
    what = " ".join(f"{key}={value}" for key, value in changed.items())
    log.log(
        logging.INFO if outcome == OK else logging.WARNING,
        "audit: %s from %s: %s %s: %s%s",
        principal,
        peer,
        op,
        where,
        outcome,
        f" ({what})" if what else "",
        extra=fields,
    )


def run_admin(
    handle: Callable[[Call, str, dict[str, Any]], Any],
    call: Call,
    op: str,
    args: dict[str, Any],
    principal: str,
    peer: str,
) -> Any:
    """``handle(call, op, args)``, audited: its counts and outcome; re-raises its error."""
    changed = _given(args)
    try:
        result = handle(call, op, args)
    except SluiceError as error:
        _record(op, args, principal, peer, changed, (error.code or ErrorCode.INTERNAL).value)
        raise
    except Exception:
        _record(op, args, principal, peer, changed, ErrorCode.INTERNAL.value)
        raise
    if isinstance(result, dict):
        changed |= {key: result[key] for key in RESULT_COUNTS if key in result}
    _record(op, args, principal, peer, changed, OK)
    return result


def refused(op: str, args: dict[str, Any], principal: str, peer: str, error: SluiceError) -> None:
    """A request refused before it ran (``FORBIDDEN``, or an admin op's bad arguments)."""
    changed = dict(error.details) if error.code == ErrorCode.FORBIDDEN else {}
    _record(op, args, principal, peer, changed, (error.code or ErrorCode.INTERNAL).value)


def refused_request(route: str, principal: str, peer: str, reason: str, error: SluiceError) -> None:
    """An HTTP API request refused before any op ran; ``reason`` says which check."""
    outcome = (error.code or ErrorCode.INTERNAL).value
    fields = event(
        "audit", principal=principal, peer=peer, route=route, reason=reason, outcome=outcome
    )
    log.warning(
        "audit: %s from %s: %s: %s (%s)", principal, peer, route, outcome, reason, extra=fields
    )


class AuditFile:
    """``--audit-log PATH``: every audit event as one JSON line appended to ``path``,
    flushed line by line. ``reopen`` (on SIGHUP) starts writing to the file now at
    ``path``, for rotation by moving the file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.handler = logging.StreamHandler(self._open())
        self.handler.setFormatter(JsonFormatter())
        log.addHandler(self.handler)

    def _open(self) -> TextIO:
        try:
            return open(self.path, "a", encoding="utf-8", buffering=1)
        except OSError as error:
            raise AuditFileError(f"cannot open the audit log {self.path}: {error}") from None

    def reopen(self) -> None:
        try:
            stream = self._open()
        except AuditFileError as error:
            status_log.error(
                "audit log not reopened, still writing the old file: %s",
                error,
                extra=event("audit_reopen_failed", error=str(error)),
            )
            return
        old = self.handler.setStream(stream)
        if old is not None:
            old.close()
        status_log.info("audit log %s reopened", self.path, extra=event("audit_reopened"))

    def close(self) -> None:
        log.removeHandler(self.handler)
        self.handler.close()
        self.handler.stream.close()
