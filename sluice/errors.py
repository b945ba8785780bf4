"""The errors a Sluice call can raise: one class per wire error code, all ``SluiceError``
(see ``client.errors``, where they are defined)."""

from client.errors import *  # noqa: F403 - this module is the public name of that one
from client.errors import __all__ as __all__
