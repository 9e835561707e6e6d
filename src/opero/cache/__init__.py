"""Cache stores, one module each, chosen by name (``"memory"``) or passed as an object."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from opero.cache.memory import MemoryCache, clear_all
from opero.core.cache import CacheBackend, CacheLayer, KeyBuilder

BACKENDS = ("memory",)


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
    del cache_dir, is_async  # used by the persistent stores
    key = KeyBuilder(func, namespace, key_fn)
    if backend == "memory":
        return CacheLayer(MemoryCache(maxsize), key, namespace, ttl, None)
    if isinstance(backend, str):
        raise ValueError(
            f"cache_backend={backend!r} is not available: choose one of {', '.join(BACKENDS)} "
            "or pass an object implementing opero.CacheBackend"
        )
    if isinstance(backend, CacheBackend):
        return CacheLayer(backend, key, namespace, ttl, _serializer(serializer))
    raise ValueError(
        f"cache_backend must be a backend name or an object implementing CacheBackend, "
        f"got {backend!r}"
    )


def _serializer(name: str) -> Any:
    import pickle  # noqa: PLC0415

    if name != "pickle":
        raise ValueError(f"cache_serializer must be 'pickle', got {name!r}")
    return pickle


def clear_cache(namespace: str = "opero", cache_backend: object = "memory") -> int:
    """Remove every entry of ``namespace`` from ``cache_backend``; return how many were removed."""
    prefix = f"{namespace}:"
    if cache_backend == "memory":
        return clear_all(prefix)
    if isinstance(cache_backend, CacheBackend):
        return cache_backend.clear(prefix)
    raise ValueError(f"cache_backend={cache_backend!r} is not available")
