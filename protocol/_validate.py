"""Value rules shared by both ends (so a client can refuse bad input before sending)."""

from __future__ import annotations

import re
import reprlib
from typing import Any, Final

from ._errors import BadRequest

QUEUE_NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9._:-]{1,200}")
MAX_WAIT: Final = 3600.0  # seconds a long-poll (reserve, result, put_and_wait) may wait
PRIORITY_RANGE: Final = (-(2**31), 2**31 - 1)  # a message's priority, inclusive


_KNOWN_NAMES: Final[set[str]] = set()  # names that passed, so a name is matched once
_KNOWN_NAMES_MAX: Final = 4096


def is_queue_name(value: object) -> bool:
    """True for 1-200 characters of ``[A-Za-z0-9._:-]``."""
    if type(value) is str and value in _KNOWN_NAMES:
        return True
    if not isinstance(value, str) or QUEUE_NAME_PATTERN.fullmatch(value) is None:
        return False
    if len(_KNOWN_NAMES) >= _KNOWN_NAMES_MAX:
        _KNOWN_NAMES.clear()
    _KNOWN_NAMES.add(value)
    return True


def require_queue_name(value: Any, where: str, kind: str = "queue") -> str:
    """``value`` if it is a valid queue name, else ``BadRequest`` saying what is allowed.
    Schedule names follow the same rules (``kind="schedule"``)."""
    if not is_queue_name(value):
        raise BadRequest(
            f"{where}: invalid {kind} name {shown(value)}: use 1-200 characters of "
            "A-Z a-z 0-9 . _ : -"
        )
    return value  # type: ignore[no-any-return]


_shortener = reprlib.Repr()
_shortener.maxstring = _shortener.maxother = 80
_shortener.maxlevel = 3


def shown(value: Any) -> str:
    """A short repr for error messages: bounded in length and depth, so a hostile value
    (a megabyte string, a list nested a thousand deep) cannot blow up an error text."""
    return _shortener.repr(value)
