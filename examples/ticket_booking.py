"""Ticket booking over the queue: 500 buyers race for 100 seats and exactly 100 are sold.

    python -m examples.ticket_booking      (or: python path/to/examples/ticket_booking.py)

Each buyer sends one booking request with ``put_and_wait`` (request/response over the
queue) and waits for its answer: a seat, or "sold out". The seats themselves are messages
in a ``seats`` queue, one per seat. A booking worker sells a seat by reserving one and
acking it, with the buyer's name as the ack's result. The broker hands a message to one
consumer at a time and never delivers an acked message again, so no seat is sold twice,
however many workers run and without any lock or memory shared between them. The buyer's
name is the request's dedup key: a buyer who asks twice is still one request.

The example starts its own in-memory broker and stops it at the end. It exits 0 if exactly
100 seats were sold, each to one buyer, and every buyer got an answer; 1 otherwise.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sluice import AsyncClient, AsyncJob, AsyncWorker
from sluice.errors import JobFailed, Timeout

if __package__:  # python -m examples.NAME
    from ._broker import running_broker
else:  # python path/to/examples/NAME.py, from any directory
    from _broker import running_broker  # type: ignore[no-redef]

BOOKINGS = "bookings"  # booking requests from buyers
SEATS = "seats"  # one message per unsold seat
ROWS = "ABCDEFGHIJ"
SEATS_PER_ROW = 10  # 10 rows of 10: 100 seats
BUYERS = 500
BUYER_CONNECTIONS = 25  # the buyers share these, 20 to a connection
WORKERS = 2
HANDLERS_PER_WORKER = 8
ANSWER_TIMEOUT = 30.0  # seconds a buyer waits for an answer
SOLD, SOLD_OUT = "sold", "sold out"

Handler = Callable[[AsyncJob], Awaitable[dict[str, Any]]]


def seat_names() -> list[str]:
    return [f"{row}{number}" for row in ROWS for number in range(1, SEATS_PER_ROW + 1)]


def booking_handler(seats: AsyncClient) -> Handler:
    """A booking worker's handler: sell the buyer in ``job.body`` a seat, if one is left."""

    async def book(job: AsyncJob) -> dict[str, Any]:
        buyer = job.body.decode()
        offered = await seats.reserve(SEATS)  # no wait: none ready means none left
        if not offered:
            return {"outcome": SOLD_OUT}
        (seat,) = offered
        await seats.ack(seat, result=buyer)  # sold: this seat is never delivered again
        return {"outcome": SOLD, "seat": seat.body.decode(), "seat_id": seat.id}

    return book


@dataclass
class Tally:
    """What the buyers heard."""

    seats: dict[str, str] = field(default_factory=dict)  # buyer -> seat
    seat_ids: dict[str, int] = field(default_factory=dict)  # seat -> its message id
    sold_out: int = 0
    unanswered: list[str] = field(default_factory=list)

    def note(self, buyer: str, answer: dict[str, Any] | None) -> None:
        if answer is None:
            self.unanswered.append(buyer)
        elif answer["outcome"] == SOLD:
            self.seats[buyer] = answer["seat"]
            self.seat_ids[answer["seat"]] = answer["seat_id"]
        else:
            self.sold_out += 1

    def seats_sold_twice(self) -> list[str]:
        return sorted(seat for seat, buyers in Counter(self.seats.values()).items() if buyers > 1)


async def buy(connection: AsyncClient, buyer: str) -> dict[str, Any] | None:
    """One buyer's request; None if it got no answer."""
    try:
        answer: dict[str, Any] = await connection.put_and_wait(
            BOOKINGS, buyer, timeout=ANSWER_TIMEOUT, key=buyer
        )
    except (JobFailed, Timeout) as error:
        print(f"{buyer}: no answer: {error}", file=sys.stderr)
        return None
    return answer


async def buyers_race(host: str, port: int) -> Tally:
    """Every buyer asks at once; returns what they heard."""
    connections = [AsyncClient(host, port) for _ in range(BUYER_CONNECTIONS)]
    names = [f"buyer-{number:03d}" for number in range(BUYERS)]
    try:
        answers = await asyncio.gather(
            *(buy(connections[n % BUYER_CONNECTIONS], name) for n, name in enumerate(names))
        )
    finally:
        await asyncio.gather(*(connection.close() for connection in connections))
    tally = Tally()
    for name, answer in zip(names, answers, strict=True):
        tally.note(name, answer)
    return tally


async def broker_agrees(admin: AsyncClient, tally: Tally) -> list[str]:
    """Problems found by asking the broker: every seat gone, each sold to its buyer."""
    problems = []
    if any(queue["name"] == SEATS for queue in await admin.queues()):  # emptied: forgotten
        problems.append(f"the seats queue still holds seats: {await admin.stats(SEATS)}")
    for buyer, seat in tally.seats.items():
        recorded = await admin.result(tally.seat_ids[seat])
        if recorded != buyer:
            problems.append(f"seat {seat} was told to {buyer} but recorded for {recorded}")
    return problems


async def run_box_office(host: str, port: int) -> tuple[Tally, list[str], float]:
    """Open the sale, let the buyers race, close it. Returns the tally, the problems the
    broker's records show, and how long the race took."""
    url = f"sluice://{host}:{port}"
    async with AsyncClient(host, port) as admin:
        await admin.put_many(SEATS, seat_names())
        seat_clients = [AsyncClient(host, port) for _ in range(WORKERS)]
        workers = [
            AsyncWorker(
                BOOKINGS,
                booking_handler(seats),
                url=url,
                concurrency=HANDLERS_PER_WORKER,
                poll_wait=0.2,
            )
            for seats in seat_clients
        ]
        running = [asyncio.create_task(worker.run()) for worker in workers]
        started = time.monotonic()
        try:
            tally = await buyers_race(host, port)
        finally:
            took = time.monotonic() - started
            for worker in workers:
                worker.stop()
            await asyncio.gather(*running)
            await asyncio.gather(*(seats.close() for seats in seat_clients))
        problems = await broker_agrees(admin, tally)
    return tally, problems, took


def report(tally: Tally, problems: list[str], took: float) -> bool:
    """Print what happened; True if the sale went right."""
    total = len(seat_names())
    twice = tally.seats_sold_twice()
    first_sales = sorted(tally.seats.items(), key=lambda sale: tally.seat_ids[sale[1]])[:3]
    print(f"{BUYERS} buyers raced for {total} seats through {WORKERS} booking workers:")
    print(f"  sold:       {len(tally.seats)}")
    print(f"  sold out:   {tally.sold_out}")
    print(f"  unanswered: {len(tally.unanswered)}")
    print("  first seats: " + ", ".join(f"{seat} to {buyer}" for buyer, seat in first_sales))
    for problem in problems:
        print(f"  PROBLEM: {problem}")
    print(
        f"summary: {len(tally.seats)} sold, {tally.sold_out} sold out, "
        f"{len(tally.unanswered)} unanswered, {len(twice)} seats sold twice ({took:.1f} s)"
    )
    return (
        len(tally.seats) == total
        and tally.sold_out == BUYERS - total
        and not tally.unanswered
        and not twice
        and not problems
    )


def main() -> int:
    with running_broker() as (host, port):
        tally, problems, took = asyncio.run(run_box_office(host, port))
    return 0 if report(tally, problems, took) else 1


if __name__ == "__main__":
    sys.exit(main())
