"""Value rules shared by both ends (so a client can refuse bad input before sending)."""

from __future__ import annotations

import re
from typing import Final

QUEUE_NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9._:-]{1,200}")


def is_queue_name(value: object) -> bool:
    """True for 1-200 characters of ``[A-Za-z0-9._:-]``."""
    return isinstance(value, str) and QUEUE_NAME_PATTERN.fullmatch(value) is not None
