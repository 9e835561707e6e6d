"""Helpers for testing code that uses opero without waiting for real.

>>> from opero.testing import fake_time
>>> with fake_time() as t:
...     slow_function_with_retries()   # backoff waits return at once
...     t.slept                        # the waits that were asked for, in seconds
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

from opero._clock import clock

__all__ = ["FakeTime", "fake_time"]


class FakeTime:
    """A clock that moves only when opero sleeps. ``slept`` lists every wait in order."""

    def __init__(self, start: float | None = None) -> None:
        # Starting from the real clock keeps limiters and cache entries made before the block
        # consistent with the fake time inside it.
        self.now = time.monotonic() if start is None else start
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward (for TTL expiry and rate-limit tests)."""
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    async def asleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)  # still a real suspension point, so cancellation is honoured


@contextmanager
def fake_time(start: float | None = None) -> Iterator[FakeTime]:
    """Replace opero's clock and sleeps with a :class:`FakeTime` inside the ``with`` block."""
    fake = FakeTime(start)
    saved = (clock.monotonic, clock.sleep, clock.asleep)
    clock.monotonic, clock.sleep, clock.asleep = fake.monotonic, fake.sleep, fake.asleep
    try:
        yield fake
    finally:
        clock.monotonic, clock.sleep, clock.asleep = saved
