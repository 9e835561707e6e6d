"""Success-path overhead of @opero next to tenacity and backoff, and a memory-cache hit next to
cachetools, measured in one run. Usage: python bench/bench_core.py"""

from __future__ import annotations

import asyncio
import threading
import timeit

import backoff
import cachetools
import tenacity

from opero import opero

N = 200_000
REPEAT = 7


def best(fn: object, number: int = N) -> float:
    """Best of REPEAT runs, in microseconds per call."""
    return min(timeit.repeat(fn, number=number, repeat=REPEAT)) / number * 1e6  # type: ignore[arg-type]


def plain(x: int) -> int:
    return x


op_retry = opero(retries=3, retry_on=ConnectionError)(plain)
ten_retry = tenacity.retry(
    stop=tenacity.stop_after_attempt(4),
    retry=tenacity.retry_if_exception_type(ConnectionError),
    wait=tenacity.wait_exponential(),
)(plain)
bo_retry = backoff.on_exception(backoff.expo, ConnectionError, max_tries=4)(plain)

op_cache = opero(cache=True, cache_ttl=3600)(plain)
ct_cache = cachetools.cached(cachetools.TTLCache(maxsize=4096, ttl=3600), lock=threading.Lock())(
    plain
)


async def aplain(x: int) -> int:
    return x


aop_retry = opero(retries=3, retry_on=ConnectionError)(aplain)
aten_retry = tenacity.retry(
    stop=tenacity.stop_after_attempt(4),
    retry=tenacity.retry_if_exception_type(ConnectionError),
    wait=tenacity.wait_exponential(),
)(aplain)
abo_retry = backoff.on_exception(backoff.expo, ConnectionError, max_tries=4)(aplain)
aop_cache = opero(cache=True, cache_ttl=3600)(aplain)


async def async_loop(fn: object, n: int) -> None:
    for _ in range(n):
        await fn(1)  # type: ignore[operator]


def best_async(fn: object, n: int = N // 4) -> float:
    loop = asyncio.new_event_loop()
    try:
        times = [
            timeit.timeit(lambda: loop.run_until_complete(async_loop(fn, n)), number=1)
            for _ in range(REPEAT)
        ]
    finally:
        loop.close()
    return min(times) / n * 1e6


def main() -> None:
    bare = best(lambda: plain(1))
    rows = [
        ("sync retry: opero", best(lambda: op_retry(1)) - bare),
        ("sync retry: tenacity", best(lambda: ten_retry(1)) - bare),
        ("sync retry: backoff", best(lambda: bo_retry(1)) - bare),
    ]
    abare = best_async(aplain)
    arows = [
        ("async retry: opero", best_async(aop_retry) - abare),
        ("async retry: tenacity", best_async(aten_retry) - abare),
        ("async retry: backoff", best_async(abo_retry) - abare),
    ]
    op_cache(1)
    ct_cache(1)
    crows = [
        ("memory cache hit: opero", best(lambda: op_cache(1))),
        ("memory cache hit: cachetools TTLCache+lock", best(lambda: ct_cache(1))),
    ]
    print(f"bare sync call {bare:.3f} us, bare async call {abare:.3f} us (subtracted below)")
    print(f"{'case':45s} {'us/call':>9s} {'vs opero':>9s}")
    for group in (rows, arows, crows):
        ref = group[0][1]
        for name, us in group:
            print(f"{name:45s} {us:9.3f} {us / ref:8.1f}x")


if __name__ == "__main__":
    main()
