"""A small local HTTP API that fails the way real ones do, for :mod:`opero.demo`.

``GET /items/<id>`` with ``Authorization: Bearer <key>`` answers, in this order:

1. ``429`` when the key is called faster than its quota (a token bucket per key, measured by the
   server on arrival),
2. ``401`` for a revoked or unknown key, ``404`` for any other path,
3. a dropped connection (no response at all) or a ``503``, drawn at random,
4. otherwise ``200`` with a small JSON body.

The random draw is seeded per (seed, key, item, n-th request for that item), so a run's outcomes do
not depend on how threads happen to interleave. Every request is logged, so the demo can count what
the server really saw instead of trusting the client.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import cast

__all__ = ["BACKUP_KEY", "PRIMARY_KEY", "FlakyService", "Hit"]

PRIMARY_KEY = "demo-primary-key"
"""Revoked: every request with it gets 401."""
BACKUP_KEY = "demo-backup-key"
"""Valid."""

_PATH = re.compile(r"/items/(\d+)")


@dataclass(frozen=True)
class Hit:
    """One request as the server saw it. ``key`` is a label ("primary", "backup", "unknown"),
    never the key itself; ``item`` is -1 for an unknown path; ``outcome`` is the status code as
    text, or ``"drop"``."""

    at: float
    key: str
    item: int
    outcome: str


class _TokenBucket:
    """``rate`` requests per second with bursts of at most ``burst``; not thread-safe alone."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class FlakyService:
    """The service; ``with FlakyService(...) as svc:`` serves on ``svc.url`` from a thread."""

    def __init__(
        self,
        *,
        seed: int = 7,
        error_rate: float = 0.15,
        drop_rate: float = 0.02,
        quota: float = 75.0,
        burst: int = 10,
    ) -> None:
        if not 0.0 <= error_rate + drop_rate < 1.0 or error_rate < 0 or drop_rate < 0:
            raise ValueError("error_rate and drop_rate must be >= 0 and sum to less than 1")
        if quota <= 0 or burst < 1:
            raise ValueError("quota must be > 0 and burst >= 1")
        self.seed = seed
        self.error_rate = error_rate
        self.drop_rate = drop_rate
        self.quota = quota
        self.burst = burst
        self.hits: list[Hit] = []
        self._labels = {PRIMARY_KEY: "primary", BACKUP_KEY: "backup"}
        self._revoked = {PRIMARY_KEY}
        self._buckets: dict[str, _TokenBucket] = {}
        self._served: Counter[tuple[str, int]] = Counter()
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the service is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> str:
        """Serve on a free port of 127.0.0.1 from a daemon thread; return the base URL."""
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.service = self
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="opero-demo-service",
            daemon=True,
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join()
        self._server = None

    def __enter__(self) -> FlakyService:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def outcomes(self, since: int = 0) -> Counter[str]:
        """How many requests ended in each outcome, from the ``since``-th logged request on."""
        with self._lock:
            return Counter(hit.outcome for hit in self.hits[since:])

    def decide(self, key: str | None, item: int | None) -> str:
        """Log one request (``item`` None: an unknown path) and return its outcome: ``"200"``,
        ``"401"``, ``"404"``, ``"429"``, ``"503"`` or ``"drop"``."""
        now = time.monotonic()
        label = self._labels.get(key or "", "unknown")
        with self._lock:
            outcome = self._decide_locked(key or "", item, now)
            self.hits.append(Hit(now, label, -1 if item is None else item, outcome))
        return outcome

    def _decide_locked(self, key: str, item: int | None, now: float) -> str:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _TokenBucket(self.quota, self.burst, now)
        if not bucket.take(now):
            return "429"
        if key not in self._labels or key in self._revoked:
            return "401"
        if item is None:
            return "404"
        n = self._served[key, item]
        self._served[key, item] = n + 1
        # A str seed is hashed with SHA-512, so the draw is the same in every process and run.
        draw = random.Random(f"{self.seed}:{self._labels[key]}:{item}:{n}").random()  # noqa: S311
        if draw < self.drop_rate:
            return "drop"
        if draw < self.drop_rate + self.error_rate:
            return "503"
        return "200"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    service: FlakyService


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        match = _PATH.fullmatch(self.path)
        item = None if match is None else int(match.group(1))
        auth = self.headers.get("Authorization", "")
        key = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        outcome = cast(_Server, self.server).service.decide(key, item)
        if outcome == "drop":
            # Hang up without a word: the client sees a reset / "remote end closed connection".
            self.close_connection = True
            return
        if outcome == "200":
            assert item is not None
            self._reply(200, {"id": item, "name": f"item-{item}", "price": item * 7 % 101})
        elif outcome == "429":
            self._reply(429, {"error": "too many requests"}, retry_after="1")
        elif outcome == "401":
            self._reply(401, {"error": "invalid or revoked API key"})
        elif outcome == "404":
            self._reply(404, {"error": "no such resource"})
        else:
            self._reply(int(outcome), {"error": "service unavailable, try again"})

    def _reply(self, status: int, body: dict[str, object], retry_after: str | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if retry_after is not None:
            self.send_header("Retry-After", retry_after)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the service keeps its own log in :attr:`FlakyService.hits`."""
