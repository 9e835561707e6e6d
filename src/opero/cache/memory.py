"""In-process cache: a bounded LRU with optional per-entry expiry, shared by threads and loops."""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

from opero._clock import clock
from opero.core.cache import MISSING

_stores: weakref.WeakSet[MemoryCache] = weakref.WeakSet()
_stores_lock = threading.Lock()


class MemoryCache:
    """Keeps results as objects (no serialisation), at most ``maxsize`` of them, least recently
    used evicted first. Expiry reads the clock only for entries that have a TTL."""

    __slots__ = ("__weakref__", "_data", "_lock", "maxsize")

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict[str, tuple[object, float | None]] = OrderedDict()
        self._lock = threading.Lock()
        with _stores_lock:
            _stores.add(self)

    def get(self, key: str) -> object:
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                return MISSING
            if entry[1] is not None and entry[1] <= clock.monotonic():
                del self._data[key]
                return MISSING
            self._data.move_to_end(key)
            return entry[0]

    def set(self, key: str, value: object, ttl: float | None) -> None:
        deadline = None if ttl is None else clock.monotonic() + ttl
        with self._lock:
            self._data[key] = (value, deadline)
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def delete(self, key: str) -> None:
        with self._lock:
            self._data.pop(key, None)

    def clear(self, prefix: str) -> int:
        with self._lock:
            doomed = [k for k in self._data if k.startswith(prefix)]
            for k in doomed:
                del self._data[k]
        return len(doomed)

    def __len__(self) -> int:
        return len(self._data)


def clear_all(prefix: str) -> int:
    """Remove entries starting with ``prefix`` from every memory cache in this process."""
    with _stores_lock:
        stores = list(_stores)
    return sum(store.clear(prefix) for store in stores)
