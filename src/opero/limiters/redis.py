"""A rate limit shared by every process and host that talks to one Redis.

Each call asks Redis for the next free start slot of the limit, in one Lua script that the server
runs atomically ("next free slot", the GCRA with a burst of one): the script reads Redis's own
clock, hands out the slot and moves the limit's next slot ``1 / rate`` seconds on. So however many
processes on however many hosts share the key, starts are spaced evenly and no window of ``T``
seconds holds more than ``rate * T + 1`` of them, whatever the hosts' clocks say. The key expires
by itself once its slot is in the past. A stored slot further ahead than any queue of callers
explains (written against another clock, or by something else) is reset, with one WARNING.

When Redis cannot be reached, ``on_error="local"`` limits each process on its own (one WARNING per
outage) and ``on_error="raise"`` raises :class:`~opero.errors.RateLimitUnavailableError`. Either way
the connection is retried only after a short back-off, so a dead Redis costs at most one connect
timeout now and then, not one per call.
"""

from __future__ import annotations

import contextvars
import hashlib
import math
import threading
from typing import TYPE_CHECKING

from opero import _redis
from opero._log import logger
from opero._redis import DEFAULT_URL, redact
from opero.core.ratelimit import RateLimiter, check_rate
from opero.errors import RateLimitUnavailableError

if TYPE_CHECKING:
    from redis.exceptions import NoScriptError, RedisError
else:
    _exceptions = _redis.import_redis("rate_limit_backend='redis'").exceptions
    NoScriptError, RedisError = _exceptions.NoScriptError, _exceptions.RedisError

__all__ = ["DEFAULT_URL", "KEY_PREFIX", "RedisRateLimiter", "redact", "resolve_url"]

# Not "opero:": clear_cache() of the default cache namespace removes every key under "opero:".
KEY_PREFIX = "opero-ratelimit:"

# After a failure the connection is retried after FIRST_RETRY seconds, doubling up to MAX_RETRY.
# (The connections' timeouts are opero._redis.CONNECT_TIMEOUT and SOCKET_TIMEOUT.)
FIRST_RETRY = 0.5
MAX_RETRY = 4.0

# How far ahead of Redis's clock a stored next slot may be before it is taken for a stale or
# foreign value: each waiting caller pushes the slot one interval on, so a slot further ahead than
# any plausible queue of callers was written against another clock (a failover to a server whose
# clock is behind, a clock step back) or by something else. Without this check every caller would
# sleep until that far-off slot, silently.
MAX_LEAD = 60.0  # seconds
MAX_LEAD_INTERVALS = 1000

# KEYS[1] the limit's key, ARGV[1] the interval between starts in microseconds, ARGV[2] the largest
# believable lead of the stored slot over now (µs). Returns the microseconds until the caller's
# slot, or, when the stored slot was not believable and was reset (the caller then starts now),
# minus how far ahead it was (capped to stay an exact integer). One integer, not a pair: redis-py's
# parser takes measurably longer over an array reply. TIME is Redis's clock, so hosts' clocks
# never matter; string.format keeps the 16-digit microsecond count exact (tostring would round it
# to 14 digits). "slot ~= slot" is NaN, which tonumber accepts ("nan").
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local slot = tonumber(redis.call('GET', KEYS[1]))
if slot == nil or slot ~= slot or slot < now then slot = now end
local stale = slot - now > tonumber(ARGV[2])
if stale then
  stale = math.min(slot - now, 2 ^ 52)
  slot = now
end
local free = slot + tonumber(ARGV[1])
redis.call('SET', KEYS[1], string.format('%d', free), 'PX', math.ceil((free - now) / 1000))
if stale then return -stale end
return slot - now
"""
_SHA = hashlib.sha1(_SCRIPT.encode(), usedforsecurity=False).hexdigest()


def resolve_url(backend: str) -> str:
    """The Redis URL for ``rate_limit_backend``: a URL as given, else ``OPERO_REDIS_URL``, else
    ``redis://localhost:6379/0``. Raises ``ValueError`` naming the option for a malformed URL."""
    return _redis.resolve_url(backend, "rate_limit_backend")


# ---------------------------------------------------------------------------------------------


# The limiter whose per-process fallback queue the current thread or task waits in, if any.
_LOCAL_WAITER: contextvars.ContextVar[RedisRateLimiter | None] = contextvars.ContextVar(
    "opero_local_waiter", default=None
)


class RedisRateLimiter:
    """At most ``rate`` call starts per second across every process that shares ``key`` in Redis.

    Starts are evenly spaced with no burst beyond one call: in any window of ``T`` seconds at most
    ``rate * T + 1`` calls start, counted across all processes and hosts (give or take the network
    latency between Redis and each caller). :meth:`reserve` uses redis-py's sync client and
    :meth:`areserve` its asyncio client; neither sleeps, the engine does.

    ``on_error`` says what happens while Redis is unreachable: ``"local"`` limits each process to
    ``rate`` on its own (logging one WARNING per outage), ``"raise"`` raises
    :class:`~opero.errors.RateLimitUnavailableError`. The connection is retried after a back-off
    that starts at 0.5 s and doubles up to 4 s; the first success brings the shared limit back.
    """

    __slots__ = (
        "_backoff",
        "_error",
        "_interval_us",
        "_local",
        "_lock",
        "_max_lead_us",
        "_redis_key",
        "_retry_at",
        "key",
        "on_error",
        "rate",
        "url",
    )

    def __init__(self, rate: float, url: str, key: str, on_error: str = "local") -> None:
        self.rate = check_rate("rate_limit", rate)
        if on_error not in ("local", "raise"):
            raise ValueError(f"rate_limit_on_error must be 'local' or 'raise', got {on_error!r}")
        self.url = url
        self.key = key
        self.on_error = on_error
        self._redis_key = KEY_PREFIX + key
        # Rounded up, so rounding never lets the shared rate exceed ``rate``.
        self._interval_us = max(1, math.ceil(1_000_000 / self.rate))
        self._max_lead_us = max(round(MAX_LEAD * 1e6), MAX_LEAD_INTERVALS * self._interval_us)
        self._local = RateLimiter(self.rate)
        self._lock = threading.Lock()
        self._retry_at: float | None = None  # set while Redis is unreachable
        self._backoff = 0.0
        self._error: BaseException | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rate={self.rate!r}, url={redact(self.url)!r}, "
            f"key={self.key!r}, on_error={self.on_error!r})"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.rate, self.url, self.key, self.on_error))

    def reserve(self, now: float) -> float:
        """Claim the next shared start slot; return the seconds to wait until it (0 when free)."""
        if not self._may_try(now):
            return self._unavailable(now)
        args = (1, self._redis_key, self._interval_us, self._max_lead_us)
        try:
            client = _redis.sync_client(self.url)
            try:
                reply = client.evalsha(_SHA, *args)
            except NoScriptError:  # first use on this server, or after SCRIPT FLUSH / a restart
                reply = client.eval(_SCRIPT, *args)
        except RedisError as exc:
            return self._failed(now, exc)
        return self._granted(reply)

    async def areserve(self, now: float) -> float:
        """:meth:`reserve` for async drivers, through redis-py's asyncio client."""
        if not self._may_try(now):
            return self._unavailable(now)
        args = (1, self._redis_key, self._interval_us, self._max_lead_us)
        try:
            client = await _redis.async_client(self.url)
            try:
                reply = await client.evalsha(_SHA, *args)
            except NoScriptError:
                reply = await client.eval(_SCRIPT, *args)
        except RedisError as exc:
            return self._failed(now, exc)
        return self._granted(reply)

    def _granted(self, reply: int) -> float:
        if self._retry_at is not None:
            self._recovered()
        if reply < 0:
            logger.warning(
                "rate limit %r: the next free slot stored in Redis at %s was %.0f s ahead of "
                "Redis's clock, more than any queue of callers explains (a clock change on a "
                "failover, or another writer to %r?); it was reset so calls do not wait for it",
                self.key,
                redact(self.url),
                -reply / 1e6,
                self._redis_key,
            )
            return 0.0
        return reply / 1_000_000

    # -- while Redis is unreachable ------------------------------------------------------------

    def _may_try(self, now: float) -> bool:
        if self._retry_at is None:
            return True
        with self._lock:
            if self._retry_at is None:
                return True
            if now < self._retry_at:
                return False
            # This caller probes Redis; the others keep the fallback until it has answered.
            self._retry_at = now + self._backoff
            return True

    def _failed(self, now: float, exc: RedisError) -> float:
        with self._lock:
            first = self._retry_at is None
            self._backoff = FIRST_RETRY if first else min(self._backoff * 2, MAX_RETRY)
            self._retry_at = now + self._backoff
            self._error = exc
        if first and self.on_error == "local":
            logger.warning(
                "rate limit %r: Redis at %s is unreachable (%s: %s); limiting this process alone "
                "to %g calls/s until it is back",
                self.key,
                redact(self.url),
                type(exc).__name__,
                exc,
                self.rate,
            )
        return self._unavailable(now)

    def settle(self, now: float) -> float:
        """After sleeping: Redis slots are exact, so start now, unless the wait came from the
        per-process fallback limiter, which then decides."""
        if _LOCAL_WAITER.get() is not self:
            return 0.0
        wait = self._local.settle(now)
        if wait == 0.0:
            _LOCAL_WAITER.set(None)
        return wait

    def abandon(self) -> None:
        """A caller that was told to wait gave up; only the fallback limiter keeps a queue."""
        if _LOCAL_WAITER.get() is self:
            _LOCAL_WAITER.set(None)
            self._local.abandon()

    def _unavailable(self, now: float) -> float:
        if self.on_error == "raise":
            error = self._error
            raise RateLimitUnavailableError(
                f"rate limit {self.key!r}: Redis at {redact(self.url)} is unreachable "
                f"({type(error).__name__}: {error}); rate_limit_on_error='raise'"
            ) from error
        wait = self._local.reserve(now)
        if wait > 0:
            _LOCAL_WAITER.set(self)  # this caller now waits in the local queue (see settle)
        return wait

    def _recovered(self) -> None:
        with self._lock:
            if self._retry_at is None:
                return
            self._retry_at = None
            self._error = None
        if self.on_error == "local":
            logger.info(
                "rate limit %r: Redis at %s is reachable again; the shared limit applies",
                self.key,
                redact(self.url),
            )
