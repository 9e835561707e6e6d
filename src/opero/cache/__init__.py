"""Cache stores, one module each, chosen by name or passed as an object.

``"memory"`` (in-process), ``"disk"`` (:mod:`opero.cache.disk`), ``"redis"`` or a
``"redis://host:port/db"`` URL (:mod:`opero.cache.redis`), or any object implementing
:class:`opero.CacheBackend`. The persistent stores import their extra on first use and raise
:class:`opero.errors.MissingExtraError` naming it when it is not installed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from opero.cache.memory import MemoryCache, clear_all
from opero.cache.serializers import get_serializer
from opero.core.cache import CacheBackend, CacheLayer, KeyBuilder, namespace_prefix

__all__ = ["BACKENDS", "clear_cache", "get_backend", "make_layer"]

BACKENDS = ("memory", "disk", "redis")


def get_backend(backend: object, cache_dir: str | os.PathLike[str] | None = None) -> CacheBackend:
    """The store a ``cache_backend=`` value names (not ``"memory"``, which keeps objects)."""
    if backend == "disk":
        from opero.cache.disk import disk_cache  # noqa: PLC0415 - needs the disk extra

        return disk_cache(cache_dir)
    if cache_dir is not None:
        raise ValueError("cache_dir= applies only to cache_backend='disk'")
    if isinstance(backend, str):
        from opero.cache.redis import redis_cache, resolve_url  # noqa: PLC0415

        # Any "scheme://" goes to resolve_url, which names an unknown scheme without the password.
        if backend == "redis" or "://" in backend:
            return redis_cache(resolve_url(backend))
        raise ValueError(
            f"cache_backend={backend!r} is not available: choose one of {', '.join(BACKENDS)}, "
            "a redis:// URL, or pass an object implementing opero.CacheBackend"
        )
    if isinstance(backend, type):
        # ValueError like every other impossible option value, so callers catch one type
        raise ValueError(  # noqa: TRY004
            f"cache_backend takes an instance, not the class {backend.__qualname__}"
        )
    if isinstance(backend, CacheBackend):
        return backend
    missing = [name for name in _METHODS if not callable(getattr(backend, name, None))]
    raise ValueError(
        f"cache_backend must be a backend name, a redis:// URL or an object implementing "
        f"opero.CacheBackend, got {backend!r} (missing: {', '.join(missing)})"
    )


_METHODS = ("get", "set", "delete", "clear", "aget", "aset", "adelete", "aclear")


def make_layer(
    func: Callable[..., Any],
    *,
    backend: object,
    namespace: str,
    ttl: float | None,
    key_fn: Callable[..., object] | None,
    maxsize: int,
    cache_dir: str | os.PathLike[str] | None,
    serializer: str,
    is_async: bool,
) -> CacheLayer:
    """The cache layer of one decorated function."""
    del is_async  # every store serves both worlds; the engine picks the sync or async methods
    serializer_obj = get_serializer(serializer)
    # The memory store is this function's own, so its keys need no function fingerprint.
    key = KeyBuilder(func, namespace, key_fn, fingerprint=backend != "memory")
    if backend == "memory":
        if cache_dir is not None:
            raise ValueError("cache_dir= applies only to cache_backend='disk'")
        if serializer != "pickle":
            raise ValueError(
                "cache_serializer= applies only to stores outside the process; the memory "
                "cache keeps the objects themselves"
            )
        return CacheLayer(MemoryCache(maxsize), key, namespace, ttl, None)
    return CacheLayer(get_backend(backend, cache_dir), key, namespace, ttl, serializer_obj)


def clear_cache(
    namespace: str = "opero",
    cache_backend: object = "memory",
    cache_dir: str | os.PathLike[str] | None = None,
) -> int:
    """Remove every entry of ``namespace`` from ``cache_backend`` (for ``"disk"``, the one in
    ``cache_dir``, default as for ``@opero``); return how many were removed.

    Redis entries are found with ``SCAN`` on the namespace's key prefix, never ``KEYS`` or
    ``FLUSHDB``, so other data in the database is untouched.
    """
    prefix = namespace_prefix(namespace)
    if cache_backend == "memory":
        return clear_all(prefix)
    return get_backend(cache_backend, cache_dir).clear(prefix)
