"""Principals and what they may do: the auth file, the op -> verb table, the checks.

A principal is named by its token; the broker keeps only the token's SHA-256 digest. Its
grants say which verbs (``produce``, ``consume``, ``read``, ``admin``) it has on which
queues (a glob). ``PERMISSIONS`` maps every op to exactly one verb and says where the
request names its queues; it is the one place this rule lives (PROTOCOL.md shows it, and a
test keeps the two the same). Default deny: no grant, no right.

Cost: a broker without an auth file checks nothing (the server holds ``None`` as the
principal). With one, a check is a dict lookup per (verb, queue) once the principal's
cache holds it; a glob is matched only the first time a principal meets a queue name.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Final

from protocol import VERBS, Forbidden, Unauthorized

from ._args import Args
from ._core import Core
from ._handlers import HANDLERS
from ._logging import event

log = logging.getLogger("sluice.auth")

EVERYWHERE: Final = "*"  # the glob of a grant on every queue (and broker-wide reads)
MAX_CACHED: Final = 10_000  # (verb, queue) answers one principal keeps; then it starts over
_DIGEST: Final = re.compile(r"[0-9a-f]{64}")
_GLOB: Final = re.compile(r"[A-Za-z0-9._:*?\[\]!-]{1,200}")

# Where a request names its queues: a list, or None for a broker-wide op (whose result
# is then cut down to the queues the principal may see; see ``visible``).
Queues = Callable[[Core, Args], list[str] | None]


def _named(core: Core, args: Args) -> list[str] | None:
    return [args.queue()]


def _reserved(core: Core, args: Args) -> list[str] | None:
    return args.queues()


def _broker_wide(core: Core, args: Args) -> list[str] | None:
    return None


def _optional_queue(core: Core, args: Args) -> list[str] | None:
    return [args.queue()] if args.given("queue") else None


def _queue_of(core: Core, message_id: int) -> list[str]:
    """The queue of a message, or of a kept result; [] for an unknown id (the op then
    fails with NOT_FOUND or LEASE_LOST and changes nothing)."""
    message = core.messages.get(message_id)
    if message is not None:
        return [message.queue.name]
    result = core.results.by_id.get(message_id)
    return [] if result is None else [result.queue]


def _channel(core: Core, args: Args) -> list[str] | None:
    """A publish's channel, checked against the grants' globs like a queue name."""
    channel = args.raw("channel")
    return [channel] if isinstance(channel, str) else []  # not a name: the handler says so


def _patterns(core: Core, args: Args) -> list[str] | None:
    """A subscribe's patterns, each checked against the globs as written."""
    patterns = args.raw("patterns")
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, list):
        return []  # the handler refuses it
    return [pattern for pattern in patterns if isinstance(pattern, str)]


def _message(core: Core, args: Args) -> list[str] | None:
    return _queue_of(core, args.message_id())


def _delivered(core: Core, args: Args) -> list[str] | None:
    pairs, _, _ = args.deliveries_with_results()
    return sorted({name for message_id, _ in pairs for name in _queue_of(core, message_id)})


# The one table: op -> (verb, where its queues are). ``ping`` and ``unsubscribe`` (of the
# connection's own subscription) need no verb; ``hello`` is the connection's, before any
# principal. Channels take the queues' globs: publish is produce on the channel,
# subscribe consume on each pattern as written; bind and unbind are admin on the queue
# the copies go into.
PERMISSIONS: Final[dict[str, tuple[str | None, Queues]]] = {
    "ping": (None, _broker_wide),
    "put": ("produce", _named),
    "put_and_wait": ("produce", _named),
    "reserve": ("consume", _reserved),
    "ack": ("consume", _delivered),
    "nack": ("consume", _delivered),
    "touch": ("consume", _message),
    "bury": ("consume", _message),
    "progress": ("consume", _message),
    "stats": ("read", _named),
    "status": ("read", _message),
    "peek": ("read", _named),
    "queues": ("read", _broker_wide),
    "dead_letters": ("read", _named),
    "result": ("read", _message),
    "schedules": ("read", _optional_queue),
    "configure": ("admin", _named),
    "pause": ("admin", _named),
    "resume": ("admin", _named),
    "purge": ("admin", _named),
    "replay": ("admin", _named),
    "purge_dead": ("admin", _named),
    "delete_queue": ("admin", _named),
    "cancel": ("admin", _message),
    "schedule": ("admin", _named),
    "unschedule": ("admin", _named),
    "trigger": ("admin", _named),  # fires an admin's schedule, so it is the admin's too
    "publish": ("produce", _channel),
    "subscribe": ("consume", _patterns),
    "unsubscribe": (None, _broker_wide),
    "bind": ("admin", _named),
    "unbind": ("admin", _named),
    "bindings": ("read", _broker_wide),
}


class AuthFileError(ValueError):
    """The auth file cannot be read or is not valid; says where and why."""


@dataclass(frozen=True, slots=True)
class Grant:
    queues: str  # a glob: * any run of characters, ? one, [abc] one of a set
    allow: frozenset[str]


@dataclass(slots=True, eq=False)
class Principal:
    """Who sent a request. ``everything``: the ``--auth-token``'s principal."""

    name: str
    grants: tuple[Grant, ...] = ()
    everything: bool = False
    from_token: bool = False  # grants carried by the token itself (a JWT), not the file
    _cache: dict[tuple[str, str], bool] = field(default_factory=dict, repr=False)

    def may(self, verb: str, queue: str) -> bool:
        key = (verb, queue)
        allowed = self._cache.get(key)
        if allowed is None:
            allowed = self.everything or any(
                verb in grant.allow and fnmatchcase(queue, grant.queues) for grant in self.grants
            )
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
            self._cache[key] = allowed
        return allowed

    def may_everywhere(self, verb: str) -> bool:
        """True if a grant gives ``verb`` on every queue (``queues = "*"``)."""
        return self.everything or any(
            verb in grant.allow and grant.queues == EVERYWHERE for grant in self.grants
        )


REVOKED: Final = Principal("(revoked)")  # a connection whose principal left the file


def looks_like_jwt(token: str) -> bool:
    """Three base64url parts, the first a JSON header (``{"`` is ``ey``)."""
    return token.count(".") == 2 and token.startswith("ey")


def forbidden(principal: Principal, verb: str, queue: str, op: str, why: str = "") -> Forbidden:
    return Forbidden(
        f"{op}: principal {principal.name!r} may not {verb} on queue {queue!r}{why}",
        {"principal": principal.name, "verb": verb, "queue": queue, "op": op},
    )


def authorize(principal: Principal, core: Core, op: str, raw_args: dict[str, Any]) -> None:
    """Raise ``Forbidden`` unless ``principal`` may run ``op`` with these arguments
    (``BadRequest`` if they do not even name their queues). An op unknown to the broker
    passes (its handler answers UNKNOWN_OP); a known op missing from ``PERMISSIONS`` is
    refused (default deny)."""
    if principal.everything:
        return
    entry = PERMISSIONS.get(op)
    handler = HANDLERS.get(op)
    if handler is None:
        return
    if entry is None:
        raise Forbidden(f"{op}: no permission covers this op", {"op": op})
    verb, where = entry
    if verb is None:
        return
    queues = where(core, Args(op, raw_args, handler[0]))
    if queues is None:
        if not any(verb in grant.allow for grant in principal.grants):
            raise forbidden(principal, verb, EVERYWHERE, op)
        return
    for queue in queues:  # (a reserve needs only consume: it leaves no queue it made)
        if not principal.may(verb, queue):
            raise forbidden(principal, verb, queue, op)


def visible(principal: Principal, op: str, result: Any) -> Any:
    """A broker-wide read's result cut down to the queues ``principal`` may read."""
    if principal.everything:
        return result
    if op == "queues":
        return {"queues": [q for q in result["queues"] if principal.may("read", q["name"])]}
    if op == "schedules":
        shown = [s for s in result["schedules"] if principal.may("read", s["queue"])]
        return {"schedules": shown}
    if op == "bindings":
        bound = [b for b in result["bindings"] if principal.may("read", b["queue"])]
        return {"bindings": bound}
    return result


# ----------------------------------------------------------------- the auth file


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _grant(where: str, raw: Any) -> Grant:
    if not isinstance(raw, dict) or set(raw) != {"queues", "allow"}:
        raise AuthFileError(f'{where}: a grant is {{queues = "glob", allow = [verbs]}}')
    queues, allow = raw["queues"], raw["allow"]
    if not isinstance(queues, str) or not _GLOB.fullmatch(queues):
        raise AuthFileError(f"{where}: queues must be a glob of queue-name characters and *?[]")
    if not isinstance(allow, list) or not allow or not set(allow) <= set(VERBS):
        raise AuthFileError(f"{where}: allow must be a non-empty list of {list(VERBS)}")
    return Grant(queues, frozenset(allow))


def _principal(where: str, raw: Any) -> tuple[str, Principal]:
    if not isinstance(raw, dict) or not {"name", "token_sha256"} <= set(raw):
        raise AuthFileError(f"{where}: a principal needs name and token_sha256")
    unknown = set(raw) - {"name", "token_sha256", "grants"}
    if unknown:
        raise AuthFileError(f"{where}: unknown keys {sorted(unknown)}")
    name, digest, grants = raw["name"], raw["token_sha256"], raw.get("grants", [])
    if not isinstance(name, str) or not name:
        raise AuthFileError(f"{where}: name must be a non-empty string")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise AuthFileError(
            f"{where} ({name}): token_sha256 must be 64 lowercase hex digits (the SHA-256 "
            "of the token; `sluice token` prints one)"
        )
    return digest, Principal(name, parse_grants(f"{where} ({name})", grants))


def parse_grants(where: str, grants: Any) -> tuple[Grant, ...]:
    """A list of grants in the auth file's form (also a JWT's ``sluice`` claim)."""
    if not isinstance(grants, list):
        raise AuthFileError(f"{where}: grants must be a list")
    return tuple(_grant(f"{where} grant {i + 1}", g) for i, g in enumerate(grants))


def parse_auth_file(text: str, path: str = "auth file") -> dict[str, Principal]:
    """The principals of an auth file by token digest. Raises ``AuthFileError``."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise AuthFileError(f"{path}: not TOML: {error}") from None
    unknown = set(document) - {"principal"}
    if unknown:
        raise AuthFileError(f"{path}: unknown keys {sorted(unknown)} (expected [[principal]])")
    raw = document.get("principal", [])
    if not isinstance(raw, list):
        raise AuthFileError(f"{path}: principal must be an array of tables ([[principal]])")
    principals: dict[str, Principal] = {}
    names: set[str] = set()
    for index, entry in enumerate(raw):
        digest, principal = _principal(f"{path}: principal {index + 1}", entry)
        if digest in principals or principal.name in names:
            raise AuthFileError(f"{path}: principal {principal.name!r}: name or token repeated")
        principals[digest] = principal
        names.add(principal.name)
    return principals


def read_auth_file(path: str) -> dict[str, Principal]:
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as error:
        raise AuthFileError(f"cannot read auth file {path}: {error}") from None
    return parse_auth_file(text, path)


class Authority:
    """Turns a hello's token into a principal: the ``--auth-token`` (every right) and the
    principals of ``--auth-file``. ``principal`` None from ``authenticate``: nothing to
    check (no auth file, or the all-rights token)."""

    ALL: Final = Principal("auth-token", everything=True)

    def __init__(self, token: str | None = None, path: str | None = None, jwt: Any = None) -> None:
        """``jwt``: a ``_jwt.JwtVerifier`` when tokens may be JWTs (``--jwt-key``)."""
        self.token = token
        self.path = path
        self.jwt = jwt
        self.principals = read_auth_file(path) if path is not None else {}

    @property
    def required(self) -> bool:
        return self.token is not None or self.path is not None or self.jwt is not None

    def principal_of(self, token: Any) -> Principal | None:
        """The principal a token names, ``ALL`` for the auth token; None if it names none.
        A JWT that does not verify raises ``Unauthorized`` saying why."""
        if not isinstance(token, str):
            return None
        if self.token is not None and hmac.compare_digest(token.encode(), self.token.encode()):
            return self.ALL
        if self.jwt is not None and looks_like_jwt(token):
            return self.jwt.principal(token)  # type: ignore[no-any-return]
        return self.principals.get(token_digest(token))

    def authenticate(self, token: Any) -> Principal | None:
        """The principal whose requests need checks, None if none do; raises
        ``Unauthorized`` for a missing or unknown token when one is required."""
        if not self.required:
            return None
        principal = self.principal_of(token)
        if principal is None:
            raise Unauthorized("hello needs a valid auth token ('token')")
        return None if principal.everything else principal

    def reload(self) -> bool:
        """Read the auth file again; on any error keep the old principals and log why.
        Returns True if the new file is in force."""
        if self.path is None:
            return False
        try:
            principals = read_auth_file(self.path)
        except AuthFileError as error:
            log.error(
                "auth file not reloaded, the old grants stay: %s",
                error,
                extra=event("auth_reload_failed", error=str(error)),
            )
            return False
        self.principals = principals
        log.info(
            "auth file %s reloaded: %d principals",
            self.path,
            len(principals),
            extra=event("auth_reloaded", principals=len(principals)),
        )
        return True

    def rebound(self, digest: str) -> Principal:
        """The principal a token digest names now (after a reload): ``REVOKED`` if none."""
        return self.principals.get(digest, REVOKED)


def require_everywhere(principal: Principal, verb: str, what: str) -> None:
    """Raise ``Forbidden`` unless ``principal`` has ``verb`` on every queue."""
    if not principal.may_everywhere(verb):
        raise forbidden(principal, verb, EVERYWHERE, what)
