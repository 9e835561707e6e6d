"""Shared fixtures. Backend-specific fixtures live next to the tests that use them."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest


class Mode:
    """Runs one test body as a sync function or as an async one (``mode`` fixture)."""

    def __init__(self, is_async: bool) -> None:
        self.is_async = is_async

    def __repr__(self) -> str:
        return "async" if self.is_async else "sync"

    def fn(self, body: Callable[..., Any]) -> Callable[..., Any]:
        """``body`` itself, or an async function with its name and signature that awaits once."""
        if not self.is_async:
            return body

        @functools.wraps(body)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(0)
            return body(*args, **kwargs)

        return wrapper

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call a decorated function: directly, or in a fresh event loop."""
        if self.is_async:
            return asyncio.run(fn(*args, **kwargs))
        return fn(*args, **kwargs)


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> Mode:
    """The same test, once with a sync function and once with an async one."""
    return Mode(request.param)


# --- Redis --------------------------------------------------------------------------------------
# The suite uses OPERO_TEST_REDIS_URL when set, else a server answering at 127.0.0.1:6379, else a
# redis-server it starts itself on a free port, else it skips the Redis tests (fails them when
# OPERO_TEST_REQUIRE names "redis", as on CI). Tests write only under their own key prefix and
# delete their keys afterwards; no test flushes a database.

ENABLE_REDIS = (
    "no Redis server: set OPERO_TEST_REDIS_URL=redis://host:port/db, run redis-server on "
    "127.0.0.1:6379, or install redis-server so the tests can start one"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_answers(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def start_redis_server(port: int, *extra: str) -> subprocess.Popen[bytes]:
    """A throwaway redis-server on ``port`` (no persistence); waits until it answers."""
    proc = subprocess.Popen(
        [
            *f"redis-server --port {port} --bind 127.0.0.1".split(),
            *("--save", "", "--appendonly", "no", "--daemonize", "no"),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not redis_answers(f"redis://127.0.0.1:{port}/0"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"redis-server did not start on port {port}")
        time.sleep(0.02)
    return proc


def stop_redis_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis URL the tests may write their own keys to."""
    url = os.environ.get("OPERO_TEST_REDIS_URL")
    if url:
        yield url
        return
    if redis_answers("redis://127.0.0.1:6379/0"):
        yield "redis://127.0.0.1:6379/0"
        return
    if shutil.which("redis-server"):
        port = free_port()
        proc = start_redis_server(port)
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            stop_redis_server(proc)
        return
    if "redis" in os.environ.get("OPERO_TEST_REQUIRE", "").split(","):
        pytest.fail(ENABLE_REDIS)
    pytest.skip(ENABLE_REDIS)


@pytest.fixture
def test_namespace() -> str:
    """A cache namespace (key prefix) no other test or process uses."""
    return f"opero-test-{uuid.uuid4().hex}"


@pytest.fixture
def redis_client(redis_url: str, test_namespace: str) -> Iterator[Any]:
    """A plain redis-py client; every key under ``test_namespace`` is deleted afterwards."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        doomed = list(client.scan_iter(match=f"{test_namespace}*", count=1000))
        if doomed:
            client.delete(*doomed)
        client.close()


class Records(logging.Handler):
    """Collects the opero logger's records directly (whatever its propagation setting)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def opero_log() -> Any:
    logger = logging.getLogger("opero")
    handler, level = Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(level)


def run_mypy(path: str, cwd: object) -> str:
    """``mypy --strict`` on one file; its findings (stdout). Fails the test when mypy itself cannot
    run (exit 1 also means "No module named mypy": only mypy's own findings count)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--show-error-codes",
            "--no-pretty",
            "--no-incremental",
            path,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    assert not result.stderr.strip(), result.stderr
    return result.stdout


@pytest.fixture(scope="session")
def mypy() -> Callable[[str, object], str]:
    """:func:`run_mypy`, for the typing tests."""
    return run_mypy
