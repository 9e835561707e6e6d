"""Cache-hit latency of each opero store next to the raw store, measured in one run.

memory: @opero(cache=True) next to cachetools.cached (with a lock, as opero is thread-safe).
disk:   @opero(cache_backend="disk") next to diskcache's own Cache.memoize and a bare Cache.get.
redis:  @opero(cache_backend=URL) next to a bare redis-py GET (sync) and redis.asyncio GET (async).

Usage: python bench/bench_cache.py [redis-url]   (default $OPERO_REDIS_URL or 127.0.0.1:6379/0)
"""

from __future__ import annotations

import asyncio
import os
import pickle
import sys
import tempfile
import threading
import time
import timeit
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import cachetools
import diskcache
import redis
import redis.asyncio

from opero import clear_cache, opero

REPEAT = 7


def pair(
    ours: Callable[[], object], peer: Callable[[], object], number: int
) -> tuple[float, float]:
    """Best of REPEAT runs each, in microseconds per call. The two are run alternately so that
    both see the same load on a shared, noisy machine."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(REPEAT):
        for fn, out in zip((ours, peer), times, strict=True):
            out.append(timeit.timeit(fn, number=number) / number * 1e6)
    return min(times[0]), min(times[1])


async def apair(
    ours: Callable[[], Awaitable[object]], peer: Callable[[], Awaitable[object]], number: int
) -> tuple[float, float]:
    """:func:`pair` for coroutines, awaited one after another on the running loop."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(REPEAT):
        for make, out in zip((ours, peer), times, strict=True):
            start = time.perf_counter()
            for _ in range(number):
                await make()
            out.append((time.perf_counter() - start) / number * 1e6)
    return min(times[0]), min(times[1])


def row(name: str, peer_name: str, times: tuple[float, float]) -> None:
    ours, peer = times
    print(f"{name:<28} opero {ours:8.2f} us   {peer_name:<24} {peer:8.2f} us   {ours / peer:5.2f}x")


def plain(x: int, y: str = "a") -> dict[str, Any]:
    return {"x": x, "y": y, "payload": list(range(10))}


async def aplain(x: int, y: str = "a") -> dict[str, Any]:
    return plain(x, y)


def memory() -> None:
    op = opero(cache=True)(plain)
    ct = cachetools.cached(cachetools.LRUCache(maxsize=4096), lock=threading.Lock())(plain)
    op(1), ct(1)
    n = 100_000
    row("memory hit f(1)", "cachetools.cached", pair(lambda: op(1), lambda: ct(1), n))
    row(
        "memory hit f(1, 'a')", "cachetools.cached", pair(lambda: op(1, "a"), lambda: ct(1, "a"), n)
    )
    row(
        "memory hit f(1, y='a')",
        "cachetools.cached",
        pair(lambda: op(1, y="a"), lambda: ct(1, y="a"), n),
    )


def disk(directory: str) -> None:
    op = opero(cache=True, cache_backend="disk", cache_dir=os.path.join(directory, "opero"))(plain)
    aop = opero(cache=True, cache_backend="disk", cache_dir=os.path.join(directory, "opero"))(
        aplain
    )
    store = diskcache.Cache(os.path.join(directory, "diskcache"))
    dc = store.memoize()(plain)
    store.set("bare", pickle.dumps(plain(1), protocol=pickle.HIGHEST_PROTOCOL))
    op(1), dc(1)
    asyncio.run(aop(1))
    n = 10_000
    row("disk hit, sync", "diskcache memoize", pair(lambda: op(1), lambda: dc(1), n))
    row(
        "disk hit, sync",
        "bare Cache.get + loads",
        pair(lambda: op(1), lambda: pickle.loads(store.get("bare")), n),
    )

    async def bare_get() -> object:
        return pickle.loads(await asyncio.to_thread(store.get, "bare"))

    async def compare() -> tuple[float, float]:
        return await apair(lambda: aop(1), bare_get, 1_000)

    row("disk hit, async", "to_thread(get) + loads", asyncio.run(compare()))
    store.close()


def redis_hits(url: str) -> None:
    namespace = f"opero-bench-{uuid.uuid4().hex}"
    op = opero(cache=True, cache_backend=url, cache_namespace=namespace)(plain)
    aop = opero(cache=True, cache_backend=url, cache_namespace=namespace)(aplain)
    client = redis.Redis.from_url(url)
    key = f"{namespace}:bare"
    client.set(key, pickle.dumps(plain(1), protocol=pickle.HIGHEST_PROTOCOL))
    try:
        op(1)
        asyncio.run(aop(1))
        n = 2_000
        bare = pair(lambda: op(1), lambda: pickle.loads(client.get(key)), n)  # type: ignore[arg-type]
        row("redis hit, sync", "redis-py GET + loads", bare)

        async def compare() -> tuple[float, float]:
            aclient = redis.asyncio.Redis.from_url(url)

            async def bare_get() -> object:
                return pickle.loads(await aclient.get(key))  # type: ignore[arg-type]

            try:
                return await apair(lambda: aop(1), bare_get, n)
            finally:
                await aclient.aclose()

        row("redis hit, async", "redis.asyncio GET + loads", asyncio.run(compare()))
    finally:
        clear_cache(namespace, url)
        client.delete(key)
        client.close()


def main() -> None:
    url = (
        sys.argv[1]
        if len(sys.argv) > 1
        else os.environ.get("OPERO_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    print(f"Python {sys.version.split()[0]}, best of {REPEAT} alternating runs, per call\n")
    memory()
    with tempfile.TemporaryDirectory() as directory:
        disk(directory)
    redis_hits(url)


if __name__ == "__main__":
    main()
