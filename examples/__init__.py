"""Runnable examples: each starts its own broker, tells a story and checks its outcome.

python -m examples.ticket_booking   # 500 buyers, 100 seats, exactly 100 sold
python -m examples.seat_hold        # an unpaid hold expires and its seat is released
"""
