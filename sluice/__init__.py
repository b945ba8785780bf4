"""Sluice's Python API: the clients, the worker runtime, deliveries and the errors.

    from sluice import Client

    with Client() as broker:                      # sluice://127.0.0.1:7700
        broker.put("emails", b"welcome #42", priority=5)
        for message in broker.reserve("emails", wait=5):
            print(message.body)
            broker.ack(message)

This package is a facade over ``client`` (where the code lives): import from here.
``sluice.errors`` has one exception class per wire error code.
"""

from client import (
    AsyncClient,
    AsyncSubscription,
    AsyncWorker,
    ChannelMessage,
    Client,
    Fail,
    Gap,
    JobEvent,
    Message,
    Retry,
    Subscription,
    Worker,
    tls_context,
)
from client._calls import MessageId
from client._worker_job import AsyncJob, Job

from . import errors

__all__ = [
    "AsyncClient",
    "AsyncJob",
    "AsyncSubscription",
    "AsyncWorker",
    "ChannelMessage",
    "Gap",
    "JobEvent",
    "Client",
    "Fail",
    "Job",
    "Message",
    "MessageId",
    "Retry",
    "Subscription",
    "Worker",
    "errors",
    "tls_context",
]
