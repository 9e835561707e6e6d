"""Persistent cache in a directory: diskcache's SQLite-backed ``Cache``.

Safe for several threads and processes on one directory at once (SQLite in WAL mode, one
connection per thread). Values are the serialised bytes; diskcache stores small ones in the database
and large ones as files next to it. Expiry is diskcache's own (wall-clock) ``expire``.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opero.errors import MissingExtraError

if TYPE_CHECKING:
    import diskcache

__all__ = ["DiskCache", "default_directory", "disk_cache"]

# Seconds SQLite waits for a lock held by another process before the operation fails (and the
# call runs uncached); diskcache's own default of 60 s would stall the call instead.
LOCK_TIMEOUT = 1.0

_stores: dict[str, DiskCache] = {}
_stores_lock = threading.Lock()


def _import_diskcache() -> Any:
    try:
        import diskcache  # noqa: PLC0415 - optional extra, imported on first use
    except ImportError as exc:
        raise MissingExtraError("cache_backend='disk'", "disk", exc.name or "diskcache") from exc
    return diskcache


def default_directory() -> Path:
    """``$OPERO_CACHE_DIR``, else the platform's user cache directory plus ``opero``."""
    env = os.environ.get("OPERO_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs  # noqa: PLC0415 - optional extra
    except ImportError as exc:
        raise MissingExtraError("cache_backend='disk'", "disk", exc.name or "platformdirs") from exc
    return Path(platformdirs.user_cache_dir("opero", appauthor=False))


class DiskCache:
    """A :class:`~opero.CacheBackend` over one directory.

    The store is opened on first use, not when decorating, so an unwritable or corrupt directory
    makes calls run uncached (one warning) instead of failing the import; it is opened again on
    later calls until that works.
    """

    __slots__ = ("_cache", "_diskcache", "_lock", "directory")

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self._diskcache = _import_diskcache()
        self.directory = Path(directory).expanduser().absolute()
        self._cache: diskcache.Cache | None = None
        self._lock = threading.Lock()

    def _store(self) -> diskcache.Cache:
        cache = self._cache
        if cache is None:
            with self._lock:
                if self._cache is None:
                    self._cache = self._diskcache.Cache(str(self.directory), timeout=LOCK_TIMEOUT)
                cache = self._cache
        return cache

    def get(self, key: str) -> bytes | None:
        value = self._store().get(key, default=None, retry=False)
        if value is None or isinstance(value, bytes):
            return value
        return b""  # written by someone else, not by opero: undecodable, so a miss

    def set(self, key: str, value: bytes, ttl: float | None) -> None:
        self._store().set(key, value, expire=ttl, retry=False)

    def delete(self, key: str) -> None:
        self._store().delete(key, retry=False)

    def clear(self, prefix: str) -> int:
        cache = self._store()
        doomed = [k for k in cache.iterkeys() if isinstance(k, str) and k.startswith(prefix)]
        return sum(bool(cache.delete(k, retry=False)) for k in doomed)

    # SQLite calls block, and waiting on another process's lock can take up to LOCK_TIMEOUT: the
    # async twins run them in a worker thread so the event loop never waits on the disk.
    async def aget(self, key: str) -> bytes | None:
        return await asyncio.to_thread(self.get, key)

    async def aset(self, key: str, value: bytes, ttl: float | None) -> None:
        await asyncio.to_thread(self.set, key, value, ttl)

    async def adelete(self, key: str) -> None:
        await asyncio.to_thread(self.delete, key)

    async def aclear(self, prefix: str) -> int:
        return await asyncio.to_thread(self.clear, prefix)

    def close(self) -> None:
        """Close this thread's database connection (it reopens on next use)."""
        with self._lock:
            cache, self._cache = self._cache, None
        if cache is not None:
            cache.close()

    def __repr__(self) -> str:
        return f"DiskCache({str(self.directory)!r})"


def disk_cache(directory: str | os.PathLike[str] | None = None) -> DiskCache:
    """The process-wide store for ``directory`` (default :func:`default_directory`): functions
    that share a directory share one store and its connections."""
    path = Path(directory).expanduser() if directory is not None else default_directory()
    name = str(path.absolute())
    with _stores_lock:
        store = _stores.get(name)
        if store is None:
            store = _stores[name] = DiskCache(name)
    return store
