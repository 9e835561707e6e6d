"""The Redis store (opero.cache.redis): what the contract suite cannot say for every store."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import Mode, free_port, start_redis_server, stop_redis_server
from opero import clear_cache, opero
from opero.cache import redis as redis_backend
from opero.cache.redis import RedisCache, redis_cache, resolve_url
from opero.errors import MissingExtraError
from opero.testing import fake_time

pytestmark = pytest.mark.redis

SCRIPT = textwrap.dedent(
    """
    import sys

    from opero import opero

    marker, namespace = sys.argv[1:]


    @opero(cache=True, cache_backend="redis", cache_namespace=namespace, cache_ttl=60)
    def expensive(x, options):
        with open(marker, "a") as f:
            f.write("computed\\n")
        return {"x": x, "options": options}


    print(expensive(21, {"b": 2, "a": 1}))
    """
)


class OwnServer:
    """A redis-server this test starts, stops and restarts on one port. KEYS and FLUSHDB are
    disabled in it, so a test passing against it shows opero never sends them."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = start_redis_server(
            self.port, "--rename-command", "KEYS", "", "--rename-command", "FLUSHDB", ""
        )

    def stop(self) -> None:
        if self.proc is not None:
            stop_redis_server(self.proc)
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@pytest.fixture
def own_server(redis_url: str) -> Iterator[OwnServer]:
    del redis_url  # only to skip (or fail on CI) the same way as the other Redis tests
    server = OwnServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
        redis_backend._stores.pop(server.url, None)


def test_two_fresh_interpreters_share_one_redis_cache(
    tmp_path: Path, redis_url: str, redis_client: Any, test_namespace: str
) -> None:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    marker = tmp_path / "computed.txt"
    env = {**os.environ, "OPERO_REDIS_URL": redis_url}
    outputs = [
        subprocess.run(
            [sys.executable, str(script), str(marker), test_namespace],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            env=env,
        ).stdout
        for _ in range(2)
    ]
    assert outputs == ["{'x': 21, 'options': {'b': 2, 'a': 1}}\n"] * 2
    assert marker.read_text() == "computed\n"  # the second interpreter did not recompute
    assert len(list(redis_client.scan_iter(match=f"{test_namespace}:*"))) == 1


def test_redis_itself_expires_entries(
    mode: Mode, redis_url: str, redis_client: Any, test_namespace: str
) -> None:
    def value(x: int) -> int:
        return x

    options: dict[str, Any] = {
        "cache": True,
        "cache_backend": redis_url,
        "cache_namespace": test_namespace,
    }
    short = opero(**options, cache_ttl=30)(mode.fn(value))
    forever = opero(**options, cache_key=lambda x: ("forever", x))(mode.fn(value))
    mode.run(short, 1)
    mode.run(forever, 1)
    short_key = short.opero_chain.cache.key((1,), {})  # type: ignore[attr-defined]
    forever_key = forever.opero_chain.cache.key((1,), {})  # type: ignore[attr-defined]
    assert short_key != forever_key
    assert 29_000 < redis_client.pttl(short_key) <= 30_000
    assert redis_client.pttl(forever_key) == -1


def test_a_wrong_type_at_the_key_is_overwritten(
    redis_url: str, redis_client: Any, test_namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    @opero(cache=True, cache_backend=redis_url, cache_namespace=test_namespace)
    def work(x: int) -> int:
        calls.append(x)
        return x

    key = work.opero_chain.cache.key((1,), {})  # type: ignore[attr-defined]
    redis_client.rpush(key, "someone else's list")
    assert work(1) == work(1) == 1
    assert len(calls) == 1
    assert redis_client.type(key) == b"string"


def test_redis_stopped_mid_run(
    own_server: OwnServer, mode: Mode, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    def work(x: int) -> int:
        calls.append(x)
        return x * 10

    f = opero(cache=True, cache_backend=own_server.url, cache_namespace="mid-run")(mode.fn(work))
    backend: RedisCache = f.opero_chain.cache.backend  # type: ignore[attr-defined]
    with fake_time() as t, caplog.at_level(logging.INFO, logger="opero"):
        assert mode.run(f, 1) == mode.run(f, 1) == 10
        assert len(calls) == 1
        own_server.stop()
        assert [mode.run(f, 1) for _ in range(5)] == [10] * 5  # every call succeeds, uncached
        assert len(calls) == 6
        assert [r.levelname for r in caplog.records] == ["WARNING"]
        # While the back-off lasts, calls do not touch the network at all.
        with pytest.raises(redis_backend.ServerUnavailable):
            backend.get("mid-run:anything")
        own_server.start()  # same port, empty (no persistence)
        t.advance(redis_backend.BACKOFF_MIN)
        assert [mode.run(f, 1) for _ in range(3)] == [10] * 3
        assert len(calls) == 7  # caching resumed: one recompute, then hits
        assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]
    assert own_server.client().get(f.opero_chain.cache.key((1,), {})) is not None  # type: ignore[attr-defined]


def test_back_off_doubles_while_the_server_stays_down(own_server: OwnServer) -> None:
    backend = RedisCache(own_server.url)
    own_server.stop()
    with fake_time() as t:
        for delay in (1, 2, 4, 8, 16, 30, 30):
            with pytest.raises(redis.ConnectionError) as info:
                backend.get("x")
            assert not isinstance(info.value, redis_backend.ServerUnavailable)  # a real attempt
            t.advance(delay - 0.01)
            with pytest.raises(redis_backend.ServerUnavailable):
                backend.get("x")  # still backing off: no network
            t.advance(0.01)
        own_server.start()
        assert backend.get("x") is None
        backend.set("x", b"1", 1)
        own_server.stop()
        with pytest.raises(redis.ConnectionError):
            backend.get("x")
        t.advance(redis_backend.BACKOFF_MIN)  # a success reset the back-off to its minimum
        with pytest.raises(redis.ConnectionError) as info:
            backend.get("x")
        assert not isinstance(info.value, redis_backend.ServerUnavailable)


def test_timeouts_are_short_and_redis_py_does_not_retry(own_server: OwnServer) -> None:
    backend = RedisCache(own_server.url)
    kwargs = backend.client.connection_pool.connection_kwargs
    assert kwargs["socket_connect_timeout"] == redis_backend.CONNECT_TIMEOUT
    assert kwargs["socket_timeout"] == redis_backend.SOCKET_TIMEOUT
    connection = backend.client.connection_pool.get_connection()
    try:
        assert connection.retry.get_retries() == 0  # the breaker decides when to try again
    finally:
        backend.client.connection_pool.release(connection)
    custom = RedisCache(own_server.url + "?socket_timeout=5&socket_connect_timeout=2")
    assert custom.client.connection_pool.connection_kwargs["socket_timeout"] == 5
    assert custom.client.connection_pool.connection_kwargs["socket_connect_timeout"] == 2


def _connections_received(server: OwnServer) -> int:
    client = server.client()
    try:
        return int(client.info("stats")["total_connections_received"])
    finally:
        client.close()


def test_connections_are_pooled_and_reused(own_server: OwnServer, mode: Mode) -> None:
    def work(x: int) -> int:
        return x

    f = opero(cache=True, cache_backend=own_server.url, cache_namespace="pool")(mode.fn(work))
    before = _connections_received(own_server)
    if mode.is_async:

        async def many() -> None:
            for x in range(50):
                await f(x % 5)

        asyncio.run(many())
    else:
        for x in range(50):
            f(x % 5)
    # one for the pool, one for the counting client
    assert _connections_received(own_server) - before == 2


async def test_async_functions_use_the_asyncio_client(
    redis_url: str, redis_client: Any, test_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    @opero(cache=True, cache_backend=redis_url, cache_namespace=test_namespace)
    async def work(x: int) -> int:
        calls.append(x)
        return x

    backend: RedisCache = work.opero_chain.cache.backend  # type: ignore[attr-defined]

    def blocking(*args: object, **kwargs: object) -> None:
        raise AssertionError("the sync client was used from an async function")

    for name in ("get", "set", "execute_command"):
        monkeypatch.setattr(backend.client, name, blocking)
    assert [await work(1), await work(1)] == [1, 1]
    assert calls == [1]


def test_clear_uses_scan_on_the_prefix_only(own_server: OwnServer) -> None:
    client = own_server.client()
    try:
        client.set("aXXb:not-ours", b"1")  # matches the glob a*b:* unless * is escaped
        client.set("ab-other:x", b"1")
        for namespace in ("a*b", "ab"):

            @opero(cache=True, cache_backend=own_server.url, cache_namespace=namespace)
            def value(x: int) -> int:
                return x

            for x in range(1100):  # more than one SCAN and UNLINK batch
                value(x)
        assert clear_cache("ab", own_server.url) == 1100
        assert clear_cache("a*b", own_server.url) == 1100
        assert sorted(client.scan_iter()) == [b"aXXb:not-ours", b"ab-other:x"]
    finally:
        client.close()


async def test_async_clear(own_server: OwnServer) -> None:
    backend = RedisCache(own_server.url)
    for i in range(3):
        await backend.aset(f"ns:{i}", b"v", None)
    await backend.aset("other:1", b"v", None)
    assert await backend.aclear("ns:") == 3
    assert await backend.aget("other:1") == b"v"


def test_url_comes_from_the_option_then_env_then_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPERO_REDIS_URL", raising=False)
    assert resolve_url("redis") == "redis://localhost:6379/0"
    monkeypatch.setenv("OPERO_REDIS_URL", "redis://cache.example:6380/3")
    assert resolve_url("redis") == "redis://cache.example:6380/3"
    assert resolve_url("redis://other:1/2") == "redis://other:1/2"
    assert redis_cache("redis://other:1/2") is redis_cache("redis://other:1/2")


def test_passwords_stay_out_of_messages() -> None:
    backend = RedisCache("redis://user:s3cret@127.0.0.1:1/0")
    assert "s3cret" not in repr(backend)
    backend._breaker.failed()
    with pytest.raises(redis_backend.ServerUnavailable) as info:
        backend.get("x")
    assert "s3cret" not in str(info.value)


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    url = f"redis://127.0.0.1:6379/0?client_name=missing-{uuid.uuid4().hex}"
    with pytest.raises(MissingExtraError, match=r"opero\[redis\]") as info:
        opero(cache=True, cache_backend=url)(lambda: 1)
    assert info.value.extra == "redis"


def test_a_url_that_decodes_responses_is_refused() -> None:
    with pytest.raises(ValueError, match="decode_responses must be off"):
        opero(cache=True, cache_backend="redis://127.0.0.1:6379/0?decode_responses=True")(lambda: 1)


async def test_one_event_loop_recovers_its_pooled_connections(
    own_server: OwnServer, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    @opero(cache=True, cache_backend=own_server.url, cache_namespace="one-loop")
    async def work(x: int) -> int:
        calls.append(x)
        return x

    with fake_time() as t, caplog.at_level(logging.WARNING, logger="opero"):
        assert [await work(1) for _ in range(2)] == [1, 1]  # the loop's pool holds a connection
        own_server.stop()
        assert [await work(1) for _ in range(3)] == [1, 1, 1]
        own_server.start()
        t.advance(redis_backend.BACKOFF_MIN)
        assert [await work(1) for _ in range(3)] == [1, 1, 1]
    assert len(calls) == 1 + 3 + 1
    assert len(caplog.records) == 1


# --- what the cache shares with the Redis rate limiter (opero._redis) ---------------------------


def test_the_cache_and_the_rate_limit_share_one_pool_per_url(
    own_server: OwnServer, mode: Mode
) -> None:
    def work(x: int) -> int:
        return x

    cached = opero(cache=True, cache_backend=own_server.url, cache_namespace="shared")(
        mode.fn(work)
    )
    limited = opero(rate_limit=1000, rate_limit_backend=own_server.url, rate_limit_key="shared")(
        mode.fn(work)
    )
    before = _connections_received(own_server)
    if mode.is_async:

        async def both() -> None:
            for x in range(5):
                await cached(x)
                await limited(x)

        asyncio.run(both())
    else:
        for x in range(5):
            cached(x)
            limited(x)
    # one for the shared pool (of this process, or of this event loop), one for the counting client
    assert _connections_received(own_server) - before == 2


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:{port}/0?password=hunter2pw",
        "redis://127.0.0.1:{port}/0?db=0&password=hunter2pw&client_name=x",
        "redis://user:hunter2pw@127.0.0.1:{port}/0",
        "unix:///nonexistent/opero-{port}.sock?password=hunter2pw",
    ],
)
def test_no_password_in_warnings_or_errors(
    url: str, mode: Mode, caplog: pytest.LogCaptureFixture
) -> None:
    url = url.format(port=free_port())  # nothing listens there
    options: dict[str, Any] = {"cache": True, "cache_backend": url, "cache_namespace": "pw"}
    # Two functions on one store: the second fails fast on the back-off, whose message has the URL.
    first = opero(**options)(mode.fn(lambda x: x))
    second = opero(**options)(mode.fn(lambda x: -x))
    messages: list[str] = []
    try:
        with caplog.at_level(logging.DEBUG, logger="opero"):
            assert (mode.run(first, 1), mode.run(second, 1)) == (1, -1)
        for _ in range(2):  # a real attempt, then one refused by the back-off
            with pytest.raises(ConnectionError) as info:
                clear_cache("pw", url)
            messages.append(str(info.value))
        messages.append(repr(first.opero_chain.cache.backend))  # type: ignore[attr-defined]
    finally:
        redis_backend._stores.pop(url, None)
    assert any("failed recently" in m for m in messages)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
    assert "hunter2pw" not in caplog.text + "\n".join(messages)
    assert "***" in caplog.text


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://127.0.0.1:6379/abc", "database 'abc' is not a number"),
        ("redis://127.0.0.1:6379/0?db=x", "database 'x' is not a number"),
        ("redis://", "no host"),
        ("redis://:6379/0", "no host"),
        ("redis://localhost:99999/0", "port must be a number from 1 to 65535"),
        ("redis://localhost:0/0", "port must be a number from 1 to 65535"),
        ("redis://localhost:63x9/0", "port must be a number from 1 to 65535"),
        ("unix://", "socket's path"),
        ("http://:hunter2pw@127.0.0.1:6379/0", "scheme must be one of"),
        ("redis://127.0.0.1:6379/0?socket_timeout=soon", "socket_timeout"),
        ("redis://:hunter2pw@127.0.0.1:6379/x?password=hunter2pw", "not a number"),
    ],
)
def test_a_malformed_url_fails_when_decorating_naming_the_option(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match="cache_backend=") as info:
        opero(cache=True, cache_backend=url)(lambda: 1)
    assert problem in str(info.value)
    assert "hunter2pw" not in str(info.value)


def test_a_malformed_url_in_the_environment_names_the_option_and_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPERO_REDIS_URL", "redis://:hunter2pw@127.0.0.1:6379/abc")
    with pytest.raises(ValueError, match="cache_backend='redis' with OPERO_REDIS_URL=") as info:
        opero(cache=True, cache_backend="redis")(lambda: 1)
    assert "hunter2pw" not in str(info.value)
    assert "not a number" in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/2",
        "redis://127.0.0.1:6379",
        "redis://127.0.0.1:6379/",
        "rediss://user:pw@cache.example:6380/15?socket_timeout=3",
        "redis://[::1]:6379/0",
        "unix:///run/redis/redis.sock?db=3&password=pw",
    ],
)
def test_well_formed_urls_are_accepted(url: str) -> None:
    assert resolve_url(url) == url


def test_many_concurrent_callers_wait_for_a_connection_instead_of_failing(
    redis_url: str, redis_client: Any, test_namespace: str, mode: Mode, opero_log: Any
) -> None:
    # More callers at once than the pool has connections: a healthy server must never look dead
    # (the cache would turn off, and the shared rate limit would become per-process).
    import threading

    n = 300
    calls: list[int] = []

    def work(x: int) -> int:
        calls.append(x)
        return x

    f = opero(
        cache=True,
        cache_backend=redis_url,
        cache_namespace=test_namespace,
        rate_limit=100_000,
        rate_limit_backend=redis_url,
        rate_limit_key=f"{test_namespace}:limit",
    )(mode.fn(work))

    def all_at_once() -> list[int]:
        if mode.is_async:

            async def main() -> list[int]:
                return list(await asyncio.gather(*(f(x) for x in range(n))))

            return asyncio.run(main())
        results = [0] * n
        barrier = threading.Barrier(n)

        def one(x: int) -> None:
            barrier.wait()
            results[x] = f(x)

        threads = [threading.Thread(target=one, args=(x,)) for x in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    assert all_at_once() == list(range(n))
    assert all_at_once() == list(range(n))  # every call a hit
    assert sorted(calls) == list(range(n))
    assert [r.getMessage() for r in opero_log] == []
