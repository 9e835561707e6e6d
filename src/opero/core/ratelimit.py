"""Rate limit policy: evenly spaced starts, decided under a lock, slept by the caller's driver."""

from __future__ import annotations

import math
import threading


def check_rate(name: str, rate: object) -> float:
    """Validate a calls-per-second option and return it as a float."""
    if (
        isinstance(rate, bool)
        or not isinstance(rate, int | float)
        or not math.isfinite(rate)
        or rate <= 0
    ):
        raise ValueError(f"{name} must be a positive number of calls per second, got {rate!r}")
    return float(rate)


class RateLimiter:
    """At most ``rate`` call starts per second, evenly spaced, with no burst beyond one call.

    :meth:`reserve` hands out start slots ``1 / rate`` seconds apart in arrival order and returns
    how long the caller must wait for its slot. So in any window of ``T`` seconds at most
    ``rate * T + 1`` calls start, whichever threads, event loops or coroutines ask. The limiter
    never sleeps itself and holds no event-loop state, so one instance serves sync code, async
    code and any number of successive event loops.
    """

    __slots__ = ("_lock", "_next", "interval", "rate")

    def __init__(self, rate: float) -> None:
        self.rate = check_rate("rate_limit", rate)
        self.interval = 1.0 / self.rate
        self._next = -math.inf
        self._lock = threading.Lock()

    def reserve(self, now: float) -> float:
        """Claim the next start slot; return the seconds to wait until it (0 when free now)."""
        with self._lock:
            slot = self._next if self._next > now else now
            self._next = slot + self.interval
        return slot - now

    async def areserve(self, now: float) -> float:
        """:meth:`reserve` for async drivers (shared limiters may await their store here)."""
        return self.reserve(now)
