"""@opmap against the standard library, side by side in one run.

    python bench/bench_opmap.py

Each figure is the best of several runs (the machine is shared and noisy); ratios are
opero / peer, so below 1.0 means opero is faster.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

from opero import opmap
from opero.concurrency.process import default_context

N = 10_000
REPEAT = 5


def trivial(x: int) -> int:
    return x + 1


def cpu_10ms(x: int) -> int:
    end = time.perf_counter() + 0.01
    n = 0
    while time.perf_counter() < end:
        n += 1
    return x


async def sleep_10ms(x: int) -> int:
    await asyncio.sleep(0.01)
    return x


def best(fn: Callable[[], Any], repeat: int = REPEAT) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def once(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 0.01 else f"{seconds * 1000:.0f} ms"


def row(name: str, ours: float, peer: float, peer_name: str) -> str:
    return f"| {name} | {ms(ours)} | {peer_name}: {ms(peer)} | {ours / peer:.2f}x |"


def first_call(side: str) -> float:
    """One process-mode map of N trivial items in this fresh interpreter, pool start included."""
    items = list(range(N))
    ctx = default_context()
    start = time.perf_counter()
    if side == "peer":
        with ProcessPoolExecutor(2, mp_context=ctx) as pool:
            list(pool.map(trivial, items, chunksize=N // (4 * 2)))
    else:
        f = opmap(mode="process", workers=2)(trivial)
        f(items)
        f.close()
    return time.perf_counter() - start


def fresh(side: str) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--first", side],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout)


def main() -> None:
    items = list(range(N))
    rows = ["| scenario | @opmap | peer | ratio |", "|---|---|---|---|"]

    # thread mode, trivial items
    f_thread = opmap(mode="thread", workers=4)(trivial)
    f_thread(items)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(trivial, items))
        peer = best(lambda: list(pool.map(trivial, items)))
    ours = best(lambda: f_thread(items))
    rows.append(
        row(f"thread, {N:,} trivial items, 4 workers", ours, peer, "ThreadPoolExecutor.map")
    )
    f_thread.close()

    # process mode, trivial items; both pools use the same start method
    ctx = default_context()
    chunksize = N // (4 * 2)
    peer_first = min(fresh("peer") for _ in range(3))
    ours_first = min(fresh("opero") for _ in range(3))
    with ProcessPoolExecutor(2, mp_context=ctx) as pool:
        list(pool.map(trivial, items, chunksize=chunksize))
        peer = best(lambda: list(pool.map(trivial, items, chunksize=chunksize)))
    f_proc = opmap(mode="process", workers=2)(trivial)
    f_proc(items)
    ours = best(lambda: f_proc(items))
    rows.append(
        row(
            f"process, {N:,} trivial items, 2 workers, first call in a fresh interpreter",
            ours_first,
            peer_first,
            f"ProcessPoolExecutor.map(chunksize={chunksize})",
        )
    )
    rows.append(
        row(
            f"process, {N:,} trivial items, 2 workers, later calls",
            ours,
            peer,
            f"ProcessPoolExecutor.map(chunksize={chunksize})",
        )
    )
    ours_stream = best(lambda: sum(1 for _ in f_proc.stream(iter(items))))
    rows.append(
        row(
            f"process, {N:,} trivial items from a generator (.stream)",
            ours_stream,
            peer,
            "ProcessPoolExecutor.map, list input",
        )
    )
    f_proc.close()

    # CPU-bound: 200 x 10 ms on 2 workers against serial
    cpu_items = list(range(200))
    serial = best(lambda: [cpu_10ms(x) for x in cpu_items], repeat=2)
    f_cpu = opmap(mode="process", workers=2)(cpu_10ms)
    f_cpu(cpu_items[:4])
    ours = best(lambda: f_cpu(cpu_items), repeat=3)
    f_cpu.close()
    with ProcessPoolExecutor(2, mp_context=ctx) as pool:
        list(pool.map(cpu_10ms, cpu_items[:4]))
        peer = best(lambda: list(pool.map(cpu_10ms, cpu_items, chunksize=25)), repeat=3)
    rows.append(row("process, 200 x 10 ms CPU-bound, 2 workers", ours, serial, "serial loop"))
    rows.append(
        row("process, 200 x 10 ms CPU-bound, 2 workers", ours, peer, "ProcessPoolExecutor.map")
    )
    speedup = serial / ours
    peer_speedup = serial / peer

    # async mode: 10,000 x 10 ms sleeps, 1000 in flight
    f_async = opmap(mode="async", workers=1000)(sleep_10ms)

    async def gather_peer() -> list[int]:
        sem = asyncio.Semaphore(1000)

        async def one(x: int) -> int:
            async with sem:
                return await sleep_10ms(x)

        return await asyncio.gather(*(one(x) for x in items))

    peer = best(lambda: asyncio.run(gather_peer()))
    ours = best(lambda: asyncio.run(f_async(items)))
    rows.append(
        row(f"async, {N:,} x 10 ms sleeps, workers=1000", ours, peer, "gather + Semaphore(1000)")
    )

    # resilience on: retries alone (first attempts in chunks), and a cache (per-item chains)
    f_retry = opmap(mode="process", workers=2, retries=2)(trivial)
    f_retry(items)
    retry_time = best(lambda: f_retry(items))
    f_retry.close()
    f_chain = opmap(mode="process", workers=2, cache=True)(trivial)
    chain_times = []
    for _ in range(3):
        f_chain.cache_clear()
        chain_times.append(once(lambda: f_chain(items[:2000])))
    later = min(chain_times)
    hits = best(lambda: f_chain(items[:2000]), repeat=3)
    f_chain.close()

    print(f"start method of both process pools: {ctx.get_start_method()}")
    print("\n".join(rows))
    print(
        f"\nCPU-bound speed-up over serial on 2 workers: {speedup:.2f}x "
        f"(ProcessPoolExecutor: {peer_speedup:.2f}x)"
    )
    print(
        f"process, {N:,} trivial items with retries=2 (first attempts in chunks): {ms(retry_time)}"
    )
    print(
        "process, 2,000 trivial items with cache=True (a chain per item, sent one by one): "
        f"{ms(later)} all misses, {ms(hits)} all hits"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--first"]:
        print(first_call(sys.argv[2]))
    else:
        main()
