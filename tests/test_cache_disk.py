"""The disk store (opero.cache.disk): what the contract suite cannot say for every store."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import diskcache
import platformdirs
import pytest

from opero import clear_cache, opero
from opero.cache.disk import DiskCache, default_directory, disk_cache
from opero.errors import MissingExtraError

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from opero import opero

    cache_dir, marker, namespace = sys.argv[1:]


    @opero(cache=True, cache_backend="disk", cache_dir=cache_dir, cache_namespace=namespace)
    def expensive(x, options):
        with open(marker, "a") as f:
            f.write("computed\\n")
        return {"x": x, "options": options}


    print(expensive(21, {"b": 2, "a": 1}))
    """
)


def run_script(script: Path, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_two_fresh_interpreters_share_one_disk_cache(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    marker = tmp_path / "computed.txt"
    args = (str(tmp_path / "cache"), str(marker), "opero-test-xproc")
    first = run_script(script, *args)
    second = run_script(script, *args)
    assert first == second == "{'x': 21, 'options': {'b': 2, 'a': 1}}\n"
    assert marker.read_text() == "computed\n"  # the second interpreter did not recompute


def test_directory_comes_from_option_then_env_then_platform(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPERO_CACHE_DIR", raising=False)
    assert default_directory() == Path(platformdirs.user_cache_dir("opero", appauthor=False))
    monkeypatch.setenv("OPERO_CACHE_DIR", str(tmp_path / "from-env"))
    assert default_directory() == tmp_path / "from-env"

    @opero(cache=True, cache_backend="disk")
    def from_env() -> int:
        return 1

    @opero(cache=True, cache_backend="disk", cache_dir=tmp_path / "from-option")
    def from_option() -> int:
        return 2

    from_env()
    from_option()
    assert from_env.opero_chain.cache.backend.directory == tmp_path / "from-env"  # type: ignore[attr-defined]
    assert (tmp_path / "from-env" / "cache.db").exists()
    assert (tmp_path / "from-option" / "cache.db").exists()


def test_functions_sharing_a_directory_share_one_store(tmp_path: Path) -> None:
    assert disk_cache(tmp_path) is disk_cache(str(tmp_path))
    assert disk_cache(tmp_path) is not disk_cache(tmp_path / "other")


def test_ttl_is_stored_with_the_entry(tmp_path: Path) -> None:
    @opero(cache=True, cache_backend="disk", cache_dir=tmp_path, cache_ttl=60)
    def short(x: int) -> int:
        return x

    @opero(cache=True, cache_backend="disk", cache_dir=tmp_path)
    def forever(x: int) -> int:
        return x

    short(1)
    forever(1)
    raw = diskcache.Cache(str(tmp_path))
    try:
        _, expires = raw.get(short.opero_chain.cache.key((1,), {}), expire_time=True)  # type: ignore[attr-defined]
        assert time.time() + 58 < expires <= time.time() + 60
        _, never = raw.get(forever.opero_chain.cache.key((1,), {}), expire_time=True)  # type: ignore[attr-defined]
        assert never is None
    finally:
        raw.close()


@pytest.mark.parametrize("damage", ["corrupt", "unwritable"])
def test_a_corrupt_or_unwritable_store_runs_calls_uncached_then_recovers(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    if damage == "corrupt":
        directory = tmp_path / "cache"
        directory.mkdir()
        (directory / "cache.db").write_bytes(b"this is not an SQLite database" * 100)
    else:
        (tmp_path / "a-file").write_text("")
        directory = tmp_path / "a-file" / "cache"  # cannot be created under a regular file
    calls: list[int] = []

    @opero(cache=True, cache_backend="disk", cache_dir=directory)
    def work(x: int) -> int:
        calls.append(x)
        return x

    with caplog.at_level(logging.INFO, logger="opero"):
        assert [work(1) for _ in range(3)] == [1, 1, 1]
        assert len(calls) == 3
        assert [r.levelname for r in caplog.records] == ["WARNING"]
        # the user removes the damage: the store opens on the next call and caching resumes
        if damage == "corrupt":
            (directory / "cache.db").unlink()
        else:
            (tmp_path / "a-file").unlink()
        assert [work(1) for _ in range(3)] == [1, 1, 1]
    assert len(calls) == 4
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]


def test_an_entry_written_by_someone_else_is_a_miss(tmp_path: Path) -> None:
    calls: list[int] = []

    @opero(cache=True, cache_backend="disk", cache_dir=tmp_path)
    def work(x: int) -> int:
        calls.append(x)
        return x

    key = work.opero_chain.cache.key((1,), {})  # type: ignore[attr-defined]
    raw = diskcache.Cache(str(tmp_path))
    try:
        raw.set(key, {"not": "bytes"})  # diskcache pickles it itself: not opero's format
        assert work(1) == work(1) == 1
        assert len(calls) == 1
        assert isinstance(raw.get(key), bytes)
    finally:
        raw.close()


def test_large_values_round_trip(tmp_path: Path) -> None:
    @opero(cache=True, cache_backend="disk", cache_dir=tmp_path)
    def big(n: int) -> bytes:
        return bytes(range(256)) * n

    assert big(1000) == big(1000) == bytes(range(256)) * 1000  # stored as a file by diskcache


def test_clear_cache_removes_one_namespace(tmp_path: Path) -> None:
    def make(namespace: str) -> object:
        @opero(cache=True, cache_backend="disk", cache_dir=tmp_path, cache_namespace=namespace)
        def value(x: int) -> int:
            return x

        return value

    keep, drop = make("keep"), make("drop")
    for x in range(3):
        keep(x)  # type: ignore[operator]
        drop(x)  # type: ignore[operator]
    assert clear_cache("drop", "disk", cache_dir=tmp_path) == 3
    assert clear_cache("drop", "disk", cache_dir=tmp_path) == 0
    assert clear_cache("keep", "disk", cache_dir=tmp_path) == 3


async def test_async_functions_do_not_run_sqlite_on_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    released = threading.Event()
    seen: list[bool] = []
    original = DiskCache.get

    def slow_get(self: DiskCache, key: str) -> bytes | None:
        # Blocks until a task on the loop runs: that can only happen if get is off the loop.
        seen.append(released.wait(5))
        return original(self, key)

    monkeypatch.setattr(DiskCache, "get", slow_get)

    @opero(cache=True, cache_backend="disk", cache_dir=tmp_path)
    async def work(x: int) -> int:
        return x

    async def release() -> None:
        released.set()

    assert (await asyncio.gather(work(1), release()))[0] == 1
    assert seen == [True]


def test_missing_extra_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "diskcache", None)
    with pytest.raises(MissingExtraError, match=r"opero\[disk\]") as info:
        opero(cache=True, cache_backend="disk", cache_dir=tmp_path / "fresh")(lambda: 1)
    assert info.value.extra == "disk"
    assert "diskcache" in str(info.value)


def test_missing_platformdirs_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPERO_CACHE_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "platformdirs", None)
    with pytest.raises(MissingExtraError, match=r"opero\[disk\]"):
        opero(cache=True, cache_backend="disk")(lambda: 1)


def test_cache_dir_without_disk_is_refused() -> None:
    with pytest.raises(ValueError, match="cache_dir"):
        opero(cache=True, cache_dir="/tmp/x")(lambda: 1)


CONCURRENT = textwrap.dedent(
    """
    import logging, sys

    from opero import configure_logging, opero

    configure_logging(logging.WARNING)
    cache_dir, worker = sys.argv[1:]


    @opero(cache=True, cache_backend="disk", cache_dir=cache_dir, cache_namespace="many")
    def square(x):
        return x * x


    assert [square(x) for x in range(100)] == [x * x for x in range(100)]
    print(worker)
    """
)


def test_processes_share_one_directory_at_the_same_time(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(CONCURRENT)
    cache_dir = str(tmp_path / "cache")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), cache_dir, str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs
    assert [err for _, err in outputs] == ["", "", "", ""]  # no store warnings
    raw = diskcache.Cache(cache_dir)
    try:
        assert len(raw) == 100
    finally:
        raw.close()
