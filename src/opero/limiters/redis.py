"""A rate limit shared by every process and host that talks to one Redis.

Each call asks Redis for the next free start slot of the limit, in one Lua script that the server
runs atomically ("next free slot", the GCRA with a burst of one): the script reads Redis's own
clock, hands out the slot and moves the limit's next slot ``1 / rate`` seconds on. So however many
processes on however many hosts share the key, starts are spaced evenly and no window of ``T``
seconds holds more than ``rate * T + 1`` of them, whatever the hosts' clocks say. The key expires
by itself once its slot is in the past.

When Redis cannot be reached, ``on_error="local"`` limits each process on its own (one WARNING per
outage) and ``on_error="raise"`` raises :class:`~opero.errors.RateLimitUnavailableError`. Either way
the connection is retried only after a short back-off, so a dead Redis costs at most one connect
timeout now and then, not one per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import math
import os
import threading
from collections.abc import AsyncGenerator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from opero._log import logger
from opero.core.ratelimit import RateLimiter, check_rate
from opero.errors import MissingExtraError, RateLimitUnavailableError

try:
    import redis
    import redis.asyncio as aredis
    from redis.asyncio.retry import Retry as AsyncRetry
    from redis.backoff import NoBackoff
    from redis.connection import parse_url
    from redis.exceptions import NoScriptError, RedisError
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - exercised with redis hidden from sys.modules
    raise MissingExtraError("rate_limit_backend='redis'", "redis", "redis") from exc

__all__ = ["DEFAULT_URL", "KEY_PREFIX", "RedisRateLimiter", "resolve_url"]

DEFAULT_URL = "redis://localhost:6379/0"
# Not "opero:": clear_cache() of the default cache namespace removes every key under "opero:".
KEY_PREFIX = "opero-ratelimit:"

# Short on purpose: a limiter that waits seconds for a dead store delays every call it guards.
# A ``?socket_timeout=`` / ``?socket_connect_timeout=`` in the URL overrides them (redis-py rule).
CONNECT_TIMEOUT = 0.25
SOCKET_TIMEOUT = 0.5
# After a failure the connection is retried after FIRST_RETRY seconds, doubling up to MAX_RETRY.
FIRST_RETRY = 0.5
MAX_RETRY = 4.0

# KEYS[1] the limit's key, ARGV[1] the interval between starts in microseconds. Returns the
# microseconds until the caller's slot. TIME is Redis's clock, so hosts' clocks never matter;
# string.format keeps the 16-digit microsecond count exact (tostring would round it to 14 digits).
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local slot = tonumber(redis.call('GET', KEYS[1])) or now
if slot < now then slot = now end
local free = slot + tonumber(ARGV[1])
redis.call('SET', KEYS[1], string.format('%d', free), 'PX', math.ceil((free - now) / 1000))
return slot - now
"""
_SHA = hashlib.sha1(_SCRIPT.encode(), usedforsecurity=False).hexdigest()


def resolve_url(backend: str) -> str:
    """The Redis URL for ``rate_limit_backend``: a URL as given, else ``OPERO_REDIS_URL``, else
    ``redis://localhost:6379/0``. Raises ``ValueError`` naming the option for a malformed URL."""
    source, url = "rate_limit_backend", backend
    if backend == "redis":
        source, url = "OPERO_REDIS_URL", os.environ.get("OPERO_REDIS_URL") or DEFAULT_URL
    try:
        parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ValueError(f"{source}={redact(url)!r} is not a Redis URL: {exc}") from None
    return url


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


# ---------------------------------------------------------------------------------------------
# clients: one pooled client per URL per process (sync), and per URL per event loop (async,
# because an asyncio connection belongs to the loop that opened it)

_CLIENT_OPTIONS: dict[str, Any] = {
    "socket_connect_timeout": CONNECT_TIMEOUT,
    "socket_timeout": SOCKET_TIMEOUT,
}
_clients_lock = threading.Lock()
_clients: dict[str, redis.Redis] = {}
# A plain dict: each entry's connections refer to their loop, so weak keys would never be freed.
_aclients: dict[
    asyncio.AbstractEventLoop, tuple[dict[str, aredis.Redis], AsyncGenerator[None, None]]
] = {}


def _client(url: str) -> redis.Redis:
    client = _clients.get(url)
    if client is None:
        with _clients_lock:
            client = _clients.get(url)
            if client is None:
                # No redis-py retries: the limiter has its own back-off and must fail fast.
                client = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **_CLIENT_OPTIONS)
                _clients[url] = client
    return client


async def _aclient(url: str) -> aredis.Redis:
    loop = asyncio.get_running_loop()
    entry = _aclients.get(loop)
    if entry is None:
        clients: dict[str, aredis.Redis] = {}
        closer = _close_at_loop_shutdown(loop, clients)
        # Started here, the generator is tracked by the loop, whose shutdown_asyncgens() (run by
        # asyncio.run and every asyncio.Runner) finalises it: the clients are closed while their
        # loop still runs, instead of warning "unclosed Connection" when collected later.
        await closer.__anext__()
        with _clients_lock:
            # A loop closed without shutdown_asyncgens() never ran its closer: forget it here.
            for old in [old for old in _aclients if old.is_closed()]:
                del _aclients[old]
            entry = _aclients[loop] = (clients, closer)
    clients = entry[0]
    client = clients.get(url)
    if client is None:
        client = aredis.Redis.from_url(url, retry=AsyncRetry(NoBackoff(), 0), **_CLIENT_OPTIONS)
        clients[url] = client
    return client


async def _close_at_loop_shutdown(
    loop: asyncio.AbstractEventLoop, clients: dict[str, aredis.Redis]
) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        with _clients_lock:
            _aclients.pop(loop, None)
        for client in clients.values():
            with contextlib.suppress(RedisError):
                await client.aclose()


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
        try:
            client = _client(self.url)
            try:
                wait_us = client.evalsha(_SHA, 1, self._redis_key, self._interval_us)
            except NoScriptError:  # first use on this server, or after SCRIPT FLUSH / a restart
                wait_us = client.eval(_SCRIPT, 1, self._redis_key, self._interval_us)
        except RedisError as exc:
            return self._failed(now, exc)
        if self._retry_at is not None:
            self._recovered()
        return int(wait_us) / 1_000_000

    async def areserve(self, now: float) -> float:
        """:meth:`reserve` for async drivers, through redis-py's asyncio client."""
        if not self._may_try(now):
            return self._unavailable(now)
        try:
            client = await _aclient(self.url)
            try:
                wait_us = await client.evalsha(_SHA, 1, self._redis_key, self._interval_us)
            except NoScriptError:
                wait_us = await client.eval(_SCRIPT, 1, self._redis_key, self._interval_us)
        except RedisError as exc:
            return self._failed(now, exc)
        if self._retry_at is not None:
            self._recovered()
        return int(wait_us) / 1_000_000

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
