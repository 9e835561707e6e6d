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
        or not math.isfinite(1.0 / rate)
    ):
        raise ValueError(f"{name} must be a positive number of calls per second, got {rate!r}")
    return float(rate)


# Float sums of intervals drift by ulps; a sleeper that wakes exactly on time must not be sent
# back to sleep for 1e-17 s.
_EPSILON = 1e-9


class RateLimiter:
    """At most ``rate`` call starts per second, evenly spaced, with no burst beyond one call.

    A start is granted only when at least ``1 / rate`` seconds have passed since the previous
    grant, so in any window of ``T`` seconds at most ``rate * T + 1`` calls start, whichever
    threads, event loops or coroutines ask, and however late a sleeper wakes up. Callers that must
    wait are told how long, in arrival order (each waiter counts one interval), sleep, and then ask
    :meth:`settle`; a caller that gives up (cancelled, interrupted) calls :meth:`abandon` so that
    it holds no place in the queue. The limiter never sleeps itself and holds no event-loop state,
    so one instance serves sync code, async code and any number of successive event loops.
    """

    __slots__ = ("_last", "_lock", "_waiting", "interval", "rate")

    def __init__(self, rate: float) -> None:
        self.rate = check_rate("rate_limit", rate)
        self.interval = 1.0 / self.rate
        self._last = -math.inf  # when the latest start was granted
        self._waiting = 0  # callers told to wait that have neither started nor given up
        self._lock = threading.Lock()

    def reserve(self, now: float) -> float:
        """Start now (returns 0) or join the queue and return the seconds to sleep first."""
        with self._lock:
            earliest = self._last + self.interval
            if self._waiting == 0 and now >= earliest - _EPSILON:
                self._last = now
                return 0.0
            self._waiting += 1
            # Those already waiting go first, one interval each.
            return max(earliest - now, 0.0) + (self._waiting - 1) * self.interval or self.interval

    def settle(self, now: float) -> float:
        """After sleeping: start now (returns 0) or return the seconds still to sleep."""
        with self._lock:
            earliest = self._last + self.interval
            if now >= earliest - _EPSILON:
                self._last = now
                self._waiting -= 1
                return 0.0
            return earliest - now

    def abandon(self) -> None:
        """A caller that was told to wait gave up before starting."""
        with self._lock:
            self._waiting -= 1

    async def areserve(self, now: float) -> float:
        """:meth:`reserve` for async drivers (shared limiters may await their store here)."""
        return self.reserve(now)
