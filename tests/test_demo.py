"""The demo (``python -m opero.demo``) and its flaky service."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from opero._demo_service import BACKUP_KEY, PRIMARY_KEY, FlakyService
from opero._log import logger
from opero.demo import (
    AuthError,
    DemoConfig,
    QuotaError,
    ServiceError,
    TransientError,
    http_get_json,
    main,
    run_demo,
)

# Small and fast, with the same shape as the default run: a client rate under the server's quota,
# and a burst allowance that absorbs a server thread stalled for ~100 ms on a loaded machine.
SMALL = DemoConfig(
    fetches=60,
    ids=40,
    workers=8,
    map_workers=4,
    rate_limit=200.0,
    quota=300.0,
    burst=20,
    error_rate=0.3,
)
SMALL_ARGS = [
    *("--fetches", "60", "--ids", "40"),
    *("--rate-limit", "200", "--quota", "300", "--burst", "20"),
]


@pytest.fixture
def quiet_opero_logger() -> Iterator[None]:
    # Another test (or the user) may have left the opero logger above WARNING.
    saved = logger.level
    logger.setLevel(logging.ERROR)
    yield
    assert logger.level == logging.ERROR  # the demo restored it
    logger.setLevel(saved)


@pytest.mark.usefixtures("quiet_opero_logger")
def test_numbers_add_up() -> None:
    parts = run_demo(SMALL)
    assert [p.name for p in parts] == ["@opero, 8 threads", "@opmap, 4 threads"]
    for part, (fetches, ids) in zip(parts, [(60, 40), (30, 20)], strict=True):
        out = part.outcomes
        assert part.fetches == fetches
        assert part.failed == 0
        assert out.get("429", 0) == 0
        assert part.ok
        # every count the table shows is really exercised
        assert part.retries > 0
        assert part.fallbacks > 0
        assert part.cache_hits > 0
        # the client's view and the server's log agree
        assert part.requests == part.attempts
        assert part.cache_hits == fetches - ids  # each distinct id fetched once
        misses = fetches - part.cache_hits
        assert part.requests == misses + part.retries + part.fallbacks
        assert part.fallbacks == out["401"] == misses  # the primary key is revoked: one 401 each
        assert part.retries == out.get("503", 0) + out.get("drop", 0)
        assert out["200"] == misses


def test_main_prints_the_table_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(SMALL_ARGS) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = lines.index("") + 1
    assert re.split(r"\s{2,}", lines[header].strip()) == ["@opero, 16 threads", "@opmap, 8 threads"]
    rows = {
        cells[0]: cells[1:]
        for cells in (re.split(r"\s{2,}", line.strip()) for line in lines[header + 1 : header + 11])
    }
    assert list(rows) == [
        "fetches (ok / failed)",
        "requests sent (server)",
        "retries",
        "fallbacks used",
        "cache hits",
        "429s received",
        "401s received",
        "503s received",
        "dropped connections",
        "wall time",
    ]
    assert rows["fetches (ok / failed)"] == ["60 / 0", "30 / 0"]
    assert rows["429s received"] == ["0", "0"]
    assert rows["cache hits"] == ["20", "10"]
    assert "OK: every fetch succeeded" in out


def test_main_fails_when_the_rate_limit_exceeds_the_quota(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The 429 check is real: a client faster than the quota gets refused and the demo says so.
    args = ["--fetches", "40", "--ids", "40", "--rate-limit", "1000", "--quota", "20"]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out
    assert "QuotaError" in captured.err


def test_main_fails_when_a_fetch_fails(capsys: pytest.CaptureFixture[str]) -> None:
    # A service that is nearly always down exhausts the retries: the demo reports it, exit 1.
    args = ["--fetches", "4", "--ids", "4", "--error-rate", "0.97", "--rate-limit", "500"]
    assert main([*args, "--quota", "1000", "--drop-rate", "0"]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out
    assert "TransientError('HTTP 503" in captured.err


def test_runs_as_a_module() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "opero.demo", *SMALL_ARGS],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fallbacks used" in proc.stdout


def test_service_answers_like_a_real_api() -> None:
    with FlakyService(error_rate=0.0, drop_rate=0.0, quota=1000.0) as svc:
        assert http_get_json(f"{svc.url}/items/5", BACKUP_KEY)["id"] == 5
        with pytest.raises(AuthError, match="401"):
            http_get_json(f"{svc.url}/items/5", PRIMARY_KEY)
        with pytest.raises(AuthError, match="401"):
            http_get_json(f"{svc.url}/items/5", "not-a-key")
        with pytest.raises(ServiceError, match="404"):
            http_get_json(f"{svc.url}/nothing", BACKUP_KEY)
    assert [h.outcome for h in svc.hits] == ["200", "401", "401", "404"]
    assert all(BACKUP_KEY not in h.key and PRIMARY_KEY not in h.key for h in svc.hits)


def test_service_quota_is_a_token_bucket_per_key() -> None:
    with FlakyService(error_rate=0.0, drop_rate=0.0, quota=0.5, burst=2) as svc:
        http_get_json(f"{svc.url}/items/1", BACKUP_KEY)
        http_get_json(f"{svc.url}/items/2", BACKUP_KEY)
        with pytest.raises(QuotaError):
            http_get_json(f"{svc.url}/items/3", BACKUP_KEY)
        # another key has its own bucket (and is then refused for being revoked)
        with pytest.raises(AuthError):
            http_get_json(f"{svc.url}/items/3", PRIMARY_KEY)


@pytest.mark.parametrize(("error_rate", "drop_rate"), [(1.0 - 1e-9, 0.0), (0.0, 1.0 - 1e-9)])
def test_503s_and_dropped_connections_are_transient(error_rate: float, drop_rate: float) -> None:
    with FlakyService(error_rate=error_rate, drop_rate=drop_rate) as svc:
        with pytest.raises(TransientError):
            http_get_json(f"{svc.url}/items/1", BACKUP_KEY)
    assert [h.outcome for h in svc.hits] == ["503" if error_rate else "drop"]


def test_failures_do_not_depend_on_thread_interleaving() -> None:
    def draws(order: list[int]) -> list[str]:
        svc = FlakyService(seed=3, error_rate=0.4, drop_rate=0.1, quota=1e9)
        return sorted(f"{i}:{svc.decide(BACKUP_KEY, i)}" for i in order)

    items = [1, 2, 3, 1, 2, 3, 4, 4, 4]
    assert draws(items) == draws(items[::-1])
    assert {d.split(":")[1] for d in draws(items * 5)} == {"200", "503", "drop"}
