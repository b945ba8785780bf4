"""Seat holds that expire: an unpaid hold runs out and its seat goes back on sale.

    python -m examples.seat_hold      (or: python path/to/examples/seat_hold.py)

A hold is a delayed message in the ``holds`` queue: its body names the seat, its delay is
the hold time and its dedup key is the seat, so a second hold on a held seat adds nothing
(the put returns the existing hold's id with ``.duplicate`` True). Paying cancels the hold
message; ``cancel`` succeeds only while the hold is still waiting, so a payment and an
expiry can never both win. A hold nobody pays for comes due, and a release worker (an
``AsyncWorker`` on ``holds``) puts the seat back on sale and acks the hold with the seat
as its result, which the box office reads with ``result(id, wait=...)``. The queue's
``dedup_window`` is 0, so a seat can be held again as soon as its hold has ended.

The example starts its own in-memory broker, prints the story and exits 0 if every step
came out as it should; 1 otherwise.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from sluice import AsyncClient, AsyncJob, AsyncWorker

if __package__:  # python -m examples.NAME
    from ._broker import running_broker
else:  # python path/to/examples/NAME.py, from any directory
    from _broker import running_broker  # type: ignore[no-redef]

HOLDS = "holds"
HOLD_SECONDS = 1.0  # short for the demo; minutes in real life
PAYER_HOLD_SECONDS = 30.0  # holds of buyers who pay at once (they never run out here)
RESULT_WAIT = 10.0  # seconds the box office waits for a release


class BoxOffice:
    """Seats for sale and sold, and the holds on them (kept by the broker)."""

    def __init__(self, client: AsyncClient, seats: list[str]) -> None:
        self.client = client
        self.for_sale = set(seats)
        self.sold: dict[str, str] = {}  # seat -> buyer
        self.released: list[str] = []
        self.story: list[str] = []
        self.mistakes: list[str] = []

    def tell(self, line: str) -> None:
        print(line)
        self.story.append(line)

    def expect(self, what: str, happened: bool) -> None:
        if not happened:
            self.mistakes.append(what)
            print(f"  WRONG: {what}")

    async def hold(self, buyer: str, seat: str, seconds: float = HOLD_SECONDS) -> int | None:
        """Hold ``seat`` for ``buyer``; the hold's id, or None if it is already held."""
        if seat not in self.for_sale:
            self.tell(f"{buyer} cannot hold {seat}: it is sold")
            return None
        hold_id = await self.client.put(HOLDS, f"{seat} {buyer}", delay=seconds, key=seat)
        if hold_id.duplicate:
            self.tell(f"{buyer} cannot hold {seat}: it is held already (hold {hold_id})")
            return None
        self.tell(f"{buyer} holds {seat} for {seconds:g} s (hold {hold_id})")
        return hold_id

    async def pay(self, buyer: str, seat: str, hold_id: int) -> bool:
        """Sell ``seat`` if its hold is still waiting; False if it already ran out."""
        if not await self.client.cancel(hold_id):
            self.tell(f"{buyer} pays for {seat} too late: the hold ran out, no sale")
            return False
        self.for_sale.discard(seat)
        self.sold[seat] = buyer
        self.tell(f"{buyer} pays: {seat} is sold to {buyer}")
        return True

    def release_handler(self) -> Any:
        """The release worker's handler: a hold that came due puts its seat back on sale."""

        async def release(job: AsyncJob) -> str:
            seat, buyer = job.body.decode().split(" ", 1)
            self.released.append(seat)
            self.tell(f"  (release worker: {buyer}'s hold on {seat} ran out; it can be held again)")
            return seat

        return release


async def story(office: BoxOffice) -> None:
    """The demo: one buyer pays in time, one is turned away, one lets the hold run out."""
    alice = await office.hold("alice", "A1", PAYER_HOLD_SECONDS)
    office.expect("alice gets her hold", alice is not None)
    bob = await office.hold("bob", "A1")
    office.expect("bob cannot hold a seat alice holds", bob is None)
    carol = await office.hold("carol", "B2")
    office.expect("carol gets her hold", carol is not None)
    if alice is not None:
        office.expect("alice's payment goes through", await office.pay("alice", "A1", alice))
    office.expect("nobody can hold a sold seat", await office.hold("bob", "A1") is None)
    if carol is None:
        return
    status = await office.client.status(carol)
    office.tell(f"carol does not pay; her hold is {status['state']} until its due time")
    released = await office.client.result(carol, wait=RESULT_WAIT)  # the release worker's ack
    office.expect("carol's hold is released by the worker", released == "B2")
    paid_late = await office.pay("carol", "B2", carol)
    office.expect("carol cannot pay after her hold ran out", not paid_late)
    dave = await office.hold("dave", "B2", PAYER_HOLD_SECONDS)
    office.expect("dave can hold the released seat", dave is not None)
    if dave is not None:
        office.expect("dave's payment goes through", await office.pay("dave", "B2", dave))


async def run(host: str, port: int) -> BoxOffice:
    async with AsyncClient(host, port) as client:
        await client.configure(HOLDS, dedup_window=0)
        office = BoxOffice(client, ["A1", "A2", "B1", "B2"])
        url = f"sluice://{host}:{port}"
        worker = AsyncWorker(HOLDS, office.release_handler(), url=url, poll_wait=0.2)
        running = asyncio.create_task(worker.run())
        try:
            await story(office)
        finally:
            worker.stop()
            await running
    return office


def main() -> int:
    with running_broker() as (host, port):
        office = asyncio.run(run(host, port))
    expected_sold = {"A1": "alice", "B2": "dave"}
    office.expect(f"sold exactly {expected_sold}", office.sold == expected_sold)
    office.expect("only B2 was released", office.released == ["B2"])
    sales = ", ".join(f"{seat} to {buyer}" for seat, buyer in office.sold.items())
    print(
        f"summary: sold {len(office.sold)} ({sales}), released {len(office.released)}, "
        f"{len(office.mistakes)} wrong"
    )
    return 1 if office.mistakes else 0


if __name__ == "__main__":
    sys.exit(main())
