"""Sluice client library: ``Client`` (blocking) and ``AsyncClient`` (asyncio) with the same
methods, ``Message`` for deliveries, and ``client.errors`` with one class per wire code.

    from client import Client

    with Client("127.0.0.1", 7700) as sluice:
        sluice.put("emails", b"welcome #42", priority=5)
        for message in sluice.reserve("emails", wait=5):
            print(message.body)
            sluice.ack(message)
"""

from . import errors
from ._async import AsyncClient, AsyncSubscription
from ._channels import ChannelMessage, Gap, JobEvent
from ._common import tls_context
from ._message import Message
from ._sync import Client, Subscription
from ._worker_async import AsyncWorker
from ._worker_job import Fail, Retry
from ._worker_sync import Worker

__all__ = [
    "AsyncClient",
    "AsyncSubscription",
    "AsyncWorker",
    "ChannelMessage",
    "Gap",
    "JobEvent",
    "Client",
    "Fail",
    "Message",
    "Retry",
    "Subscription",
    "Worker",
    "errors",
    "tls_context",
]
