"""Sluice broker: the pure queue core, the asyncio server, and the daemon entry point.

``Core`` holds every queue in memory and does no I/O; ``BrokerServer`` serves it over TCP.
Run the daemon with ``python -m broker`` (or ``sluice-broker``); ``--help`` lists the flags.
"""

__version__ = "0.1.0"

from ._core import Core
from ._lifecycle import TRANSITIONS, Event, IllegalTransition, State
from ._message import PutSpec
from ._settings import Backoff, QueueSettings

__all__ = [
    "TRANSITIONS",
    "Backoff",
    "Core",
    "Event",
    "IllegalTransition",
    "PutSpec",
    "QueueSettings",
    "State",
    "__version__",
]
