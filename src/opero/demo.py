"""Run ``@opero`` against a local HTTP API that fails like real ones: ``python -m opero.demo``.

The demo starts :class:`~opero._demo_service.FlakyService` on a free port of 127.0.0.1. The service
drops connections and answers 503 at random, answers 429 to a key called faster than its quota and
401 to the revoked primary key. The client below uses only the standard library and one
``@opero`` decorator:

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

__all__ = ["AuthError", "DemoConfig", "PartResult", "TransientError", "main", "run_demo"]


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
    rate_limit: float = 50.0
    quota: float = 60.0
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
    """Client-side counters: body entries (attempts) and calls that reached the body (misses).

    The caller marks its thread before each fetch; the body clears the mark on its first entry. A
    mark still set afterwards means the fetch was answered by the cache (or by another thread's
    identical in-flight fetch) without any request of its own.
    """

    def __init__(self) -> None:
        self.attempts = 0
        self._lock = threading.Lock()
        self._local = threading.local()

    def reset(self) -> None:
        with self._lock:
            self.attempts = 0

    def begin(self) -> None:
        self._local.fresh = True

    def entered(self) -> None:
        self._local.fresh = False
        with self._lock:
            self.attempts += 1

    def end(self) -> bool:
        """True when this thread's fetch never entered the body (a cache hit)."""
        hit = bool(getattr(self._local, "fresh", False))
        self._local.fresh = False
        return hit


# Client-side counters, reset by each part of the demo.
_probe = _Probe()


def fetch_item(
    item_id: int, base_url: str, api_key: Sequence[str] = (PRIMARY_KEY, BACKUP_KEY)
) -> dict[str, object]:
    """GET one item with the first key of ``api_key``.

    With ``arg_fallback="api_key"`` opero passes the current candidate first and the untried ones
    after it, so ``api_key[0]`` is always the key to use now.
    """
    _probe.entered()
    return http_get_json(f"{base_url}/items/{item_id}", api_key[0])


def resilient_fetch(cfg: DemoConfig) -> Callable[..., dict[str, object]]:
    """``fetch_item`` under ``@opero``: decorated per run, so each run starts with a fresh cache
    and its own rate limiter (``@opero(...)`` on the ``def`` does the same thing)."""
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


def workload(cfg: DemoConfig) -> list[int]:
    """``cfg.fetches`` ids: every id in ``1..cfg.ids`` once, the rest repeats, shuffled (seeded)."""
    if not 0 < cfg.ids <= cfg.fetches:
        raise ValueError("need 0 < ids <= fetches")
    rng = random.Random(cfg.seed)  # noqa: S311 - a demo workload, not cryptography
    ids = list(range(1, cfg.ids + 1))
    ids += rng.choices(ids, k=cfg.fetches - cfg.ids)
    rng.shuffle(ids)
    return ids


def run_opero_part(service: FlakyService, cfg: DemoConfig) -> PartResult:
    """Fetch the workload from ``cfg.workers`` threads through one ``@opero`` function."""
    probe = _probe
    probe.reset()
    fetch = resilient_fetch(cfg)
    ids = workload(cfg)
    result = PartResult(f"@opero, {cfg.workers} threads", fetches=len(ids))
    first = len(service.hits)
    hits = 0
    hits_lock = threading.Lock()

    def one(item: int) -> bool:
        nonlocal hits
        probe.begin()
        try:
            data = fetch(item, service.url)
        except Exception as exc:  # a failed fetch is reported, not raised
            print(f"  fetch {item} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            probe.end()
            return False
        if probe.end():
            with hits_lock:
                hits += 1
        return data.get("id") == item

    with _counting_records() as records:
        start = time.perf_counter()
        with ThreadPoolExecutor(cfg.workers, thread_name_prefix="opero-demo") as pool:
            succeeded = list(pool.map(one, ids))
        result.wall = time.perf_counter() - start
    outcomes = service.outcomes(first)
    result.failed = succeeded.count(False)
    result.requests = sum(outcomes.values())
    result.attempts = probe.attempts
    result.retries = records.retries
    result.fallbacks = records.fallbacks
    result.cache_hits = hits
    result.outcomes = dict(outcomes)
    return result


def run_demo(cfg: DemoConfig) -> list[PartResult]:
    """Start the service, run every part against it, stop it; return one result per part."""
    with FlakyService(
        seed=cfg.seed,
        error_rate=cfg.error_rate,
        drop_rate=cfg.drop_rate,
        quota=cfg.quota,
        burst=cfg.burst,
    ) as service:
        return [run_opero_part(service, cfg)]


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
    p.add_argument("--workers", type=int, default=d.workers, help="client threads")
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
    print(
        f"opero demo: {cfg.fetches} fetches of {cfg.ids} ids from a local API with "
        f"{cfg.error_rate:.0%} 503s, {cfg.drop_rate:.0%} dropped connections, a revoked "
        f"primary key and a quota of {cfg.quota:g} requests/s per key; client rate limit "
        f"{cfg.rate_limit:g}/s\n"
    )
    results = run_demo(cfg)
    print(format_table(results))
    ok = all(r.ok for r in results)
    print("\nOK: every fetch succeeded, no 429." if ok else "\nFAILED: see above.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
