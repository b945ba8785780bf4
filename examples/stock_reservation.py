"""Stock reservation: 200 concurrent orders for items in short supply, none oversold.

    python -m examples.stock_reservation      (or: python path/to/examples/stock_reservation.py)

The stock of each item is a queue, ``stock.<item>``, holding one message per unit. An
order is a job on the ``orders`` queue. An order worker takes the units an order asks for
by reserving that many messages of the item's stock queue: all of them, and the order is
confirmed (it acks them: sold, never delivered again), or fewer, and it gives them back
(a nack with no delay) and the order is "sold out". The broker hands each unit to one
consumer at a time, so no unit is sold twice and no item is oversold, however many orders
and workers run at once, with no lock or shared memory between the workers.

Each buyer subscribes to channel ``orders.<order id>`` before placing the order, and the
worker publishes the confirmation or the "sold out" notice there: the buyer hears its own
answer and no one else's. A monitor follows the ``orders`` queue's job events
(``queue.orders.*``), counting the orders acked, and every answer (``orders.*``), to
check that each order was answered once.

The example starts its own in-memory broker and stops it at the end. It exits 0 if no
item was oversold, every unit is accounted for (sold, or still in stock), every buyer got
exactly one answer, and the monitor saw every order acked; 1 otherwise.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sluice import AsyncClient, AsyncJob, AsyncWorker, ChannelMessage, JobEvent

if __package__:  # python -m examples.NAME
    from ._broker import running_broker
else:  # python path/to/examples/NAME.py, from any directory
    from _broker import running_broker  # type: ignore[no-redef]

ORDERS = "orders"
STOCK = {"widget": 40, "gadget": 25, "gizmo": 10, "doohickey": 3}  # units of each item
ORDER_COUNT = 200
BUYER_CONNECTIONS = 20  # the buyers share these, 10 to a connection
WORKERS = 2
HANDLERS_PER_WORKER = 8
ANSWER_TIMEOUT = 30.0  # seconds a buyer waits to hear about its order
CONFIRMED, SOLD_OUT = "confirmed", "sold out"


def stock_queue(item: str) -> str:
    return f"stock.{item}"


def order_of(number: int) -> dict[str, Any]:
    """Order ``number``: which item, and how many units (1 to 3)."""
    items = list(STOCK)
    return {"order": number, "item": items[number % len(items)], "units": 1 + number % 3}


def order_handler(stock: AsyncClient) -> Any:
    """An order worker's handler: take the order's units from stock, or none of them, and
    tell the buyer on its channel."""

    async def handle(job: AsyncJob) -> dict[str, Any]:
        order = json.loads(job.body)
        wanted, queue = order["units"], stock_queue(order["item"])
        units = await stock.reserve(queue, max_messages=wanted)  # no wait: none left is none
        if len(units) == wanted:
            await stock.ack(units)  # sold: these units are never delivered again
            answer = {"outcome": CONFIRMED, "units": sorted(unit.id for unit in units)}
        else:
            if units:
                await stock.nack(units, delay=0)  # not enough: back on the shelf at once
            answer = {"outcome": SOLD_OUT}
        await stock.publish(f"orders.{order['order']}", json.dumps(answer).encode())
        return answer

    return handle


@dataclass
class Tally:
    """What the buyers heard, and what the monitor saw."""

    answers: dict[int, dict[str, Any]] = field(default_factory=dict)  # order -> answer
    unanswered: list[int] = field(default_factory=list)
    acked_events: int = 0
    seen_answers: Counter[str] = field(default_factory=Counter)  # channel -> answers seen

    def sold(self, item: str) -> int:
        """Units of ``item`` the buyers were told they got."""
        return sum(
            len(answer["units"])
            for number, answer in self.answers.items()
            if answer["outcome"] == CONFIRMED and order_of(number)["item"] == item
        )

    def units_sold_twice(self) -> list[int]:
        told = Counter(
            unit
            for answer in self.answers.values()
            if answer["outcome"] == CONFIRMED
            for unit in answer["units"]
        )
        return sorted(unit for unit, times in told.items() if times > 1)


async def place(connection: AsyncClient, number: int, tally: Tally) -> None:
    """One buyer: listen on its order's channel, place the order, wait for the answer."""
    async with connection.subscribe(f"orders.{number}") as answers:
        await connection.put(ORDERS, json.dumps(order_of(number)).encode())
        try:
            first = await asyncio.wait_for(anext(answers), ANSWER_TIMEOUT)
        except TimeoutError:
            tally.unanswered.append(number)
            return
        assert isinstance(first, ChannelMessage)
        tally.answers[number] = json.loads(first.data)


async def monitor(client: AsyncClient, tally: Tally, ready: asyncio.Event) -> None:
    """Count the orders acked (the ``orders`` queue's job events) and the answers sent,
    until there are as many of each as orders."""
    async with client.subscribe(f"queue.{ORDERS}.*", "orders.*") as events:
        ready.set()
        async for event in events:
            if isinstance(event, JobEvent) and event.event == "acked":
                tally.acked_events += 1
            elif isinstance(event, ChannelMessage):
                tally.seen_answers[event.channel] += 1
            if tally.acked_events == sum(tally.seen_answers.values()) == ORDER_COUNT:
                return


async def run_shop(host: str, port: int) -> tuple[Tally, list[str], float]:
    """Stock the shelves, let every buyer order at once, check the broker's records."""
    url = f"sluice://{host}:{port}"
    tally = Tally()
    async with AsyncClient(host, port) as admin, AsyncClient(host, port) as watcher:
        for item, units in STOCK.items():
            # A unit given back (not enough for an order) must never run out of attempts.
            await admin.configure(stock_queue(item), max_attempts=None)
            await admin.put_many(stock_queue(item), [item] * units)
        watching = asyncio.Event()
        monitoring = asyncio.create_task(monitor(watcher, tally, watching))
        await watching.wait()
        stock_clients = [AsyncClient(host, port) for _ in range(WORKERS)]
        workers = [
            AsyncWorker(ORDERS, order_handler(stock), url=url, concurrency=HANDLERS_PER_WORKER)
            for stock in stock_clients
        ]
        running = [asyncio.create_task(worker.run()) for worker in workers]
        connections = [AsyncClient(host, port) for _ in range(BUYER_CONNECTIONS)]
        started = time.monotonic()
        try:
            await asyncio.gather(
                *(place(connections[n % BUYER_CONNECTIONS], n, tally) for n in range(ORDER_COUNT))
            )
            await asyncio.wait_for(monitoring, ANSWER_TIMEOUT)
        finally:
            took = time.monotonic() - started
            monitoring.cancel()
            for worker in workers:
                worker.stop()
            await asyncio.gather(*running)
            await asyncio.gather(*(c.close() for c in [*connections, *stock_clients]))
        problems = await broker_agrees(admin, tally)
    return tally, problems, took


async def broker_agrees(admin: AsyncClient, tally: Tally) -> list[str]:
    """Problems found in the broker's counts: each item's units are sold or on the shelf."""
    problems = []
    for item, units in STOCK.items():
        stats = await admin.stats(stock_queue(item))
        sold, left = stats["totals"]["acked"], stats["ready"]
        if sold != tally.sold(item) or sold + left != units or stats["reserved"]:
            problems.append(f"{item}: {units} in stock, buyers told {tally.sold(item)}: {stats}")
    # Every order done: its queue holds nothing (so the broker has forgotten it).
    left = [q for q in await admin.queues() if q["name"] == ORDERS]
    if left and (left[0]["ready"] or left[0]["reserved"] or left[0]["dead"]):
        problems.append(f"orders not done: {left[0]}")
    return problems


def report(tally: Tally, problems: list[str], took: float) -> bool:
    """Print what happened; True if the sale went right."""
    confirmed = [a for a in tally.answers.values() if a["outcome"] == CONFIRMED]
    oversold = [item for item, units in STOCK.items() if tally.sold(item) > units]
    twice = tally.units_sold_twice()
    answered_twice = sorted(c for c, times in tally.seen_answers.items() if times > 1)
    print(f"{ORDER_COUNT} orders at once for {sum(STOCK.values())} units of {len(STOCK)} items:")
    for item, units in STOCK.items():
        print(f"  {item:<10} {tally.sold(item):>3} of {units:>3} units sold")
    for problem in problems:
        print(f"  PROBLEM: {problem}")
    for channel in answered_twice:
        print(f"  PROBLEM: {channel} was answered {tally.seen_answers[channel]} times")
    print(
        f"summary: {ORDER_COUNT} orders, {len(confirmed)} confirmed, "
        f"{len(tally.answers) - len(confirmed)} sold out, {len(tally.unanswered)} unanswered, "
        f"{len(oversold)} items oversold, {len(twice)} units sold twice, "
        f"{tally.acked_events} acked events ({took:.1f} s)"
    )
    return (
        len(tally.answers) == ORDER_COUNT
        and not tally.unanswered
        and len(tally.seen_answers) == ORDER_COUNT
        and not answered_twice
        and not oversold
        and not twice
        and tally.acked_events == ORDER_COUNT
        and not problems
    )


def main() -> int:
    with running_broker() as (host, port):
        tally, problems, took = asyncio.run(run_shop(host, port))
    return 0 if report(tally, problems, took) else 1


if __name__ == "__main__":
    sys.exit(main())
