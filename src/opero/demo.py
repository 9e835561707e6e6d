"""Run opero against a local HTTP API that fails like real ones: ``python -m opero.demo``.

The demo starts :class:`~opero._demo_service.FlakyService` on a free port of 127.0.0.1. The service
drops connections and answers 503 at random, answers 429 to a key called faster than its quota and
401 to the revoked primary key. The client uses only the standard library and one function,
``fetch_item``, run under ``@opero`` from a thread pool, then under ``@opmap`` as a parallel map,
with the same options:

- ``retries`` with backoff on transient errors only (503, dropped connections),
- ``arg_fallback="api_key"`` from the revoked key to the backup key, on 401 only,
- ``rate_limit`` under the server's quota, shared by all threads, so no request is ever refused,
- ``cache=True`` so repeated ids cost no request.

It prints what happened, counted from the server's own request log and from opero's log records,
and exits with status 1 if any fetch failed or any 429 came back.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from opero._demo_service import BACKUP_KEY, PRIMARY_KEY, FlakyService
from opero._log import configure_logging, logger
from opero.decorators.opero import opero
from opero.decorators.opmap import Opmap, opmap

__all__ = [
    "AuthError",
    "DemoConfig",
    "PartResult",
    "QuotaError",
    "ServiceError",
    "TransientError",
    "fetch_item",
    "main",
    "run_demo",
]


class TransientError(Exception):
    """Worth retrying: a 5xx answer or a connection that failed or was dropped."""


class AuthError(Exception):
    """The key was refused (401/403): retrying will not help, another key might."""


class QuotaError(Exception):
    """429: called faster than the quota. The rate limit exists so this never happens."""


class ServiceError(Exception):
    """Any other unexpected answer."""


# Bypass any proxy settings in the environment: the service is on 127.0.0.1.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get_json(url: str, key: str, timeout: float = 5.0) -> dict[str, object]:
    """GET ``url`` with a bearer key; map failures onto the error classes above."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})  # noqa: S310
    try:
        with _opener.open(request, timeout=timeout) as response:
            body: dict[str, object] = json.load(response)
            return body
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code in (401, 403):
            raise AuthError(f"HTTP {exc.code} from {url}") from None
        if exc.code == 429:
            raise QuotaError(f"HTTP 429 from {url}") from None
        if exc.code >= 500:
            raise TransientError(f"HTTP {exc.code} from {url}") from None
        raise ServiceError(f"HTTP {exc.code} from {url}") from None
    except OSError as exc:  # URLError, ConnectionResetError, RemoteDisconnected, timeouts
        raise TransientError(f"{type(exc).__name__} from {url}: {exc}") from exc


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and rates of one demo run (the defaults are what ``python -m opero.demo`` runs)."""

    fetches: int = 300
    ids: int = 200
    workers: int = 16
    map_workers: int = 8
    rate_limit: float = 60.0
    quota: float = 75.0
    burst: int = 10
    error_rate: float = 0.15
    drop_rate: float = 0.02
    retries: int = 5
    seed: int = 7


@dataclass
class PartResult:
    """What one part of the demo did. Server-side figures come from the service's request log."""

    name: str
    fetches: int = 0
    failed: int = 0
    requests: int = 0  # as counted by the server
    attempts: int = 0  # times the client function body ran (one HTTP request each)
    retries: int = 0  # opero's retry log records
    fallbacks: int = 0  # opero's "falling back" log records
    cache_hits: int = 0  # fetches answered without entering the function body
    outcomes: dict[str, int] = field(default_factory=dict)
    wall: float = 0.0

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.outcomes.get("429", 0) == 0


class _OperoRecords(logging.Handler):
    """Counts opero's retry and fallback decisions from its log records."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.retries = 0
        self.fallbacks = 0
        self._lock_counts = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        template = str(record.msg)
        with self._lock_counts:
            if "retrying in" in template:
                self.retries += 1
            elif "falling back to" in template:
                self.fallbacks += 1


@contextlib.contextmanager
def _counting_records() -> Iterator[_OperoRecords]:
    """Count opero's decisions inside the block, whatever level the ``opero`` logger was left at."""
    records = _OperoRecords()
    saved = logger.level
    if not logger.isEnabledFor(logging.WARNING):
        logger.setLevel(logging.WARNING)
    logger.addHandler(records)
    try:
        yield records
    finally:
        logger.removeHandler(records)
        logger.setLevel(saved)


class _Probe:
    """Client-side counts, taken inside the function body: every entry is one HTTP request.

    An entry that gets the whole key list is the first attempt of a call that missed the cache:
    opero starts every call at the first candidate, and the revoked first key is never retried
    (a 401 is not a transient error), so these entries count the calls that reached the body.
    """

    def __init__(self) -> None:
        self.attempts = 0
        self.calls = 0
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self.attempts = self.calls = 0

    def entered(self, *, first_candidate: bool) -> None:
        with self._lock:
            self.attempts += 1
            self.calls += first_candidate


_probe = _Probe()
KEYS = (PRIMARY_KEY, BACKUP_KEY)


def fetch_item(item_id: int, base_url: str, api_key: Sequence[str] = KEYS) -> dict[str, object]:
    """GET one item with the first key of ``api_key``.

    With ``arg_fallback="api_key"`` opero passes the current candidate first and the untried ones
    after it, so ``api_key[0]`` is always the key to use now.
    """
    _probe.entered(first_candidate=len(api_key) == len(KEYS))
    return http_get_json(f"{base_url}/items/{item_id}", api_key[0])


# Both decorators are applied per run, so each run starts with a fresh cache and rate limiter;
# ``@opero(...)`` / ``@opmap(...)`` on the ``def`` would do the same once per process.


def resilient_fetch(cfg: DemoConfig) -> Callable[..., dict[str, object]]:
    """``fetch_item`` under ``@opero``: call it with one id from as many threads as you like."""
    return opero(
        retries=cfg.retries,  # 503s and dropped connections: try again, with backoff
        min_delay=0.02,
        max_delay=0.5,
        retry_on=TransientError,
        arg_fallback="api_key",  # 401 on the revoked key: move on to the backup key
        fallback_on=AuthError,
        rate_limit=cfg.rate_limit,  # shared by every thread, kept under the server's quota
        cache=True,  # a repeated id costs no request
    )(fetch_item)


def parallel_fetch(cfg: DemoConfig) -> Opmap[int, dict[str, object]]:
    """``fetch_item`` under ``@opmap``: call it with a list of ids; same resilience per item,
    one rate limit for the whole map."""
    return opmap(
        mode="thread",
        workers=cfg.map_workers,
        on_error="return",  # a failed item comes back as its exception; the demo counts them
        retries=cfg.retries,
        min_delay=0.02,
        max_delay=0.5,
        retry_on=TransientError,
        arg_fallback="api_key",
        fallback_on=AuthError,
        rate_limit=cfg.rate_limit,
        cache=True,
    )(fetch_item)


def workload(fetches: int, ids: int, seed: int) -> list[int]:
    """``fetches`` ids: every id in ``1..ids`` once, the rest repeats, shuffled (seeded)."""
    if not 0 < ids <= fetches:
        raise ValueError(f"need 0 < ids <= fetches, got ids={ids}, fetches={fetches}")
    rng = random.Random(seed)  # noqa: S311 - a demo workload, not cryptography
    items = list(range(1, ids + 1))
    items += rng.choices(items, k=fetches - ids)
    rng.shuffle(items)
    return items


def _measure(
    service: FlakyService, name: str, ids: list[int], fetch_all: Callable[[list[int]], list[object]]
) -> PartResult:
    """Run ``fetch_all(ids)`` (one result or exception per id) and count what happened."""
    _probe.reset()
    first = len(service.hits)
    with _counting_records() as records:
        start = time.perf_counter()
        results = fetch_all(ids)
        wall = time.perf_counter() - start
    failed = 0
    for item, data in zip(ids, results, strict=True):
        if not isinstance(data, dict) or data.get("id") != item:
            failed += 1
            print(f"  {name}: fetch {item} failed: {data!r}", file=sys.stderr)
    outcomes = service.outcomes(first)
    return PartResult(
        name,
        fetches=len(ids),
        failed=failed,
        requests=sum(outcomes.values()),
        attempts=_probe.attempts,
        retries=records.retries,
        fallbacks=records.fallbacks,
        cache_hits=len(ids) - _probe.calls,
        outcomes=dict(outcomes),
        wall=wall,
    )


def run_opero_part(service: FlakyService, cfg: DemoConfig) -> PartResult:
    """Fetch the workload from ``cfg.workers`` threads through one ``@opero`` function."""
    fetch = resilient_fetch(cfg)

    def one(item: int) -> object:
        try:
            return fetch(item, service.url)
        except Exception as exc:  # a failed fetch is counted and reported, not raised
            return exc

    def fetch_all(ids: list[int]) -> list[object]:
        with ThreadPoolExecutor(cfg.workers, thread_name_prefix="opero-demo") as pool:
            return list(pool.map(one, ids))

    ids = workload(cfg.fetches, cfg.ids, cfg.seed)
    return _measure(service, f"@opero, {cfg.workers} threads", ids, fetch_all)


def _map_sizes(cfg: DemoConfig) -> tuple[int, int]:
    return max(1, cfg.fetches // 2), max(1, cfg.ids // 2)


def run_opmap_part(service: FlakyService, cfg: DemoConfig) -> PartResult:
    """Half as many fetches, over another draw of ids, in one ``@opmap`` call over
    ``cfg.map_workers`` threads."""
    fetch_many = parallel_fetch(cfg)

    def fetch_all(ids: list[int]) -> list[object]:
        with fetch_many:  # releases the map's threads afterwards
            return list(fetch_many(ids, base_url=service.url))

    ids = workload(*_map_sizes(cfg), cfg.seed + 1)
    return _measure(service, f"@opmap, {cfg.map_workers} threads", ids, fetch_all)


def run_demo(cfg: DemoConfig) -> list[PartResult]:
    """Start the service, run both parts against it one after the other, stop it; return one
    result per part."""
    with FlakyService(
        seed=cfg.seed,
        error_rate=cfg.error_rate,
        drop_rate=cfg.drop_rate,
        quota=cfg.quota,
        burst=cfg.burst,
    ) as service:
        return [run_opero_part(service, cfg), run_opmap_part(service, cfg)]


def format_table(results: Sequence[PartResult]) -> str:
    rows: list[tuple[str, Callable[[PartResult], str]]] = [
        ("fetches (ok / failed)", lambda r: f"{r.fetches - r.failed} / {r.failed}"),
        ("requests sent (server)", lambda r: str(r.requests)),
        ("retries", lambda r: str(r.retries)),
        ("fallbacks used", lambda r: str(r.fallbacks)),
        ("cache hits", lambda r: str(r.cache_hits)),
        ("429s received", lambda r: str(r.outcomes.get("429", 0))),
        ("401s received", lambda r: str(r.outcomes.get("401", 0))),
        ("503s received", lambda r: str(r.outcomes.get("503", 0))),
        ("dropped connections", lambda r: str(r.outcomes.get("drop", 0))),
        ("wall time", lambda r: f"{r.wall:.1f} s"),
    ]
    width = max(len(label) for label, _ in rows)
    cols = [max(len(r.name), 8) for r in results]
    lines = [
        " " * width + "  " + "  ".join(r.name.rjust(w) for r, w in zip(results, cols, strict=True))
    ]
    for label, cell in rows:
        cells = "  ".join(cell(r).rjust(w) for r, w in zip(results, cols, strict=True))
        lines.append(f"{label.ljust(width)}  {cells}")
    return "\n".join(lines)


def _parse(argv: Sequence[str] | None) -> tuple[DemoConfig, bool]:
    d = DemoConfig()
    p = argparse.ArgumentParser(prog="python -m opero.demo", description=__doc__.splitlines()[0])
    p.add_argument("--fetches", type=int, default=d.fetches, help="fetches to make")
    p.add_argument("--ids", type=int, default=d.ids, help="distinct ids among them")
    p.add_argument("--workers", type=int, default=d.workers, help="client threads (@opero)")
    p.add_argument("--map-workers", type=int, default=d.map_workers, help="@opmap thread workers")
    p.add_argument("--rate-limit", type=float, default=d.rate_limit, help="client calls/s")
    p.add_argument("--quota", type=float, default=d.quota, help="server quota, requests/s per key")
    p.add_argument("--burst", type=int, default=d.burst, help="server burst allowance per key")
    p.add_argument("--error-rate", type=float, default=d.error_rate, help="share of 503s")
    p.add_argument("--drop-rate", type=float, default=d.drop_rate, help="share of dropped conns")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("-v", "--verbose", action="store_true", help="show opero's log lines")
    ns = p.parse_args(argv)
    cfg = DemoConfig(
        fetches=ns.fetches,
        ids=ns.ids,
        workers=ns.workers,
        map_workers=ns.map_workers,
        rate_limit=ns.rate_limit,
        quota=ns.quota,
        burst=ns.burst,
        error_rate=ns.error_rate,
        drop_rate=ns.drop_rate,
        seed=ns.seed,
    )
    return cfg, ns.verbose


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo, print its table; return 0 when every fetch succeeded and no 429 came back."""
    cfg, verbose = _parse(argv)
    if verbose:
        configure_logging(logging.WARNING)
    map_fetches, map_ids = _map_sizes(cfg)
    print(
        f"opero demo: a local API with {cfg.error_rate:.0%} 503s, {cfg.drop_rate:.0%} dropped "
        f"connections, a revoked primary key\nand a quota of {cfg.quota:g} requests/s per key; "
        f"each client is rate-limited to {cfg.rate_limit:g} calls/s.\n"
        f"  @opero: {cfg.fetches} fetches of {cfg.ids} ids from {cfg.workers} threads\n"
        f"  @opmap: {map_fetches} fetches of {map_ids} ids in one call, "
        f"{cfg.map_workers} thread workers\n"
    )
    results = run_demo(cfg)
    print(format_table(results))
    ok = all(r.ok for r in results)
    print("\nOK: every fetch succeeded, no 429." if ok else "\nFAILED: see above.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
