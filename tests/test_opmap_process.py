"""@opmap across processes: dead workers, unpicklable errors, spawn, the shared rate limit and
cache, and Ctrl-C leaving no child processes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from opero import OpmapError, WorkerCrashedError, opmap
from opero.errors import RemoteError

pytestmark = pytest.mark.timeout(60)


CRASH_MODES = [
    ("sync", "process"),
    ("sync", "pathos"),
    ("async", "async_process"),
    ("async", "aiomultiprocess"),
]


def die_once(item: int, flag: str) -> int:
    """Kills its own worker the first time it sees item 3 (every time if ``flag`` is "never")."""
    if item == 3 and not os.path.exists(flag):
        if not flag.endswith("never"):
            Path(flag).touch()
        os._exit(7)
    time.sleep(0.01)
    return item * 2


async def adie_once(item: int, flag: str) -> int:
    if item == 3 and not os.path.exists(flag):
        Path(flag).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    await asyncio.sleep(0.01)
    return item * 2


class Unpicklable(Exception):
    def __init__(self, a: str, b: int) -> None:  # pickle re-creates it with one argument: fails
        super().__init__(f"{a}/{b}")


def raise_unpicklable(item: int) -> int:
    if item == 1:
        raise Unpicklable("bad", item)
    return item


async def araise_unpicklable(item: int) -> int:
    return raise_unpicklable(item)


def run(f: Any, items: Any, **kwargs: Any) -> Any:
    result = f(items, **kwargs)
    return asyncio.run(result) if asyncio.iscoroutine(result) else result


def _fn(kind: str, sync: Any, async_: Any) -> Any:
    return async_ if kind == "async" else sync


@pytest.mark.parametrize(("kind", "mode"), CRASH_MODES, ids=[m for _, m in CRASH_MODES])
def test_a_dead_worker_fails_its_item_and_the_map_completes(
    kind: str, mode: str, tmp_path: Path
) -> None:
    f = opmap(mode=mode, workers=2, on_error="return")(_fn(kind, die_once, adie_once))
    try:
        out = run(f, range(8), flag=str(tmp_path / "flag"))
        assert isinstance(out[3], WorkerCrashedError)
        others = [v for i, v in enumerate(out) if i != 3]
        done = [v for v in others if not isinstance(v, WorkerCrashedError)]
        if mode == "process":  # the supervised pool knows exactly which item each worker ran
            assert others == [i * 2 for i in range(8) if i != 3]
        else:  # pathos and aiomultiprocess: what was in flight with it may fail too
            assert len(done) >= 3
        assert run(f, [10, 11], flag=str(tmp_path / "flag")) == [20, 22]  # pool rebuilt
    finally:
        f.close()


def die_on_two(item: int) -> int:
    if item == 2:
        os._exit(1)
    time.sleep(0.5 if item == 0 else 0.02)
    return item


@pytest.mark.timeout(30)
def test_pathos_a_dead_worker_fails_only_the_item_it_was_running() -> None:
    # pathos used to receive every item at once, and a death failed all of them, started or not.
    f = opmap(mode="pathos", workers=2, on_error="return")(die_on_two)
    try:
        out = f(range(20))
        failed = {i for i, v in enumerate(out) if isinstance(v, WorkerCrashedError)}
        assert failed == {2}
        # Item 0 was running on the other worker when 2 died: it finishes instead of failing.
        assert [v for i, v in enumerate(out) if i != 2] == [i for i in range(20) if i != 2]
    finally:
        f.close()


@pytest.mark.timeout(30)
def test_pathos_idle_workers_killed_never_hang_the_calls_sent_to_them() -> None:
    # A worker killed while idle can hold the pool's task-queue lock: calls already handed to that
    # pool never start, and terminating it waits for the lock. Both used to hang forever.
    from opero.concurrency.pathos import PathosBackend

    backend = PathosBackend(2)
    try:
        assert backend.submit(abs, (-1,), {}).result(timeout=20) == 1
        pool = backend._pool
        assert pool is not None
        for proc in pool.mp._pool:
            os.kill(proc.pid, signal.SIGKILL)
        futures = [backend.submit(abs, (-i,), {}) for i in range(6)]
        for i, future in enumerate(futures):
            error = future.exception(timeout=20)
            assert isinstance(error, WorkerCrashedError) or future.result() == i
        assert backend.submit(abs, (-7,), {}).result(timeout=20) == 7
    finally:
        backend.close()


@pytest.mark.timeout(30)
def test_pathos_a_call_cancelled_while_queued_never_runs(tmp_path: Path) -> None:
    from opero.concurrency.pathos import PathosBackend

    backend = PathosBackend(1)
    try:
        first = backend.submit(time.sleep, (0.3,), {})
        queued = backend.submit(Path.touch, (tmp_path / "ran",), {})
        assert queued.cancel()
        first.result(timeout=20)
        assert backend.submit(abs, (-3,), {}).result(timeout=20) == 3
        assert not (tmp_path / "ran").exists()
    finally:
        backend.close()


@pytest.mark.parametrize(("kind", "mode"), CRASH_MODES, ids=[m for _, m in CRASH_MODES])
def test_a_crash_is_retried_when_retry_on_covers_it(kind: str, mode: str, tmp_path: Path) -> None:
    f = opmap(mode=mode, workers=2, retries=2, min_delay=0.01, retry_on=WorkerCrashedError)(
        _fn(kind, die_once, adie_once)
    )
    try:
        assert run(f, range(6), flag=str(tmp_path / "flag")) == [i * 2 for i in range(6)]
    finally:
        f.close()


@pytest.mark.parametrize(("kind", "mode"), CRASH_MODES, ids=[m for _, m in CRASH_MODES])
def test_an_exception_whose_constructor_cannot_take_its_args_back_arrives_as_itself(
    kind: str, mode: str
) -> None:
    f = opmap(mode=mode, workers=2)(_fn(kind, raise_unpicklable, araise_unpicklable))
    try:
        with pytest.raises(OpmapError) as info:
            run(f, [0, 1, 2])
    finally:
        f.close()
    err = info.value.errors[1]
    assert type(err) is Unpicklable  # so retry_on and except clauses still match it
    assert str(err) == "bad/1"
    assert err.args == ("bad/1",)
    assert info.value.results[0] == 0
    assert info.value.results[2] == 2


class HoldsALock(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def raise_holding_a_lock(item: int) -> int:
    raise HoldsALock(f"no {item}")


async def araise_holding_a_lock(item: int) -> int:
    return raise_holding_a_lock(item)


@pytest.mark.parametrize(
    ("kind", "mode"),
    [("sync", "process"), ("async", "async_process"), ("async", "aiomultiprocess")],
)
def test_an_exception_that_cannot_travel_arrives_as_remote_error(kind: str, mode: str) -> None:
    f = opmap(mode=mode, workers=2, on_error="return")(
        _fn(kind, raise_holding_a_lock, araise_holding_a_lock)
    )
    try:
        [err] = run(f, [7])
    finally:
        f.close()
    assert isinstance(err, RemoteError)
    assert err.type_name.endswith("HoldsALock")
    assert err.message == "no 7"
    assert "raise_holding_a_lock" in err.remote_traceback


def fail_first_time(item: int, folder: str) -> int:
    flag = Path(folder, str(item))
    if not flag.exists():
        flag.touch()
        raise Unpicklable("busy", item)
    return item


def test_retry_on_matches_an_exception_rebuilt_in_the_caller(tmp_path: Path) -> None:
    f = opmap(mode="process", workers=2, retries=1, min_delay=0.01, retry_on=Unpicklable)(
        fail_first_time
    )
    try:
        assert f(range(6), folder=str(tmp_path)) == list(range(6))
    finally:
        f.close()


def raise_in_user_code(item: int) -> int:
    raise ValueError(f"bad {item}")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are Python 3.11+")
def test_the_worker_traceback_comes_with_the_exception() -> None:
    f = opmap(mode="process", workers=1, on_error="return")(raise_in_user_code)
    try:
        [err] = f([1])
    finally:
        f.close()
    assert isinstance(err, ValueError)
    [note] = err.__notes__
    assert "Traceback in the worker process" in note
    assert 'raise ValueError(f"bad {item}")' in note


def test_original_exception_type_crosses_the_process_boundary() -> None:
    def boom(item: int) -> int:
        raise KeyError(item)

    f = opmap(mode="process", workers=2, on_error="return")(boom)
    try:
        out = f([1, 2])
    finally:
        f.close()
    assert [type(e) for e in out] == [KeyError, KeyError]
    assert out[1].args == (2,)


def started_at(item: int) -> tuple[int, float, int]:
    start = time.time()
    time.sleep(0.15)  # longer than the spacing, so several workers are busy at once
    return item, start, os.getpid()


def test_one_rate_limit_for_the_whole_map_across_4_processes() -> None:
    limit = 20
    f = opmap(mode="process", workers=4, rate_limit=limit)(started_at)
    try:
        out = f(range(30))
    finally:
        f.close()
    assert [item for item, _, _ in out] == list(range(30))
    assert len({pid for _, _, pid in out}) > 1  # really spread over workers
    starts = sorted(t for _, t, _ in out)
    for i, t in enumerate(starts):
        in_window = sum(1 for s in starts[i:] if s < t + 1.0)
        assert in_window <= limit + 1


def stamp(item: object) -> tuple[object, str, int]:
    return item, uuid.uuid4().hex, os.getpid()


def test_memory_cache_is_shared_across_items_and_calls_in_process_mode() -> None:
    f = opmap(mode="process", workers=4, cache=True)(stamp)
    try:
        first = f([1, 2, 1, 2, 1, {"k": 1}, {"k": 1}])
        second = f([2, 1, {"k": 1}])
    finally:
        f.close()
    token = {repr(item): tok for item, tok, _ in first}
    assert len({tok for _, tok, _ in first}) == 3  # one real call per distinct item
    for item, tok, _ in first + second:
        assert tok == token[repr(item)]


SPAWN_SCRIPT = """
import multiprocessing, os, sys
from opero import opmap, WorkerCrashedError

def main():
    offset = 100
    closure = opmap(mode="process", workers=2)(lambda x: x + offset)
    assert closure(range(5)) == [100, 101, 102, 103, 104], closure(range(5))

    def make(scale):
        def inner(x):
            return x * scale
        return inner
    nested = opmap(mode="process", workers=2)(make(3))
    assert nested([1, 2]) == [3, 6]

    def killer(x):
        if x == 1:
            os._exit(1)
        return x
    k = opmap(mode="process", workers=2, on_error="return")(killer)
    out = k([0, 1, 2])
    assert out[0] == 0 and out[2] == 2 and isinstance(out[1], WorkerCrashedError), out
    print("ok", multiprocessing.get_start_method())

if __name__ == "__main__":
    multiprocessing.set_start_method("spawn")
    main()
"""


def test_lambdas_and_closures_work_under_spawn(tmp_path: Path) -> None:
    script = tmp_path / "spawn_check.py"
    script.write_text(textwrap.dedent(SPAWN_SCRIPT))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=50, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "spawn"]


INTERRUPT_SCRIPT = """
import asyncio, os, sys, time
from opero import opmap

PIDS = sys.argv[1]

def slow(x):
    with open(PIDS, "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    time.sleep(60)
    return x

async def aslow(x):
    with open(PIDS, "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    await asyncio.sleep(60)
    return x

if __name__ == "__main__":
    mode = sys.argv[2]
    func = aslow if mode in ("async_process", "aiomultiprocess") else slow
    options = {"plain": {}, "retries": {"retries": 2}, "chain": {"cache": True}}[sys.argv[3]]
    f = opmap(mode=mode, workers=3, **options)(func)
    try:
        result = f(range(20))
        if asyncio.iscoroutine(result):
            asyncio.run(result)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        raise
"""


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("process", "plain"),
        ("process", "retries"),
        ("process", "chain"),
        ("pathos", "plain"),
        ("async_process", "plain"),
        ("aiomultiprocess", "plain"),
    ],
    ids=["process", "process-retries", "process-chain", "pathos", "async_process", "aiomp"],
)
def test_ctrl_c_stops_promptly_and_leaves_no_child_processes(
    tmp_path: Path, mode: str, options: str
) -> None:
    script = tmp_path / "interrupt_check.py"
    script.write_text(textwrap.dedent(INTERRUPT_SCRIPT))
    pids_file = tmp_path / "pids"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(pids_file), mode, options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if pids_file.exists() and len(pids_file.read_text().split()) >= 3:
            break
        time.sleep(0.05)
    worker_pids = [int(p) for p in pids_file.read_text().split()]
    assert len(worker_pids) >= 3
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert "interrupted" in out, err
    assert "KeyboardInterrupt" in err
    time.sleep(0.2)
    for pid in worker_pids:
        assert not _alive(pid), f"worker {pid} outlived the program"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead but not yet reaped by init
    try:
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except FileNotFoundError:
        return False


def test_closing_one_function_leaves_another_working() -> None:
    f = opmap(mode="process", workers=2)(stamp)
    g = opmap(mode="process", workers=2)(stamp)
    try:
        f([1])
        g([1])
        f.close()
        assert [item for item, _, _ in g([2, 3])] == [2, 3]
        assert [item for item, _, _ in f([4])] == [4]
    finally:
        f.close()
        g.close()


def test_second_call_reuses_the_worker_processes() -> None:
    f = opmap(mode="process", workers=2)(stamp)
    try:
        first = {pid for _, _, pid in f(range(6))}
        second = {pid for _, _, pid in f(range(6))}
    finally:
        f.close()
    assert second <= first


def test_a_crash_inside_a_chunk_fails_only_the_item_that_killed_the_worker(
    tmp_path: Path,
) -> None:
    f = opmap(mode="process", workers=2, on_error="return")(die_once)
    flag = str(tmp_path / "never")  # no flag file: item 3 kills every worker that runs it
    try:
        out = f(range(64), flag=flag)  # 64 items: sent in chunks of 8
    finally:
        f.close()
    assert isinstance(out[3], WorkerCrashedError)
    assert [v for i, v in enumerate(out) if i != 3] == [i * 2 for i in range(64) if i != 3]


def logged_then_killed_once(item: int, folder: str, victim: int, work: float) -> int:
    """Logs each run of ``item`` as a file; the first run of ``victim`` is SIGKILLed, as the
    OOM killer would (it would succeed if run again)."""
    Path(folder, f"{item}-{uuid.uuid4().hex}").touch()
    if item == victim and not Path(folder, "killed").exists():
        Path(folder, "killed").touch()
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(work)
    return item


def _runs(folder: Path) -> dict[int, int]:
    runs: dict[int, int] = {}
    for path in folder.iterdir():
        if path.name != "killed":
            item = int(path.name.split("-")[0])
            runs[item] = runs.get(item, 0) + 1
    return runs


@pytest.mark.parametrize("work", [0.0, 0.015], ids=["trivial", "15ms"])
def test_a_worker_killed_mid_chunk_fails_that_item_once_and_finished_items_keep_results(
    tmp_path: Path, work: float
) -> None:
    from opero.concurrency._worker import FLUSH_EVERY

    f = opmap(mode="process", workers=2, on_error="return")(logged_then_killed_once)
    try:  # 80 items: chunks of 10; item 15 is the sixth of the second chunk
        out = f(range(80), folder=str(tmp_path), victim=15, work=work)
    finally:
        f.close()
    assert isinstance(out[15], WorkerCrashedError)  # not silently run again (retries=0)
    assert [v for i, v in enumerate(out) if i != 15] == [i for i in range(80) if i != 15]
    runs = _runs(tmp_path)
    assert runs[15] == 1
    assert sorted(runs) == list(range(80))
    twice = sorted(i for i, n in runs.items() if n > 1)
    if work > FLUSH_EVERY:  # each finished item's outcome reached the caller before the kill
        assert twice == []
    else:  # finished items whose outcomes died with the worker run again; none other
        assert set(twice) <= set(range(10, 15))


def test_a_worker_killed_mid_chunk_retries_that_item_when_retry_on_covers_it(
    tmp_path: Path,
) -> None:
    f = opmap(mode="process", workers=2, retries=1, min_delay=0.01, retry_on=WorkerCrashedError)(
        logged_then_killed_once
    )
    try:
        out = f(range(80), folder=str(tmp_path), victim=15, work=0.015)
    finally:
        f.close()
    assert out == list(range(80))
    runs = _runs(tmp_path)
    assert runs[15] == 2
    assert [i for i, n in runs.items() if n != 1] == [15]


async def test_sync_process_map_inside_a_running_loop() -> None:
    f = opmap(mode="process", workers=2, retries=1)(stamp)
    try:
        assert [item for item, _, _ in f([1, 2, 3])] == [1, 2, 3]
    finally:
        f.close()


async def asleep_long(item: int) -> int:
    await asyncio.sleep(30)
    return item


@pytest.mark.parametrize("mode", ["process", "async_process"])
def test_cancelling_an_async_map_terminates_its_workers(mode: str) -> None:
    import multiprocessing

    f = opmap(mode=mode, workers=2)(asleep_long)

    async def main() -> None:
        task = asyncio.ensure_future(f(range(10)))
        await asyncio.sleep(1.0)
        assert f._pool is not None
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    before = set(multiprocessing.active_children())
    asyncio.run(main())
    assert f._pool is None  # the next call starts a fresh pool
    assert not [p for p in multiprocessing.active_children() if p.name == "opero-worker"]
    assert set(multiprocessing.active_children()) <= before


def grow(data: bytes) -> bytes:
    return data + b"!"


def test_big_items_and_big_results_do_not_deadlock_the_pipes() -> None:
    # A big item sent to a busy worker while it sends a big result back would fill both pipes.
    f = opmap(mode="process", workers=2, retries=1)(grow)  # per-item calls
    try:
        out = f([bytes(1_000_000)] * 6)
    finally:
        f.close()
    assert [len(b) for b in out] == [1_000_001] * 6


def test_a_function_the_worker_cannot_load_fails_its_items() -> None:
    import types

    module = types.ModuleType("opero_test_nowhere")  # exists only in this process
    exec("def f(x):\n    return x\n", module.__dict__)
    sys.modules["opero_test_nowhere"] = module
    try:
        f = opmap(mode="process", workers=1, on_error="return")(module.f)
        out = f([1, 2])
        f.close()
    finally:
        del sys.modules["opero_test_nowhere"]
    assert all(isinstance(e, ModuleNotFoundError) for e in out), out


@opmap(mode="process", workers=2)
def decorated_in_place(x: int) -> int:
    return x + 1


def test_a_function_decorated_at_module_level_runs_in_workers() -> None:
    # The module's name now refers to the decorated object, not the function the workers run.
    try:
        assert decorated_in_place([1, 2, 3]) == [2, 3, 4]
        assert list(decorated_in_place.stream(iter([5]))) == [6]
    finally:
        decorated_in_place.close()


def flaky_once(item: int, folder: str) -> int:
    """Odd items fail their first attempt (a marker file remembers it across processes)."""
    marker = Path(folder) / f"{item}.seen"
    if item % 2 and not marker.exists():
        marker.touch()
        raise TimeoutError(f"item {item}: first attempt")
    return item * 10


def test_retries_only_first_attempts_in_chunks_retries_in_the_caller(
    tmp_path: Path, opero_log: list[logging.LogRecord]
) -> None:
    f = opmap(mode="process", workers=2, retries=2, min_delay=0.01, jitter=False)(flaky_once)
    try:
        out = f(range(40), folder=str(tmp_path))  # sized input: sent in chunks of 5
    finally:
        f.close()
    assert out == [i * 10 for i in range(40)]
    retried = [r.getMessage() for r in opero_log if "retrying" in r.getMessage()]
    assert len(retried) == 20  # once per odd item, logged by the caller
    assert all("attempt 1 of 3 failed with TimeoutError" in m for m in retried)


def test_retries_only_does_not_retry_what_retry_on_excludes(tmp_path: Path) -> None:
    f = opmap(mode="process", workers=2, retries=2, retry_on=KeyError, on_error="return")(
        flaky_once
    )
    try:
        out = f(range(10), folder=str(tmp_path))
    finally:
        f.close()
    assert [type(v) for v in out[1::2]] == [TimeoutError] * 5
    assert out[0::2] == [0, 20, 40, 60, 80]


# -- scheduling: a call goes to an idle worker, never behind a busy one -------------------------
# Each helper waits (up to a deadlock guard, not a timing assertion) for files the other items
# create, so it only succeeds when those items run at the same time as it.


def _appeared(folder: str, names: list[str], guard: float = 15.0) -> bool:
    deadline = time.monotonic() + guard
    while not all(os.path.exists(os.path.join(folder, name)) for name in names):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def meet(item: int, folder: str, n: int) -> tuple[bool, int]:
    """A barrier of ``n`` items: whether all ``n`` were running at once, and this worker's pid."""
    Path(folder, f"{item}.here").touch()
    return _appeared(folder, [f"{i}.here" for i in range(n)]), os.getpid()


async def ameet(item: int, folder: str, n: int) -> tuple[bool, int]:
    Path(folder, f"{item}.here").touch()
    names = [f"{i}.here" for i in range(n)]
    for _ in range(1500):
        if all(os.path.exists(os.path.join(folder, name)) for name in names):
            return True, os.getpid()
        await asyncio.sleep(0.01)
    return False, os.getpid()


def wait_for_go(item: int, folder: str) -> bool:
    """Item 3 says go; the others wait for it."""
    if item == 3:
        Path(folder, "go").touch()
        return True
    return _appeared(folder, ["go"])


@pytest.mark.parametrize(("items", "workers"), [(2, 2), (2, 4), (4, 4)])
@pytest.mark.parametrize("options", [{}, {"cache": True}], ids=["chunks", "per-item"])
def test_every_item_gets_its_own_worker_while_workers_are_free(
    items: int, workers: int, options: dict[str, Any], tmp_path: Path
) -> None:
    f = opmap(mode="process", workers=workers, **options)(meet)
    try:
        (tmp_path / "warm").mkdir()
        f([0], folder=str(tmp_path / "warm"), n=1)  # a warm pool: one process already idle
        out = f(range(items), folder=str(tmp_path), n=items)
    finally:
        f.close()
    assert [met for met, _ in out] == [True] * items
    assert len({pid for _, pid in out}) == items


def test_a_short_item_does_not_wait_behind_a_long_one(tmp_path: Path) -> None:
    # Items 0-2 block until item 3 runs: it must get a worker of its own, not a busy one's queue.
    f = opmap(mode="process", workers=4, ordered=False)(wait_for_go)
    try:
        out = list(f.stream(range(4), folder=str(tmp_path)))
    finally:
        f.close()
    assert out == [True] * 4


def test_a_call_goes_to_the_idle_worker_when_another_is_busy(tmp_path: Path) -> None:
    from opero.concurrency.process import ProcessBackend

    backend = ProcessBackend(2)
    try:
        blocked = backend.submit(wait_for_go, (0, str(tmp_path)), {})
        assert backend.submit(os.getpid, (), {}).result(timeout=30)  # one worker is idle again
        go = backend.submit(wait_for_go, (3, str(tmp_path)), {})
        assert go.result(timeout=30) is True
        assert blocked.result(timeout=30) is True
    finally:
        backend.close()


@pytest.mark.parametrize("items", [2, 4])
def test_async_process_spreads_items_over_its_processes(
    items: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # workers=4: 2 processes, 2 calls each
    f = opmap(mode="async_process", workers=4)(ameet)
    try:
        out = asyncio.run(f(range(items), folder=str(tmp_path), n=items))
    finally:
        f.close()
    assert [met for met, _ in out] == [True] * items
    assert len({pid for _, pid in out}) == 2


def test_close_returns_when_the_only_calls_left_were_cancelled_while_queued() -> None:
    import threading

    from opero.concurrency.process import ProcessBackend

    backend = ProcessBackend(1)
    running = backend.submit(time.sleep, (0.5,), {})
    queued = backend.submit(time.sleep, (0.5,), {})
    assert queued.cancel()  # still in the parent's queue: no worker free
    closer = threading.Thread(target=backend.close, daemon=True)
    closer.start()
    closer.join(timeout=20)
    hung = closer.is_alive()
    if hung:
        backend.close(cancel=True)  # free the dispatcher so the suite goes on
    assert not hung, "close() waited forever on a call that had been cancelled"
    assert running.result(timeout=0) is None


def pid_after_a_moment(item: int) -> int:
    time.sleep(0.0001)
    return os.getpid()


def test_a_long_list_keeps_every_worker_busy() -> None:
    # 10,000 items make chunks of 1,250: more than a list call's window holds in items, so
    # chunks must count as units of it or only one chunk (one worker) would ever run at a time.
    f = opmap(mode="process", workers=2)(pid_after_a_moment)
    try:
        pids = f(range(10_000))
    finally:
        f.close()
    assert len(pids) == 10_000
    assert len(set(pids)) == 2


def test_a_stream_of_a_slow_source_does_not_wait_for_full_chunks() -> None:
    # A plain function's items travel in chunks that grow while they come back fast; a source
    # that produces an item every 5 ms must still get each result before it reads far ahead.
    produced: list[int] = []

    def source() -> Iterator[int]:
        for i in range(120):
            time.sleep(0.005)
            produced.append(i)
            yield i

    f = opmap(mode="process", workers=2)(echo_item)
    ahead = []
    try:
        for n, item in enumerate(f.stream(source()), 1):
            assert item == n - 1
            ahead.append(len(produced) - n)
    finally:
        f.close()
    assert len(ahead) == 120
    assert max(ahead) <= 2 * 2 + 1  # the window, plus the item being read


def echo_item(item: int) -> int:
    return item


def exit_once_logged(item: int, folder: str) -> int:
    Path(folder, f"{item}-{uuid.uuid4().hex}").touch()
    sys.exit(3)


async def aexit_once_logged(item: int, folder: str) -> int:
    return exit_once_logged(item, folder)


SYS_EXIT_CASES = [
    ("sync", "process", {}),  # first attempts in chunks, on the worker
    ("sync", "process", {"cache": True}),  # a chain per item, on a helper loop
    ("sync", "thread", {"cache": True}),
    ("async", "async_process", {}),
    ("async", "async", {"cache": True}),
    ("async", "aiomultiprocess", {}),
]


@pytest.mark.parametrize(
    ("kind", "mode", "options"),
    SYS_EXIT_CASES,
    ids=[
        "process",
        "process-chain",
        "thread-chain",
        "async_process",
        "async-chain",
        "aiomp",
    ],
)
@pytest.mark.parametrize("streaming", [False, True], ids=["list", "stream"])
def test_sys_exit_in_an_item_is_its_outcome_and_never_retried(
    kind: str, mode: str, options: dict[str, Any], streaming: bool, tmp_path: Path
) -> None:
    f = opmap(mode=mode, workers=2, retries=2, min_delay=0.01, on_error="return", **options)(
        _fn(kind, exit_once_logged, aexit_once_logged)
    )
    try:
        if not streaming:
            out = run(f, [1, 2], folder=str(tmp_path))
        elif kind == "sync":
            out = list(f.stream([1, 2], folder=str(tmp_path)))
        else:

            async def collect() -> list[Any]:
                return [r async for r in f.stream([1, 2], folder=str(tmp_path))]

            out = asyncio.run(collect())
    finally:
        f.close()
    assert [type(e) for e in out] == [SystemExit, SystemExit]
    assert [e.code for e in out] == [3, 3]
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == ["1", "2"]  # once each


class SlotsError(Exception):
    __slots__ = ("code", "detail")

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail


class DeniedError(OSError):
    def __init__(self, path: str) -> None:
        super().__init__(13, "Permission denied", path)


def raise_slots_or_os_error(item: int) -> int:
    if item:
        raise DeniedError("/etc/x")
    raise SlotsError(7, "bad")


async def araise_slots_or_os_error(item: int) -> int:
    return raise_slots_or_os_error(item)


@pytest.mark.parametrize("mode", ["process", "async_process"])
def test_a_rebuilt_exception_keeps_its_slots_and_os_error_fields(mode: str) -> None:
    f = opmap(mode=mode, workers=2, on_error="return")(
        araise_slots_or_os_error if mode == "async_process" else raise_slots_or_os_error
    )
    try:
        slots, denied = run(f, [0, 1])
    finally:
        f.close()
    assert type(slots) is SlotsError
    assert (slots.code, slots.detail, str(slots)) == (7, "bad", "7: bad")
    assert type(denied) is DeniedError
    assert (denied.errno, denied.strerror, denied.filename) == (13, "Permission denied", "/etc/x")
    assert str(denied) == "[Errno 13] Permission denied: '/etc/x'"


MAIN_EXCEPTION_SCRIPT = """
import asyncio
import sys
from opero import opmap

class Status(Exception):
    def __init__(self, status, message):
        super().__init__(f"{status}: {message}")
        self.status = status

def fail(x):
    raise Status(503, "down")

async def afail(x):
    fail(x)

if __name__ == "__main__":
    f = opmap(mode=sys.argv[1], workers=1, on_error="return")(
        afail if sys.argv[1] == "async_process" else fail
    )
    out = f([1])
    [err] = asyncio.run(out) if asyncio.iscoroutine(out) else out
    f.close()
    print(type(err) is Status, err.status)
"""


@pytest.mark.parametrize("mode", ["process", "async_process"])
def test_an_exception_class_of_the_main_script_arrives_as_itself(mode: str, tmp_path: Path) -> None:
    script = tmp_path / "main_exception.py"
    script.write_text(MAIN_EXCEPTION_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), mode], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "503"]


PATHOS_SCRIPT = """
import sys
from opero import opmap

class SlotsError(Exception):
    __slots__ = ("code",)
    def __init__(self, code, detail):
        super().__init__(f"{code}: {detail}")
        self.code = code

def fail(x):
    if x == 1:
        sys.exit(3)
    raise SlotsError(7, "bad")

if __name__ == "__main__":
    f = opmap(mode="pathos", workers=1, retries=2, min_delay=0.01, on_error="return")(fail)
    exited, slots = f([1, 2])
    f.close()
    print(type(exited).__name__, exited.code, type(slots).__name__, slots.code)
"""


def test_pathos_keeps_sys_exit_codes_and_slots_in_a_fresh_interpreter(tmp_path: Path) -> None:
    # Run in a fresh interpreter, as a user's script is. After the Ray and Dask tests of this
    # session, pathos workers return such exceptions without their slots or exit code (some
    # global pickling state those engines change; not pinned down).
    script = tmp_path / "pathos_exceptions.py"
    script.write_text(PATHOS_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["SystemExit", "3", "SlotsError", "7"]
