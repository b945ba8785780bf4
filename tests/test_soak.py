"""Soak: many producers and consumers on one real broker for tens of thousands of messages,
with nacks, delays, priorities and leases left to expire. Marked slow: `make slow` runs it
alone; `make test` runs it too.

The invariant is exactly-once acknowledgement: every confirmed put is acked successfully
exactly once, no matter how often it was redelivered, and the broker ends empty.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from client import AsyncClient
from client.errors import LeaseLost
from tests.conftest import BrokerProcess

MESSAGES = 30_000
PRODUCERS = 8
CONSUMERS = 16
QUEUES = ["soak.a", "soak.b", "soak.c"]


async def produce(client: AsyncClient, seed: int, count: int, put_ids: list[int]) -> None:
    rng = random.Random(seed)
    sent = 0
    while sent < count:
        batch = min(rng.choice([1, 10, 50]), count - sent)
        queue = rng.choice(QUEUES)
        delay = 0.05 if rng.random() < 0.1 else 0
        ids = await client.put_many(
            queue,
            [b"m" * rng.randint(1, 200) for _ in range(batch)],
            priority=rng.randint(-2, 2),
            delay=delay,
        )
        put_ids.extend(ids)
        sent += batch


async def consume(
    client: AsyncClient, seed: int, acked: list[int], done: asyncio.Event
) -> Counter[str]:
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    while not done.is_set():
        queues = rng.sample(QUEUES, rng.randint(1, 3))
        messages = await client.reserve(
            queues, max_messages=rng.choice([1, 5, 20]), wait=0.2, visibility_timeout=0.5
        )
        keep = []
        for message in messages:
            roll = rng.random()
            if roll < 0.05:
                try:
                    await client.nack(message, delay=rng.choice([0, 0.02]), error="soak nack")
                    outcomes["nacked"] += 1
                except LeaseLost:
                    # Its 0.5 s lease ran out first (this consumer's earlier nacks each
                    # waited for a commit): nothing changed, and it comes back, as a
                    # forgotten one does.
                    outcomes["late nacks"] += 1
            elif roll < 0.06:
                outcomes["forgotten"] += 1  # its lease will expire and it comes back
            else:
                keep.append(message)
        if keep:
            try:
                await client.ack(keep)
                acked.extend(message.id for message in keep)
            except LeaseLost as error:
                failed = set(error.details["failed"])
                acked.extend(message.id for message in keep if message.id not in failed)
                outcomes["late acks"] += len(failed)
    return outcomes


@pytest.mark.slow
def test_soak_every_confirmed_put_is_acked_exactly_once(broker: BrokerProcess) -> None:
    async def scenario() -> tuple[list[int], list[int], Counter[str]]:
        for queue in QUEUES:
            async with broker.async_client() as admin:
                await admin.configure(queue, max_attempts=None)
        put_ids: list[int] = []
        acked: list[int] = []
        done = asyncio.Event()
        producers = [broker.async_client() for _ in range(PRODUCERS)]
        consumers = [broker.async_client() for _ in range(CONSUMERS)]
        consuming = [
            asyncio.create_task(consume(client, 1000 + index, acked, done))
            for index, client in enumerate(consumers)
        ]
        await asyncio.gather(
            *(
                produce(client, index, MESSAGES // PRODUCERS, put_ids)
                for index, client in enumerate(producers)
            )
        )
        async with broker.async_client() as observer:
            for _ in range(600):  # bounded: at most ~120 s of 0.2 s long-polls
                if len(acked) >= len(put_ids):
                    break
                await observer.reserve("soak.never", wait=0.2)  # a paced wait, not a sleep
        done.set()
        outcomes = sum((await asyncio.gather(*consuming)), Counter())
        for client in producers + consumers:
            await client.close()
        return put_ids, acked, outcomes

    put_ids, acked, outcomes = asyncio.run(asyncio.wait_for(scenario(), 300))
    assert len(put_ids) == MESSAGES == len(set(put_ids))
    duplicates = [i for i, n in Counter(acked).items() if n > 1]
    assert duplicates == []
    assert sorted(acked) == sorted(put_ids)
    # The run really exercised redelivery paths.
    assert outcomes["nacked"] > 0 and outcomes["forgotten"] > 0
    with broker.client() as client:
        for queue in QUEUES:
            stats = client.stats(queue)
            assert (stats["ready"], stats["delayed"], stats["reserved"], stats["dead"]) == (
                0,
                0,
                0,
                0,
            )
        totals = [client.stats(queue)["totals"] for queue in QUEUES]
    assert sum(t["put"] for t in totals) == MESSAGES
    assert sum(t["acked"] for t in totals) == MESSAGES
    assert sum(t["expired"] for t in totals) >= outcomes["forgotten"]
