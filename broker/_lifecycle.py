"""The message lifecycle, as one table. Everything that moves a message between states
goes through ``advance_state``; a move not in the table raises ``IllegalTransition``.

    put ──► delayed ──(due)──► ready ──reserve──► reserved ──ack──► gone
              ▲                  ▲                  │ │ │
              └──── retry later ─┼──────────────────┘ │ └─ bury/exhaust ──► dead
                                 └──── retry now ─────┘                    │
    ready|delayed ──cancel/purge──► gone          dead ──replay──► ready   │
                                                  dead ──purge/expire──► gone
    any state but gone ──delete (delete_queue with force)──► gone

"release" returns a delivery that never reached its consumer (attempt uncounted).
"retry" is a nack or a lease expiry: "later" when the delay (explicit or backoff) is
positive, "now" when it is zero; "exhaust" when the message has used up max_attempts.
"""

from __future__ import annotations

import enum
from typing import Final


class State(enum.StrEnum):
    NEW = "new"  # not yet stored; only ever the source of a put
    DELAYED = "delayed"
    READY = "ready"
    RESERVED = "reserved"
    DEAD = "dead"
    GONE = "gone"  # acked, cancelled or purged; the message is forgotten


class Event(enum.StrEnum):
    PUT_READY = "put"
    PUT_DELAYED = "put delayed"
    DUE = "due"
    RESERVE = "reserve"
    ACK = "ack"
    RELEASE = "release"
    RETRY_NOW = "retry now"
    RETRY_LATER = "retry later"
    EXHAUST = "exhaust"
    BURY = "bury"
    CANCEL = "cancel"
    PURGE = "purge"
    REPLAY = "replay"
    PURGE_DEAD = "purge dead"
    EXPIRE_DEAD = "expire dead"
    DELETE = "delete"  # its queue was deleted (delete_queue with force)


# Every member again as a module name, for the modules on the hot path (the core, queues,
# ready indexes, messages). On Python 3.11 reading a member off its class (``State.READY``)
# goes through the enum metaclass's ``__getattr__`` hook: about 110 ns a read here, against
# about 10 ns for a module name, and the core reads several per message.
NEW: Final = State.NEW
DELAYED: Final = State.DELAYED
READY: Final = State.READY
RESERVED: Final = State.RESERVED
DEAD: Final = State.DEAD
GONE: Final = State.GONE
PUT_READY: Final = Event.PUT_READY
PUT_DELAYED: Final = Event.PUT_DELAYED
DUE: Final = Event.DUE
RESERVE: Final = Event.RESERVE
ACK: Final = Event.ACK
RELEASE: Final = Event.RELEASE
RETRY_NOW: Final = Event.RETRY_NOW
RETRY_LATER: Final = Event.RETRY_LATER
EXHAUST: Final = Event.EXHAUST
BURY: Final = Event.BURY
CANCEL: Final = Event.CANCEL
PURGE: Final = Event.PURGE
REPLAY: Final = Event.REPLAY
PURGE_DEAD: Final = Event.PURGE_DEAD
EXPIRE_DEAD: Final = Event.EXPIRE_DEAD
DELETE: Final = Event.DELETE


TRANSITIONS: Final[dict[tuple[State, Event], State]] = {
    (State.NEW, Event.PUT_READY): State.READY,
    (State.NEW, Event.PUT_DELAYED): State.DELAYED,
    (State.DELAYED, Event.DUE): State.READY,
    (State.READY, Event.RESERVE): State.RESERVED,
    (State.RESERVED, Event.ACK): State.GONE,
    (State.RESERVED, Event.RELEASE): State.READY,
    (State.RESERVED, Event.RETRY_NOW): State.READY,
    (State.RESERVED, Event.RETRY_LATER): State.DELAYED,
    (State.RESERVED, Event.EXHAUST): State.DEAD,
    (State.RESERVED, Event.BURY): State.DEAD,
    (State.READY, Event.CANCEL): State.GONE,
    (State.DELAYED, Event.CANCEL): State.GONE,
    (State.READY, Event.PURGE): State.GONE,
    (State.DELAYED, Event.PURGE): State.GONE,
    (State.DEAD, Event.REPLAY): State.READY,
    (State.DEAD, Event.PURGE_DEAD): State.GONE,
    (State.DEAD, Event.EXPIRE_DEAD): State.GONE,
    (State.READY, Event.DELETE): State.GONE,
    (State.DELAYED, Event.DELETE): State.GONE,
    (State.RESERVED, Event.DELETE): State.GONE,
    (State.DEAD, Event.DELETE): State.GONE,
}


class IllegalTransition(RuntimeError):
    """A bug: the core tried a move the lifecycle does not allow."""


def advance_state(state: State, event: Event) -> State:
    """Return the state ``event`` leads to from ``state``; raise if it is not allowed."""
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise IllegalTransition(f"{event.value!r} is not allowed from {state.value!r}") from None
