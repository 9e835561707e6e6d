"""One contract for every cache store: memory, disk, Redis and a user-defined CacheBackend.

Each test runs once per store and once for a sync and an async function (``mode``). The stores
differ only in the ``Store`` helper below; the rules are the same for all of them (issue 3).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Mode
from opero import CacheBackend, clear_cache, opero
from opero._clock import clock
from opero.errors import CacheKeyError

TTL = 0.3  # real seconds: disk and Redis expire entries on their own clocks


class DictBackend:
    """The smallest user-defined store: a dict with expiry, plus async twins."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[bytes, float | None]] = {}

    def get(self, key: str) -> bytes | None:
        entry = self.data.get(key)
        if entry is None:
            return None
        if entry[1] is not None and entry[1] <= clock.monotonic():
            del self.data[key]
            return None
        return entry[0]

    def set(self, key: str, value: bytes, ttl: float | None) -> None:
        self.data[key] = (value, None if ttl is None else clock.monotonic() + ttl)

    def delete(self, key: str) -> None:
        self.data.pop(key, None)

    def clear(self, prefix: str) -> int:
        doomed = [k for k in self.data if k.startswith(prefix)]
        for k in doomed:
            del self.data[k]
        return len(doomed)

    async def aget(self, key: str) -> bytes | None:
        return self.get(key)

    async def aset(self, key: str, value: bytes, ttl: float | None) -> None:
        self.set(key, value, ttl)

    async def adelete(self, key: str) -> None:
        self.delete(key)

    async def aclear(self, prefix: str) -> int:
        return self.clear(prefix)


class Store:
    """How a test reaches one store: the @opero options that select it, and its raw bytes."""

    def __init__(self, name: str, namespace: str, backend: object, **extra: object) -> None:
        self.name = name
        self.namespace = namespace
        self.backend = backend
        self.extra = extra

    def __repr__(self) -> str:
        return self.name

    def options(self, **overrides: object) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "cache": True,
            "cache_backend": self.backend,
            "cache_namespace": self.namespace,
            **self.extra,
        }
        opts.update(overrides)
        return opts

    def clear(self, namespace: str | None = None) -> int:
        return clear_cache(
            namespace=namespace or self.namespace,
            cache_backend=self.backend,
            **({"cache_dir": self.extra["cache_dir"]} if "cache_dir" in self.extra else {}),
        )

    @property
    def serialising(self) -> bool:
        return self.name != "memory"

    def raw(self, fn: Any) -> CacheBackend:
        """The store behind a decorated function (only for stores that hold bytes)."""
        backend: CacheBackend = fn.opero_chain.cache.backend
        return backend


@pytest.fixture(params=["memory", "disk", "redis", "custom"])
def store(request: pytest.FixtureRequest, test_namespace: str, tmp_path: Path) -> Iterator[Store]:
    name = request.param
    if name == "memory":
        yield Store(name, test_namespace, "memory")
    elif name == "disk":
        yield Store(name, test_namespace, "disk", cache_dir=tmp_path / "cache")
    elif name == "redis":
        url = request.getfixturevalue("redis_url")
        request.getfixturevalue("redis_client")  # deletes this namespace's keys afterwards
        yield Store(name, test_namespace, url)
    else:
        yield Store(name, test_namespace, DictBackend())


def concurrently(mode: Mode, fn: Callable[..., Any], args: tuple[Any, ...], n: int) -> list[Any]:
    """Call ``fn(*args)`` ``n`` times at once: threads for sync, tasks on one loop for async."""
    if mode.is_async:

        async def main() -> list[Any]:
            return list(await asyncio.gather(*(fn(*args) for _ in range(n))))

        return asyncio.run(main())
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        results[i] = fn(*args)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def counted(mode: Mode, body: Callable[..., Any]) -> tuple[Callable[..., Any], list[Any]]:
    """``body`` (as sync or async per ``mode``) and the list of calls that reached it."""
    calls: list[Any] = []

    @functools.wraps(body)
    def record(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return body(*args, **kwargs)

    return mode.fn(record), calls


def test_a_hit_does_not_recompute(store: Store, mode: Mode) -> None:
    def double(x: int) -> int:
        return x * 2

    fn, calls = counted(mode, double)
    f = opero(**store.options())(fn)
    assert [mode.run(f, 2), mode.run(f, 2), mode.run(f, 3)] == [4, 4, 6]
    assert len(calls) == 2


@pytest.mark.parametrize("result", [None, 0, "", [], False])
def test_none_and_falsy_results_are_cached(store: Store, mode: Mode, result: object) -> None:
    def falsy() -> object:
        return result

    fn, calls = counted(mode, falsy)
    f = opero(**store.options())(fn)
    assert mode.run(f) == result
    assert mode.run(f) == result
    assert len(calls) == 1


def test_exceptions_are_never_cached(store: Store, mode: Mode) -> None:
    outcomes = ["fail", "second"]  # plain values: the closure joins the function's fingerprint

    def flaky() -> object:
        outcome = outcomes.pop(0)
        if outcome == "fail":
            raise ValueError("first")
        return outcome

    fn, calls = counted(mode, flaky)
    f = opero(**store.options())(fn)
    with pytest.raises(ValueError, match="first"):
        mode.run(f)
    assert mode.run(f) == "second"
    assert mode.run(f) == "second"
    assert len(calls) == 2


def test_keys_tell_one_from_true_and_ignore_dict_order(store: Store, mode: Mode) -> None:
    def echo(x: object) -> str:
        return repr(x)

    fn, calls = counted(mode, echo)
    f = opero(**store.options())(fn)
    assert [mode.run(f, v) for v in (1, 1.0, True, "1")] == ["1", "1.0", "True", "'1'"]
    assert len(calls) == 4
    mode.run(f, {"a": 1, "b": 2})
    mode.run(f, {"b": 2, "a": 1})
    assert len(calls) == 5


def test_defaults_and_keywords_share_a_key(store: Store, mode: Mode) -> None:
    def add(a: int, b: int = 10) -> int:
        return a + b

    fn, calls = counted(mode, add)
    f = opero(**store.options())(fn)
    assert {mode.run(f, 1), mode.run(f, 1, 10), mode.run(f, a=1), mode.run(f, 1, b=10)} == {11}
    assert len(calls) == 1


def test_cache_key_overrides_the_argument_part(store: Store, mode: Mode) -> None:
    def fetch(url: str, session: object) -> str:
        return url.upper()

    fn, calls = counted(mode, fetch)
    f = opero(**store.options(cache_key=lambda url, session: url))(fn)
    assert mode.run(f, "a", threading.Lock()) == "A"
    assert mode.run(f, "a", threading.Lock()) == "A"
    assert len(calls) == 1


def test_ttl_expires_entries(store: Store, mode: Mode) -> None:
    def stamp() -> int:
        return len(calls)

    fn, calls = counted(mode, stamp)
    f = opero(**store.options(cache_ttl=TTL))(fn)
    assert mode.run(f) == mode.run(f) == 1
    time.sleep(TTL + 0.15)
    assert mode.run(f) == 2
    assert len(calls) == 2


@pytest.mark.parametrize("suffix", ["-other", ":sub"])  # "ns:sub" is not inside "ns"
def test_namespaces_are_separate(store: Store, mode: Mode, suffix: str) -> None:
    def make(namespace: str) -> tuple[Callable[..., Any], list[Any]]:
        def shared_name(x: int) -> int:
            return x

        fn, calls = counted(mode, shared_name)
        return opero(**store.options(cache_namespace=namespace))(fn), calls

    other = store.namespace + suffix
    f, f_calls = make(store.namespace)
    g, g_calls = make(other)
    try:
        mode.run(f, 1)
        mode.run(g, 1)
        assert (len(f_calls), len(g_calls)) == (1, 1)  # same function and arguments, no sharing
        assert store.clear() == 1  # clears only its own namespace
        mode.run(f, 1)
        mode.run(g, 1)
        assert (len(f_calls), len(g_calls)) == (2, 1)
    finally:
        store.clear(other)


def test_cache_clear_removes_only_that_functions_entries(store: Store, mode: Mode) -> None:
    def first(x: int) -> int:
        return x

    def second(x: int) -> int:
        return x

    f_fn, f_calls = counted(mode, first)
    g_fn, g_calls = counted(mode, second)
    f = opero(**store.options())(f_fn)
    g = opero(**store.options())(g_fn)
    for x in (1, 2):
        mode.run(f, x)
        mode.run(g, x)
    assert f.cache_clear() == 2  # type: ignore[attr-defined]
    for x in (1, 2):
        mode.run(f, x)
        mode.run(g, x)
    assert (len(f_calls), len(g_calls)) == (4, 2)


def test_single_flight_runs_concurrent_identical_calls_once(store: Store, mode: Mode) -> None:
    calls: list[int] = []

    if mode.is_async:

        async def slow(x: int) -> int:
            calls.append(x)
            await asyncio.sleep(0.1)
            return x * 3

        fn: Callable[..., Any] = slow
    else:

        def slow_sync(x: int) -> int:
            calls.append(x)
            time.sleep(0.1)  # let every other thread reach the flight before finishing
            return x * 3

        fn = slow_sync
    f = opero(**store.options())(fn)
    assert concurrently(mode, f, (5,), 8) == [15] * 8
    assert calls == [5]


def test_unserialisable_argument_names_the_parameter(store: Store, mode: Mode) -> None:
    def work(data: object) -> int:
        return 1

    f = opero(**store.options())(mode.fn(work))
    with pytest.raises(CacheKeyError, match="'data'"):
        mode.run(f, threading.Lock())


class Service:
    def __init__(self, region: str) -> None:
        self.region = region
        self.calls = 0

    def __opero_key__(self) -> object:
        return self.region


def test_methods_key_self_by_its_state(store: Store, mode: Mode) -> None:
    calls: list[str] = []

    def price(self: Service, item: str) -> str:
        calls.append(item)
        return f"{self.region}:{item}"

    price.__qualname__ = "Service.price"
    f = opero(**store.options())(mode.fn(price))
    assert mode.run(f, Service("eu"), "x") == "eu:x"
    assert mode.run(f, Service("eu"), "x") == "eu:x"  # another instance, same key
    assert mode.run(f, Service("us"), "x") == "us:x"
    assert calls == ["x", "x"]


class Plain:
    def __init__(self, region: str) -> None:
        self.region = region


def test_self_without_opero_key_is_keyed_by_its_attributes(store: Store, mode: Mode) -> None:
    calls: list[str] = []

    def price(self: object, item: str) -> str:
        calls.append(item)
        return item

    price.__qualname__ = "Plain.price"
    f = opero(**store.options())(mode.fn(price))
    mode.run(f, Plain("eu"), "x")
    mode.run(f, Plain("eu"), "x")
    mode.run(f, Plain("us"), "x")
    assert calls == ["x", "x"]
    holder = Plain("eu")
    holder.lock = threading.Lock()  # type: ignore[attr-defined]
    with pytest.raises(CacheKeyError, match="'self'"):
        mode.run(f, holder, "x")


# --- functions that share a name, and versions of one function ----------------------------------


def test_functions_sharing_a_name_never_share_entries(store: Store, mode: Mode) -> None:
    inc = opero(**store.options())(mode.fn(lambda x: x + 1))
    scale = opero(**store.options())(mode.fn(lambda x: x * 100))
    assert [mode.run(inc, 5), mode.run(scale, 5)] == [6, 500]

    def make(n: int) -> Callable[..., Any]:
        def add(x: int) -> int:
            return x + n

        return opero(**store.options())(mode.fn(add))

    assert [mode.run(make(1), 5), mode.run(make(1000), 5), mode.run(make(1), 6)] == [6, 1005, 7]


@pytest.mark.parametrize("store", ["disk", "redis", "custom"], indirect=True)
def test_cache_clear_removes_every_version_of_a_function(store: Store, mode: Mode) -> None:
    def make(n: int) -> Callable[..., Any]:
        def add(x: int) -> int:
            return x + n

        return opero(**store.options())(mode.fn(add))

    first, second = make(1), make(2)
    assert [mode.run(first, 5), mode.run(second, 5)] == [6, 7]
    assert first.cache_clear() == 2  # type: ignore[attr-defined]
    assert second.cache_clear() == 0  # type: ignore[attr-defined]


def test_a_closure_value_that_cannot_be_keyed(store: Store, mode: Mode) -> None:
    lock = threading.Lock()

    def locked(x: int) -> int:
        with lock:
            return x

    if store.serialising:  # a shared store: refused when decorating, naming the variable
        with pytest.raises(CacheKeyError, match="'lock'"):
            opero(**store.options())(mode.fn(locked))
    else:  # the memory store is the function's own: closures never matter there
        assert mode.run(opero(**store.options())(mode.fn(locked)), 1) == 1
    chosen = opero(**store.options(cache_key=lambda x: x))(mode.fn(locked))
    assert mode.run(chosen, 2) == mode.run(chosen, 2) == 2


SCRIPT = """
import sys
from opero import opero

calls = []

@opero(cache=True, cache_backend="disk", cache_dir=sys.argv[1])
def compute(x):
    calls.append(x)
    return {body}

if len(sys.argv) > 2:
    print(compute.cache_clear())
else:
    print(compute(1), len(calls))
"""


def test_scripts_and_versions_of_a_function_never_share_disk_entries(tmp_path: Path) -> None:
    # Two scripts each define __main__.compute; one of them is then edited. Each run is a fresh
    # interpreter over one disk cache, as when a user runs them one after the other.
    cache_dir = str(tmp_path / "cache")

    def run(script: str, body: str, *extra: str) -> str:
        path = tmp_path / script
        path.write_text(SCRIPT.format(body=body))
        done = subprocess.run(
            [sys.executable, str(path), cache_dir, *extra],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return done.stdout.strip()

    assert run("s1.py", "f'one:{x + 1}'") == "one:2 1"
    assert run("s2.py", "f'two:{x * 100}'") == "two:100 1"  # not s1's entry
    assert run("s1.py", "f'one:{x + 1}'") == "one:2 0"  # its own entry, from disk
    assert run("s1.py", "f'edited:{x + 2}'") == "edited:3 1"  # an edit is a new version
    assert run("s1.py", "f'edited:{x + 2}'") == "edited:3 0"
    assert run("s1.py", "None", "clear") == "3"  # cache_clear() removes every version
    assert run("s2.py", "f'two:{x * 100}'") == "two:100 1"


# --- stores that hold bytes ---------------------------------------------------------------------

serialising = pytest.mark.parametrize("store", ["disk", "redis", "custom"], indirect=True)


@serialising
def test_a_garbage_entry_is_a_miss_and_is_overwritten(store: Store, mode: Mode) -> None:
    def value(x: int) -> dict[str, int]:
        return {"x": x}

    fn, calls = counted(mode, value)
    f = opero(**store.options())(fn)
    key = f.opero_chain.cache.key((1,), {})  # type: ignore[attr-defined]
    backend = store.raw(f)
    backend.set(key, b"\x80\x04garbage that is no pickle", None)
    assert mode.run(f, 1) == {"x": 1}
    assert mode.run(f, 1) == {"x": 1}
    assert len(calls) == 1
    assert backend.get(key) != b"\x80\x04garbage that is no pickle"


@serialising
def test_a_failing_store_never_fails_the_call(
    store: Store, mode: Mode, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def value(x: int) -> int:
        return x

    fn, calls = counted(mode, value)
    f = opero(**store.options())(fn)
    backend = store.raw(f)

    def broken(*args: object) -> None:
        raise OSError("store is down")

    async def abroken(*args: object) -> None:
        raise OSError("store is down")

    for name in ("get", "set"):
        monkeypatch.setattr(type(backend), name, broken)
        monkeypatch.setattr(type(backend), "a" + name, abroken)
    with caplog.at_level(logging.WARNING, logger="opero"):
        assert [mode.run(f, 1) for _ in range(3)] == [1, 1, 1]
    assert len(calls) == 3
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "store is down" in caplog.records[0].getMessage()
    monkeypatch.undo()
    assert [mode.run(f, 1) for _ in range(3)] == [1, 1, 1]
    assert len(calls) == 4  # caching resumed


@serialising
def test_an_unpicklable_result_is_returned_uncached_with_one_warning(
    store: Store, mode: Mode, caplog: pytest.LogCaptureFixture
) -> None:
    def make() -> object:
        return threading.Lock()

    fn, calls = counted(mode, make)
    f = opero(**store.options())(fn)
    with caplog.at_level(logging.WARNING, logger="opero"):
        assert isinstance(mode.run(f), type(threading.Lock()))
        assert isinstance(mode.run(f), type(threading.Lock()))
    assert len(calls) == 2
    assert len(caplog.records) == 1


@serialising
def test_json_serializer_caches_plain_values_only(
    store: Store, mode: Mode, caplog: pytest.LogCaptureFixture
) -> None:
    def make(kind: str) -> object:
        return {"a": [1, 2.5, None, True, "é"]} if kind == "plain" else (1, 2)

    fn, calls = counted(mode, make)
    f = opero(**store.options(cache_serializer="json"))(fn)
    key = f.opero_chain.cache.key(("plain",), {})  # type: ignore[attr-defined]
    assert mode.run(f, "plain") == mode.run(f, "plain") == {"a": [1, 2.5, None, True, "é"]}
    assert store.raw(f).get(key) == '{"a":[1,2.5,null,true,"é"]}'.encode()
    with caplog.at_level(logging.WARNING, logger="opero"):
        # a tuple would come back as a list: not cached, so every call returns a real tuple
        assert mode.run(f, "tuple") == (1, 2)
        assert mode.run(f, "tuple") == (1, 2)
    assert len(calls) == 3
    assert "JSON" in caplog.text


# --- choosing a store ---------------------------------------------------------------------------


def test_a_typo_in_the_backend_name_fails_when_decorating() -> None:
    with pytest.raises(ValueError, match="cache_backend='rediss' is not available"):
        opero(cache=True, cache_backend="rediss")(lambda: 1)


def test_a_backend_class_or_incomplete_object_is_refused() -> None:
    with pytest.raises(ValueError, match="an instance, not the class DictBackend"):
        opero(cache=True, cache_backend=DictBackend)(lambda: 1)

    class SyncOnly:
        def get(self, key: str) -> bytes | None:
            return None

    with pytest.raises(ValueError, match="missing: set, delete, clear, aget, aset"):
        opero(cache=True, cache_backend=SyncOnly())(lambda: 1)


def test_serializer_names_are_checked() -> None:
    with pytest.raises(ValueError, match="cache_serializer must be one of 'pickle', 'json'"):
        opero(cache=True, cache_backend=DictBackend(), cache_serializer="yaml")(lambda: 1)
    with pytest.raises(ValueError, match="memory cache keeps the objects"):
        opero(cache=True, cache_serializer="json")(lambda: 1)
