"""@opmap on Ray and Dask against each engine's own map, side by side in one run.

    python bench/bench_cluster.py [--items 2000] [--repeat 3]

Both clusters are local and have 2 CPUs: a Ray instance with ``num_cpus=2`` and a Dask
``LocalCluster`` of 2 single-threaded worker processes. Each item is ~5 ms of CPU work. Peers:
``client.map`` + ``client.gather`` (Dask) and ``ray.get([f.remote(x) ...])`` (Ray), which queue
every task on the cluster at once. opero keeps at most ``workers`` tasks on the cluster:

- "plain, workers=2": no per-item option, so items travel in chunks (what ``@opmap`` does for a
  function without retries, cache, fallback or rate limit);
- "per item, workers=2": ``retries=1``, so every item is one task driven by its own chain in the
  caller; each worker idles for one engine round trip between two tasks;
- "per item, workers=4": the same with twice as many tasks in flight as the cluster has CPUs,
  which hides that round trip.

Each figure is the best of ``--repeat`` runs (the machine is shared and noisy); the ratio is
opero / engine, so below 1.0 means opero is faster.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import distributed
import ray

from opero import opmap


def work(x: int) -> int:
    """About 5 ms of CPU."""
    end = time.perf_counter() + 0.005
    n = 0
    while time.perf_counter() < end:
        n += 1
    return x


def best(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def row(engine: str, variant: str, ours: float, peer: float, peer_name: str) -> str:
    return (
        f"| {engine} | {variant} | {ours:.2f} s | {peer_name}: {peer:.2f} s | {ours / peer:.2f}x |"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    items = list(range(args.items))
    expected = items
    rows = []

    # -- Dask --------------------------------------------------------------------------------
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
    )
    client = distributed.Client(cluster, set_as_default=False)

    def dask_map() -> None:
        assert client.gather(client.map(work, items, pure=False)) == expected

    variants = {
        "plain, workers=2": opmap(mode="dask", cluster=client, workers=2)(work),
        "per item, workers=2": opmap(mode="dask", cluster=client, workers=2, retries=1)(work),
        "per item, workers=4": opmap(mode="dask", cluster=client, workers=4, retries=1)(work),
    }
    dask_map()  # warm up: workers import the function once
    peer = best(dask_map, args.repeat)
    for name, mapped in variants.items():
        assert mapped(items) == expected
        rows.append(row("Dask", name, best(lambda f=mapped: f(items), args.repeat), peer, "map"))
        mapped.close()
    client.close()
    cluster.close()

    # -- Ray ---------------------------------------------------------------------------------
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    remote_work = ray.remote(work)

    def ray_map() -> None:
        assert ray.get([remote_work.remote(x) for x in items]) == expected

    variants = {
        "plain, workers=2": opmap(mode="ray", workers=2)(work),
        "per item, workers=2": opmap(mode="ray", workers=2, retries=1)(work),
        "per item, workers=4": opmap(mode="ray", workers=4, retries=1)(work),
    }
    ray_map()  # warm up: workers start and import the function once
    peer = best(ray_map, args.repeat)
    for name, mapped in variants.items():
        assert mapped(items) == expected
        rows.append(row("Ray", name, best(lambda f=mapped: f(items), args.repeat), peer, "ray.get"))
        mapped.close()
    ray.shutdown()

    print(f"\n{len(items)} items of ~5 ms CPU, 2 CPUs per cluster, best of {args.repeat}\n")
    print("| engine | opero | opero time | engine's own map | ratio |")
    print("|---|---|---|---|---|")
    for line in rows:
        print(line)


if __name__ == "__main__":
    main()
