"""Shared cache in Redis: redis-py's sync client for sync functions, its asyncio client for async
functions, so an async function never blocks its event loop on Redis I/O.

Entries are plain Redis strings under the opero key
(``"{namespace}:{module}.{qualname}:{digest}"``), written with ``SET ... PX`` so Redis expires them
itself. Connections are pooled per URL (sync) and per URL and event loop (async), shared with the
Redis rate limiter (:mod:`opero._redis`). A dead server costs at most one short timeout per
back-off period: after a connection failure the backend refuses at once, without touching the
network, for 1 s, doubling up to 30 s while the server stays down.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from opero import _redis
from opero._clock import clock
from opero._redis import CONNECT_TIMEOUT, DEFAULT_URL, SOCKET_TIMEOUT, is_redis_url, redact

if TYPE_CHECKING:
    import redis as redis_py

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_URL",
    "SOCKET_TIMEOUT",
    "RedisCache",
    "ServerUnavailable",
    "is_redis_url",
    "redis_cache",
    "resolve_url",
]

# Back-off after a connection failure before the server is tried again.
BACKOFF_MIN = 1.0
BACKOFF_MAX = 30.0
SCAN_COUNT = 1000

_stores: dict[str, RedisCache] = {}
_stores_lock = threading.Lock()


def resolve_url(backend: str) -> str:
    """``backend`` itself when it is a URL, else ``$OPERO_REDIS_URL``, else :data:`DEFAULT_URL`;
    ``ValueError`` naming ``cache_backend`` when the URL is malformed."""
    return _redis.resolve_url(backend, "cache_backend")


class ServerUnavailable(ConnectionError):
    """Raised without network I/O while the back-off after a connection failure lasts."""


class _Breaker:
    """Remembers a connection failure and how long to leave the server alone.

    Races between threads only make one extra attempt or skip one, which is harmless here.
    """

    __slots__ = ("_delay", "_until")

    def __init__(self) -> None:
        self._until = 0.0
        self._delay = 0.0

    def check(self, url: str) -> None:
        if self._until and clock.monotonic() < self._until:
            raise ServerUnavailable(
                f"{redact(url)} failed recently; next attempt in "
                f"{self._until - clock.monotonic():.1f}s"
            )

    def failed(self) -> None:
        self._delay = min(BACKOFF_MAX, self._delay * 2) if self._delay else BACKOFF_MIN
        self._until = clock.monotonic() + self._delay

    def succeeded(self) -> None:
        if self._until:
            self._until = 0.0
            self._delay = 0.0


class RedisCache:
    """A :class:`~opero.CacheBackend` over one Redis URL."""

    def __init__(self, url: str) -> None:
        self._redis = _redis.import_redis(f"cache_backend={redact(url)!r}")
        self.url = url
        self.client: redis_py.Redis = _redis.sync_client(url)
        if self.client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError(
                f"cache_backend={redact(url)!r}: decode_responses must be off, cached values "
                "are bytes"
            )
        self._errors: tuple[type[BaseException], ...] = (
            self._redis.ConnectionError,
            self._redis.TimeoutError,
            OSError,
        )
        self._breaker = _Breaker()

    # --- sync ---------------------------------------------------------------------------------

    def _run(self, method: str, *args: Any, **kwargs: Any) -> Any:
        self._breaker.check(self.url)
        try:
            result = getattr(self.client, method)(*args, **kwargs)
        except self._errors:
            self._breaker.failed()
            raise
        self._breaker.succeeded()
        return result

    def get(self, key: str) -> bytes | None:
        value: bytes | None = self._run("get", key)
        return value

    def set(self, key: str, value: bytes, ttl: float | None) -> None:
        self._run("set", key, value, px=_milliseconds(ttl))

    def delete(self, key: str) -> None:
        self._run("delete", key)

    def clear(self, prefix: str) -> int:
        self._breaker.check(self.url)
        removed = 0
        batch: list[bytes] = []
        try:
            for key in self.client.scan_iter(match=_glob(prefix), count=SCAN_COUNT):
                batch.append(key)
                if len(batch) >= SCAN_COUNT:
                    removed += self.client.unlink(*batch)
                    batch.clear()
            if batch:
                removed += self.client.unlink(*batch)
        except self._errors:
            self._breaker.failed()
            raise
        self._breaker.succeeded()
        return removed

    # --- async --------------------------------------------------------------------------------

    async def _arun(self, method: str, *args: Any, **kwargs: Any) -> Any:
        self._breaker.check(self.url)
        client = await _redis.async_client(self.url)
        try:
            result = await getattr(client, method)(*args, **kwargs)
        except self._errors:
            self._breaker.failed()
            raise
        self._breaker.succeeded()
        return result

    async def aget(self, key: str) -> bytes | None:
        value: bytes | None = await self._arun("get", key)
        return value

    async def aset(self, key: str, value: bytes, ttl: float | None) -> None:
        await self._arun("set", key, value, px=_milliseconds(ttl))

    async def adelete(self, key: str) -> None:
        await self._arun("delete", key)

    async def aclear(self, prefix: str) -> int:
        self._breaker.check(self.url)
        client = await _redis.async_client(self.url)
        removed = 0
        batch: list[bytes] = []
        try:
            async for key in client.scan_iter(match=_glob(prefix), count=SCAN_COUNT):
                batch.append(key)
                if len(batch) >= SCAN_COUNT:
                    removed += await client.unlink(*batch)
                    batch.clear()
            if batch:
                removed += await client.unlink(*batch)
        except self._errors:
            self._breaker.failed()
            raise
        self._breaker.succeeded()
        return removed

    def __repr__(self) -> str:
        return f"RedisCache({redact(self.url)!r})"


def _milliseconds(ttl: float | None) -> int | None:
    if ttl is None:
        return None
    return max(1, round(ttl * 1000))


def _glob(prefix: str) -> str:
    """A SCAN pattern matching keys that start with ``prefix`` literally."""
    special = "\\*?[]"
    return "".join("\\" + c if c in special else c for c in prefix) + "*"


def redis_cache(url: str) -> RedisCache:
    """The process-wide backend for ``url``: functions that share a URL share its connections."""
    with _stores_lock:
        store = _stores.get(url)
        if store is None:
            store = _stores[url] = RedisCache(url)
    return store
