"""Shared cache in Redis: redis-py's sync client for sync functions, its asyncio client for async
functions, so an async function never blocks its event loop on Redis I/O.

Entries are plain Redis strings under the opero key
(``"{namespace}:{module}.{qualname}:{digest}"``), written with ``SET ... PX`` so Redis expires them
itself. Connections are pooled per URL (sync) and per URL and event loop (async). A dead server
costs at most one short timeout per back-off period: after a connection failure the backend
refuses at once, without touching the network, for 1 s, doubling up to 30 s while the server stays
down.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from opero._clock import clock
from opero.errors import MissingExtraError

if TYPE_CHECKING:
    import redis as redis_py
    import redis.asyncio as redis_asyncio

__all__ = ["DEFAULT_URL", "RedisCache", "ServerUnavailable", "redis_cache", "resolve_url"]

DEFAULT_URL = "redis://localhost:6379/0"

# Timeouts (seconds) unless the URL sets its own (?socket_timeout=...&socket_connect_timeout=...).
CONNECT_TIMEOUT = 0.5
SOCKET_TIMEOUT = 1.0
# Back-off after a connection failure before the server is tried again.
BACKOFF_MIN = 1.0
BACKOFF_MAX = 30.0
SCAN_COUNT = 1000

_stores: dict[str, RedisCache] = {}
_stores_lock = threading.Lock()


def _import_redis() -> Any:
    try:
        import redis  # noqa: PLC0415 - optional extra, imported on first use
        import redis.asyncio  # noqa: PLC0415
    except ImportError as exc:
        raise MissingExtraError("cache_backend='redis'", "redis", exc.name or "redis") from exc
    return redis


def resolve_url(backend: str) -> str:
    """``backend`` itself when it is a URL, else ``$OPERO_REDIS_URL``, else :data:`DEFAULT_URL`."""
    if backend != "redis":
        return backend
    return os.environ.get("OPERO_REDIS_URL") or DEFAULT_URL


def is_redis_url(backend: object) -> bool:
    return isinstance(backend, str) and backend.startswith(("redis://", "rediss://", "unix://"))


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
                f"{_redact(url)} failed recently; next attempt in "
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
        self._redis = _import_redis()
        self.url = url
        self._options: dict[str, Any] = {
            "socket_connect_timeout": CONNECT_TIMEOUT,
            "socket_timeout": SOCKET_TIMEOUT,
            # No retries inside redis-py: the breaker decides when to try again, and a miss is
            # cheaper than a caller stalled by a retry loop against a dead server.
            "retry": None,
        }
        self.client: redis_py.Redis = self._redis.Redis.from_url(url, **self._options)
        if self.client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError(
                f"cache_backend={_redact(url)!r}: decode_responses must be off, cached values "
                "are bytes"
            )
        self._errors: tuple[type[BaseException], ...] = (
            self._redis.ConnectionError,
            self._redis.TimeoutError,
            OSError,
        )
        self._breaker = _Breaker()
        # One asyncio client per event loop: asyncio connections belong to the loop that opened
        # them. Each is closed when its loop shuts down (see _close_with_loop).
        self._aclients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[redis_asyncio.Redis, AsyncIterator[None]]
        ] = weakref.WeakKeyDictionary()

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

    async def _aclient(self) -> redis_asyncio.Redis:
        loop = asyncio.get_running_loop()
        entry = self._aclients.get(loop)
        if entry is None:
            client = self._redis.asyncio.Redis.from_url(self.url, **self._options)
            closer = _close_with_loop(client, self._aclients, loop)
            await closer.__anext__()
            entry = self._aclients[loop] = (client, closer)
        return entry[0]

    async def _arun(self, method: str, *args: Any, **kwargs: Any) -> Any:
        self._breaker.check(self.url)
        client = await self._aclient()
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
        client = await self._aclient()
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

    def close(self) -> None:
        """Close the sync client's pooled connections (they reopen on next use)."""
        self.client.close()

    def __repr__(self) -> str:
        return f"RedisCache({_redact(self.url)!r})"


async def _close_with_loop(
    client: redis_asyncio.Redis,
    registry: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any],
    loop: asyncio.AbstractEventLoop,
) -> AsyncIterator[None]:
    # An async generator that is started and then left suspended: the loop finalises it in
    # shutdown_asyncgens() (asyncio.run and asyncio.Runner call it before closing the loop), which
    # is the one hook asyncio offers for "this loop is about to close".
    try:
        yield
    finally:
        registry.pop(loop, None)
        # aclose() arrived in redis-py 5.0.1; close() is its older name
        close = getattr(client, "aclose", None) or client.close
        await close()


def _milliseconds(ttl: float | None) -> int | None:
    if ttl is None:
        return None
    return max(1, round(ttl * 1000))


def _glob(prefix: str) -> str:
    """A SCAN pattern matching keys that start with ``prefix`` literally."""
    special = "\\*?[]"
    return "".join("\\" + c if c in special else c for c in prefix) + "*"


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        creds, _, host = rest.rpartition("@")
        user = creds.split(":", 1)[0]
        rest = f"{user}:***@{host}" if ":" in creds else f"{user}@{host}"
    return f"{scheme}{sep}{rest}"


def redis_cache(url: str) -> RedisCache:
    """The process-wide backend for ``url``: functions that share a URL share its connections."""
    with _stores_lock:
        store = _stores.get(url)
        if store is None:
            store = _stores[url] = RedisCache(url)
    return store
