"""The one seam for time: every clock read and every sleep in opero goes through :data:`clock`.

Tests (opero's and users') swap it for a fake with :func:`opero.testing.fake_time` so that
backoff and rate limits run without real waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class Clock:
    """Monotonic time and the two ways to wait for it."""

    __slots__ = ("asleep", "monotonic", "sleep")

    def __init__(
        self,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        asleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.monotonic = monotonic
        self.sleep = sleep
        self.asleep = asleep


clock = Clock()
