"""The rate limit shared through Redis (opero.limiters.redis), against a real Redis server."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from opero import _redis, opero
from opero.errors import MissingExtraError, OperoError, RateLimitUnavailableError
from opero.limiters import default_key
from opero.limiters.redis import KEY_PREFIX, RedisRateLimiter
from opero.testing import fake_time

REDIS_URL = os.environ.get("OPERO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRED = "redis" in os.environ.get("OPERO_TEST_REQUIRE", "")


def _unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason} (OPERO_TEST_REQUIRE contains 'redis')")
    pytest.skip(f"{reason}; start redis-server on 127.0.0.1:6379 or set OPERO_TEST_REDIS_URL")


@pytest.fixture(scope="module")
def server() -> Iterator[redis.Redis]:
    """A client of the test Redis (the limiter's own clients are separate)."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        client.close()
        _unavailable(f"no Redis at {REDIS_URL}: {exc}")
    yield client
    client.close()


@pytest.fixture
def key(server: redis.Redis) -> Iterator[str]:
    """A limit name of this test's own; its Redis key is deleted afterwards."""
    name = f"opero-test-{uuid.uuid4().hex}"
    yield name
    server.delete(KEY_PREFIX + name)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _opero_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "opero"]


def _max_in_window(starts: list[float], seconds: float) -> int:
    starts = sorted(starts)
    return max(bisect.bisect_left(starts, s + seconds) - i for i, s in enumerate(starts))


# ---------------------------------------------------------------------------------------------
# options


def f() -> None:
    pass


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rate_limit": 1, "rate_limit_backend": "memcached"}, "rate_limit_backend='memcached'"),
        ({"rate_limit": 1, "rate_limit_backend": 3}, "rate_limit_backend=3"),
        ({"rate_limit": 1, "rate_limit_backend": "redis", "rate_limit_key": ""}, "rate_limit_key"),
        ({"rate_limit": 1, "rate_limit_backend": "redis", "rate_limit_key": 7}, "rate_limit_key"),
        ({"rate_limit": 1, "rate_limit_backend": "redis", "rate_limit_on_error": "x"}, "_on_error"),
        ({"rate_limit_backend": "redis"}, "rate_limit_backend='redis' has no effect without"),
        ({"rate_limit_key": "k"}, "rate_limit_key='k' has no effect without rate_limit"),
        ({"rate_limit_on_error": "raise"}, "rate_limit_on_error='raise' has no effect without"),
        ({"rate_limit": 1, "rate_limit_key": "k"}, "rate_limit_key='k' has no effect with rate_"),
        (
            {"rate_limit": 1, "rate_limit_on_error": "raise"},
            "has no effect with rate_limit_backend",
        ),
        ({"rate_limit": 0, "rate_limit_backend": "redis"}, "rate_limit must be a positive"),
    ],
)
def test_impossible_options_fail_when_decorating(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        opero(**options)(f)


def test_a_bad_url_in_the_environment_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPERO_REDIS_URL", "http://:secret@example.com")
    with pytest.raises(ValueError, match="OPERO_REDIS_URL") as info:
        opero(rate_limit=1, rate_limit_backend="redis")(f)
    assert "secret" not in str(info.value)


def test_url_comes_from_the_option_then_the_environment_then_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def url(backend: str) -> str:
        limiter = opero(rate_limit=1, rate_limit_backend=backend)(f).opero_chain.limiter
        assert isinstance(limiter, RedisRateLimiter)
        return limiter.url

    monkeypatch.delenv("OPERO_REDIS_URL", raising=False)
    assert url("redis") == "redis://localhost:6379/0"
    monkeypatch.setenv("OPERO_REDIS_URL", "redis://elsewhere:6380/2")
    assert url("redis") == "redis://elsewhere:6380/2"
    assert url("rediss://direct:6379/1") == "rediss://direct:6379/1"


def test_the_default_key_is_module_and_qualname_the_same_in_spawned_workers() -> None:
    limiter = opero(rate_limit=1, rate_limit_backend="redis")(f).opero_chain.limiter
    assert isinstance(limiter, RedisRateLimiter)
    assert limiter.key == f"{__name__}.f"

    def script_function() -> None:
        pass

    script_function.__module__ = "__mp_main__"  # how a script's module is named in a spawn child
    assert default_key(script_function).startswith("__main__.")


def test_the_limiter_pickles_without_its_connections_and_hides_the_password() -> None:
    limiter = RedisRateLimiter(5, "redis://user:secret@host:6379/0", "k", "raise")
    copy = pickle.loads(pickle.dumps(limiter))
    assert (copy.rate, copy.url, copy.key, copy.on_error) == (5.0, limiter.url, "k", "raise")
    assert "secret" not in repr(limiter)


def test_without_redis_installed_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.delitem(sys.modules, "opero.limiters.redis")
    with pytest.raises(MissingExtraError, match=r"opero\[redis\]") as info:
        opero(rate_limit=1, rate_limit_backend="redis")(f)
    assert isinstance(info.value, ImportError)
    assert info.value.extra == "redis"


# ---------------------------------------------------------------------------------------------
# the shared limit


async def test_slots_come_from_redis_one_interval_apart_and_the_key_expires(
    server: redis.Redis, key: str
) -> None:
    limiter = RedisRateLimiter(1, REDIS_URL, key)
    waits = [limiter.reserve(0.0) for _ in range(3)]
    waits += [await limiter.areserve(0.0) for _ in range(2)]
    # Slot k is k seconds after the first; Redis's clock moves on while we ask, never back.
    for k, wait in enumerate(waits):
        assert k - 0.5 < wait <= k
    pttl = server.pttl(KEY_PREFIX + key)
    assert 4000 < pttl <= 5000  # the key outlives the last slot handed out, then expires


def test_functions_with_one_key_share_a_limit_and_other_keys_do_not(mode: Any, key: str) -> None:
    def decorate(name: str) -> Callable[..., Any]:
        return opero(rate_limit=2, rate_limit_backend=REDIS_URL, rate_limit_key=name)(
            mode.fn(lambda: None)
        )

    first, second, other = decorate(key), decorate(key), decorate(key + "-other")
    with fake_time() as t:
        mode.run(first)
        mode.run(other)
        assert t.slept == []
        mode.run(second)  # the slot after first's, half a second later
    assert len(t.slept) == 1
    assert 0.0 < t.slept[0] <= 0.5
    redis.Redis.from_url(REDIS_URL).delete(KEY_PREFIX + key + "-other")


_WORKER = """
import json, sys, time
from opero import opero
key, url, rate, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
starts = []

@opero(rate_limit=rate, rate_limit_backend=url, rate_limit_key=key)
def call():
    starts.append(time.time())

print("ready", flush=True)
start_at = float(sys.stdin.readline())
time.sleep(max(0.0, start_at - time.time()))
while time.time() < start_at + seconds:
    call()
print(json.dumps(starts))
"""


def test_four_processes_together_stay_within_the_rate(key: str) -> None:
    rate, seconds, processes = 20, 1.5, 4
    cmd = [sys.executable, "-c", _WORKER, key, REDIS_URL, str(rate), str(seconds)]
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    with contextlib.ExitStack() as stack:
        children = [stack.enter_context(subprocess.Popen(cmd, **pipes)) for _ in range(processes)]
        for child in children:  # every interpreter has imported opero: start them together
            assert child.stdout is not None
            assert child.stdout.readline() == "ready\n"
        start_at = time.time() + 0.1
        for child in children:
            assert child.stdin is not None
            child.stdin.write(f"{start_at}\n")
            child.stdin.flush()
        outputs = [child.communicate(timeout=30)[0] for child in children]
    assert [child.returncode for child in children] == [0] * processes
    per_process = [json.loads(output) for output in outputs]
    starts = [s for starts in per_process for s in starts]

    assert all(per_process), "every process got to start some calls"
    assert _max_in_window(starts, 1.0) <= rate * 1 + 1
    # Together they got about the rate, not each of them: alone each would have made ~31 calls.
    # Each may start one reserved call after the deadline; a loaded machine wakes them late.
    assert 0.6 * rate * seconds <= len(starts) <= rate * seconds + 1 + processes


async def test_tasks_on_one_loop_share_the_limit_through_the_asyncio_client(
    key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_sync_client(url: str) -> redis.Redis:
        raise AssertionError("an async function must not use the blocking client")

    monkeypatch.setattr(_redis, "sync_client", no_sync_client)
    rate, seconds, tasks = 20, 1.0, 12
    starts: list[float] = []

    @opero(rate_limit=rate, rate_limit_backend=REDIS_URL, rate_limit_key=key)
    async def call() -> None:
        starts.append(time.monotonic())

    end = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < end:
            await call()

    await asyncio.gather(*(worker() for _ in range(tasks)))
    assert _max_in_window(starts, 1.0) <= rate * 1 + 1
    assert 0.75 * rate * seconds <= len(starts) <= rate * seconds + 1 + tasks


# ---------------------------------------------------------------------------------------------
# Redis unreachable


def test_dead_redis_with_local_warns_once_and_limits_each_process(
    mode: Any, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []
    url = f"redis://:secret@127.0.0.1:{_free_port()}/0"
    func = opero(rate_limit=10, rate_limit_backend=url, rate_limit_key="dead")(
        mode.fn(lambda: calls.append(1))
    )
    with fake_time() as t, caplog.at_level(logging.INFO, logger="opero"):
        for _ in range(10):  # one second of fake time: Redis is tried again after 0.5 s
            mode.run(func)
    assert len(calls) == 10
    assert t.slept == pytest.approx([0.1] * 9)
    warnings = [r for r in _opero_records(caplog) if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "unreachable" in warnings[0].getMessage()
    assert "secret" not in caplog.text


def test_dead_redis_with_raise_raises_before_calling(mode: Any) -> None:
    calls: list[int] = []
    url = f"redis://127.0.0.1:{_free_port()}/0"
    func = opero(rate_limit=10, rate_limit_backend=url, rate_limit_on_error="raise")(
        mode.fn(lambda: calls.append(1))
    )
    for _ in range(2):  # the first after a failed connection, the second during the back-off
        with pytest.raises(RateLimitUnavailableError, match="unreachable") as info:
            mode.run(func)
        assert isinstance(info.value, OperoError)
        assert isinstance(info.value.__cause__, redis.ConnectionError)
    assert calls == []


class _SilentServer:
    """Accepts TCP connections and never answers: every request to it times out."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                self.accepted.append(self.sock.accept()[0])
            except TimeoutError:  # noqa: PERF203 - wakes up to look at the stop flag
                continue

    def close(self) -> int:
        self._stop.set()
        self._thread.join()
        self.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # connections still waiting in the backlog
            while True:
                self.accepted.append(self.sock.accept()[0])
        for conn in self.accepted:
            conn.close()
        self.sock.close()
        return len(self.accepted)


def test_a_hanging_redis_is_probed_only_after_a_back_off(
    mode: Any, caplog: pytest.LogCaptureFixture
) -> None:
    silent = _SilentServer()
    url = f"redis://127.0.0.1:{silent.port}/0?socket_timeout=0.05&socket_connect_timeout=0.05"
    func = opero(rate_limit=20, rate_limit_backend=url, rate_limit_key="silent")(
        mode.fn(lambda: None)
    )
    try:
        with fake_time(), caplog.at_level(logging.WARNING, logger="opero"):
            for _ in range(60):  # three seconds of fake time
                mode.run(func)
    finally:
        connections = silent.close()
    # Tried at 0 s, then after the back-off at 0.5 s and 1.5 s (next at 3.5 s): not 60 times.
    assert connections == 3
    assert len(_opero_records(caplog)) == 1


class _OwnServer:
    """A redis-server of this test's own that can be stopped and started again on one port."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        self.proc = subprocess.Popen([*cmd, "--appendonly", "no"], stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        for _ in range(250):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def own_server() -> Iterator[_OwnServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        _unavailable("redis-server is not on PATH")
    assert binary is not None
    server = _OwnServer(binary)
    server.start()
    yield server
    server.stop()


def test_the_shared_limit_resumes_when_redis_is_back(
    mode: Any, own_server: _OwnServer, caplog: pytest.LogCaptureFixture
) -> None:
    func = opero(rate_limit=10, rate_limit_backend=f"redis://127.0.0.1:{own_server.port}/0")(
        mode.fn(lambda: None)
    )
    redis_key = KEY_PREFIX + func.opero_chain.limiter.key

    def stored() -> int:
        with redis.Redis(port=own_server.port) as store:
            return int(store.exists(redis_key))

    with fake_time() as t, caplog.at_level(logging.INFO, logger="opero"):
        mode.run(func)
        assert stored()
        own_server.stop()
        mode.run(func)
        mode.run(func)
        assert [r.levelname for r in _opero_records(caplog)] == ["WARNING"]
        own_server.start()  # empty: a fresh server
        mode.run(func)  # still within the back-off: not tried yet
        assert not stored()
        t.advance(1.0)
        mode.run(func)
        assert stored()
    records = _opero_records(caplog)
    assert [r.levelname for r in records] == ["WARNING", "INFO"]
    assert "reachable again" in records[1].getMessage()


# ---------------------------------------------------------------------------------------------
# URLs: checked when decorating, never shown with a password


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://127.0.0.1:6379/abc", "database 'abc' is not a number"),
        ("redis://", "no host"),
        ("redis://localhost:99999/0", "port must be a number from 1 to 65535"),
        ("ftp://:hunter2pw@127.0.0.1:6379/0", "scheme must be one of"),
        ("unix:///run/redis.sock?db=two&password=hunter2pw", "database 'two' is not a number"),
        ("redis://127.0.0.1:6379/0?socket_connect_timeout=x", "socket_connect_timeout"),
    ],
)
def test_a_malformed_url_fails_when_decorating_naming_the_option(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match="rate_limit_backend=") as info:
        opero(rate_limit=1, rate_limit_backend=url)(f)
    assert problem in str(info.value)
    assert "hunter2pw" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:{port}/0?password=hunter2pw",
        "redis://:hunter2pw@127.0.0.1:{port}/0?client_name=a@b",
        "unix:///nonexistent/opero-{port}.sock?password=hunter2pw",
    ],
)
def test_no_password_in_the_warning_or_the_error(
    url: str, mode: Any, caplog: pytest.LogCaptureFixture
) -> None:
    url = url.format(port=_free_port())  # nothing listens there
    local = opero(rate_limit=10, rate_limit_backend=url, rate_limit_key="pw")(mode.fn(f))
    strict = opero(rate_limit=10, rate_limit_backend=url, rate_limit_on_error="raise")(mode.fn(f))
    with fake_time(), caplog.at_level(logging.INFO, logger="opero"):
        mode.run(local)
        with pytest.raises(RateLimitUnavailableError) as info:
            mode.run(strict)
    assert len([r for r in _opero_records(caplog) if r.levelno == logging.WARNING]) == 1
    shown = caplog.text + str(info.value) + repr(local.opero_chain.limiter)
    assert "hunter2pw" not in shown
    assert "***" in shown


# ---------------------------------------------------------------------------------------------
# a stored slot far ahead of Redis's clock


def _redis_now_us(server: redis.Redis) -> int:
    seconds, micros = server.time()
    return int(seconds) * 1_000_000 + int(micros)


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_a_slot_far_ahead_of_redis_time_is_reset_with_one_warning(
    server: redis.Redis, key: str, is_async: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # What a writer with a clock an hour ahead leaves behind, or a failover to a server an hour
    # behind: without the check every caller would sleep an hour.
    server.set(KEY_PREFIX + key, _redis_now_us(server) + 3600 * 1_000_000)
    limiter = RedisRateLimiter(2, REDIS_URL, key)

    async def reserve() -> float:
        return await limiter.areserve(0.0) if is_async else limiter.reserve(0.0)

    with caplog.at_level(logging.INFO, logger="opero"):
        waits = [await reserve() for _ in range(3)]
    assert waits[0] == 0.0
    assert 0.0 < waits[1] <= 0.5 < waits[2] <= 1.0  # the queue starts afresh, one interval apart
    records = _opero_records(caplog)
    assert [r.levelname for r in records] == ["WARNING"]
    message = records[0].getMessage()
    assert "3600 s ahead" in message
    assert "reset" in message
    assert 0 < server.pttl(KEY_PREFIX + key) <= 1500  # the stale hour is gone from Redis too


@pytest.mark.parametrize(
    ("rate", "ahead"),
    [
        (1, 59.0),  # a queue under a minute is always believable
        (100, 59.0),  # 1000 intervals of 0.01 s are only 10 s, but under a minute is kept
        (0.01, 3600.0),  # 1000 intervals of 100 s: an hour is a believable queue of 36 callers
    ],
)
def test_a_believable_queue_is_kept(
    server: redis.Redis, key: str, rate: float, ahead: float, caplog: pytest.LogCaptureFixture
) -> None:
    server.set(KEY_PREFIX + key, _redis_now_us(server) + int(ahead * 1_000_000))
    with caplog.at_level(logging.WARNING, logger="opero"):
        wait = RedisRateLimiter(rate, REDIS_URL, key).reserve(0.0)
    assert ahead - 1 < wait <= ahead
    assert _opero_records(caplog) == []


def test_garbage_in_the_slot_key_counts_as_no_slot(server: redis.Redis, key: str) -> None:
    for junk in (b"nan", b"soon", b"-1e300", b"1e300"):
        server.set(KEY_PREFIX + key, junk)
        # on_error="raise": a script error must not pass for a grant of the local fallback
        assert RedisRateLimiter(1, REDIS_URL, key, "raise").reserve(0.0) == 0.0
        server.delete(KEY_PREFIX + key)
