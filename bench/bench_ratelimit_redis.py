"""Cost of one acquire of the Redis rate limiter next to a bare redis-py round trip (PING, GET),
sync and async, measured in one run against the local Redis. Usage:

    python bench/bench_ratelimit_redis.py [redis://127.0.0.1:6379/0]

The limit's rate is set so high that no acquire ever waits: what is timed is the round trip to Redis
and the script it runs, not a sleep.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

import redis
import redis.asyncio as aredis

from opero import opero
from opero.core.ratelimit import RateLimiter
from opero.limiters.redis import KEY_PREFIX, RedisRateLimiter

URL = sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/0"
N = 250  # calls per block
ROUNDS = 40  # blocks per case, the cases interleaved block by block against drift
RATE = 1e6  # one slot per microsecond: a round trip is far longer, so nothing ever waits
KEY = f"opero-bench-{uuid.uuid4().hex}"


def per_call_sync(fn: Callable[[], object]) -> float:
    """One block of N calls, in microseconds per call."""
    start = time.perf_counter()
    for _ in range(N):
        fn()
    return (time.perf_counter() - start) / N * 1e6


async def per_call_async(fn: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    for _ in range(N):
        await fn()
    return (time.perf_counter() - start) / N * 1e6


def main() -> None:
    client = redis.Redis.from_url(URL)
    client.set(KEY + "-get", b"x")
    noop = client.register_script("return 0")
    limiter = RedisRateLimiter(RATE, URL, KEY)
    local = RateLimiter(RATE)

    @opero(rate_limit=RATE, rate_limit_backend=URL, rate_limit_key=KEY)
    def limited() -> None:
        pass

    sync_cases: dict[str, Callable[[], object]] = {
        "redis-py PING": client.ping,
        "redis-py GET": lambda: client.get(KEY + "-get"),
        "redis-py EVALSHA 'return 0'": noop,
        "RedisRateLimiter.reserve": lambda: limiter.reserve(0.0),
        "@opero(rate_limit_backend=redis) call": limited,
        "local RateLimiter.reserve": lambda: local.reserve(time.monotonic()),
    }

    async def run_async() -> dict[str, list[float]]:
        aclient = aredis.Redis.from_url(URL)
        anoop = aclient.register_script("return 0")

        @opero(rate_limit=RATE, rate_limit_backend=URL, rate_limit_key=KEY)
        async def alimited() -> None:
            pass

        cases: dict[str, Callable[[], Awaitable[object]]] = {
            "redis.asyncio PING": aclient.ping,
            "redis.asyncio GET": lambda: aclient.get(KEY + "-get"),
            "redis.asyncio EVALSHA 'return 0'": anoop,
            "RedisRateLimiter.areserve": lambda: limiter.areserve(0.0),
            "async @opero(rate_limit_backend=redis) call": alimited,
        }
        for fn in cases.values():  # connect and load the script outside the timing
            await fn()
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(ROUNDS):
            for name, fn in cases.items():
                times[name].append(await per_call_async(fn))
        await aclient.aclose()
        return times

    for fn in sync_cases.values():
        fn()
    sync_times: dict[str, list[float]] = {name: [] for name in sync_cases}
    for _ in range(ROUNDS):
        for name, fn in sync_cases.items():
            sync_times[name].append(per_call_sync(fn))
    async_times = asyncio.run(run_async())
    client.delete(KEY + "-get", KEY_PREFIX + KEY)
    client.close()

    print(f"Redis {URL}: median of {ROUNDS} blocks of {N} calls, us per call")
    for title, times, peer in (
        ("sync", sync_times, "redis-py PING"),
        ("async", async_times, "redis.asyncio PING"),
    ):
        base = statistics.median(times[peer])
        print(f"\n{title:<46} {'us/call':>8} {'x PING':>7}")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"{name:<46} {median:8.1f} {median / base:7.2f}")


if __name__ == "__main__":
    main()
