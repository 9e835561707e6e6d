"""@opmap: the contract every backend must keep, run against every mode, plus the map rules."""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from opero import OpmapError, opmap
from opero.concurrency import backend_class
from opero.errors import MissingExtraError
from opero.testing import fake_time

pytestmark = pytest.mark.timeout(60)


SYNC_MODES = ["thread", "process", "pathos", "async"]
ASYNC_MODES = ["async", "thread", "process", "async_process", "aiomultiprocess"]
ALL = [("sync", m) for m in SYNC_MODES] + [("async", m) for m in ASYNC_MODES]


# Item functions live at module level so workers import them by reference.
def slow_square(x: int, delay: float = 0.0) -> int:
    time.sleep(delay * (x % 3))  # later items often finish first
    return x * x


async def aslow_square(x: int, delay: float = 0.0) -> int:
    await asyncio.sleep(delay * (x % 3))
    return x * x


def echo(item: object, tag: str = "") -> object:
    return (item, tag)


async def aecho(item: object, tag: str = "") -> object:
    return (item, tag)


def fail_on_odd(x: int) -> int:
    if x % 2:
        raise ValueError(f"odd {x}")
    return x


async def afail_on_odd(x: int) -> int:
    return fail_on_odd(x)


def span(x: float) -> tuple[float, float]:
    start = time.time()
    time.sleep(x)
    return start, time.time()


async def aspan(x: float) -> tuple[float, float]:
    start = time.time()
    await asyncio.sleep(x)
    return start, time.time()


PAIRS = {
    slow_square: aslow_square,
    echo: aecho,
    fail_on_odd: afail_on_odd,
    span: aspan,
}


def mapped(kind: str, mode: str, func: Callable[..., Any], **options: Any) -> Any:
    """``func`` (or its async twin) decorated for ``mode``, plus a plain caller."""
    target = PAIRS[func] if kind == "async" else func
    return opmap(mode=mode, **options)(target)


def call(decorated: Any, items: Any, **kwargs: Any) -> Any:
    result = decorated(items, **kwargs)
    if asyncio.iscoroutine(result):
        return asyncio.run(result)
    return result


def collect_stream(decorated: Any, items: Any, limit: int | None = None) -> list[Any]:
    stream = decorated.stream(items)
    if hasattr(stream, "__anext__"):

        async def drain() -> list[Any]:
            out = []
            async for value in stream:
                out.append(value)
                if limit is not None and len(out) == limit:
                    break
            await stream.aclose()
            return out

        return asyncio.run(drain())
    out = list(itertools.islice(stream, limit))
    stream.close()
    return out


@pytest.fixture(params=ALL, ids=[f"{k}-{m}" for k, m in ALL])
def case(request: pytest.FixtureRequest) -> Any:
    kind, mode = request.param
    made: list[Any] = []

    def make(func: Callable[..., Any], **options: Any) -> Any:
        decorated = mapped(kind, mode, func, **options)
        made.append(decorated)
        return decorated

    yield make
    for decorated in made:
        decorated.close()


# -- contract, every mode -----------------------------------------------------------------------


def test_results_in_input_order_when_items_finish_out_of_order(case: Any) -> None:
    f = case(slow_square, workers=3)
    assert call(f, range(12), delay=0.01) == [x * x for x in range(12)]


def test_duplicates_and_dict_items_keep_their_places(case: Any) -> None:
    f = case(echo, workers=2)
    items = [{"a": 1}, {"a": 1}, 3, 3, {"b": [2]}]
    assert call(f, items, tag="t") == [(item, "t") for item in items]


def test_unordered_returns_every_result(case: Any) -> None:
    f = case(slow_square, workers=3, ordered=False)
    assert call(f, range(9), delay=0.01) == [x * x for x in range(9)]  # a list keeps its order
    assert sorted(collect_stream(f, range(9))) == [x * x for x in range(9)]


def test_unordered_stream_yields_as_items_finish() -> None:
    f = opmap(mode="thread", workers=2, ordered=False)(slow_square)
    assert list(f.stream([2, 0], delay=0.1)) == [0, 4]  # item 2 sleeps 0.2 s, item 0 not at all


def test_failures_raise_opmap_error_after_every_item(case: Any) -> None:
    f = case(fail_on_odd, workers=2)
    with pytest.raises(OpmapError, match="2 of 4 items failed") as info:
        call(f, [0, 1, 2, 3])
    err = info.value
    assert err.results[0] == 0
    assert err.results[2] == 2
    assert set(err.errors) == {1, 3}
    assert type(err.errors[1]) is ValueError
    assert str(err.errors[3]) == "odd 3"
    assert err.results[1] is err.errors[1]


def test_on_error_return_puts_exceptions_in_place(case: Any) -> None:
    f = case(fail_on_odd, workers=2, on_error="return")
    out = call(f, [0, 1, 2])
    assert out[0] == 0
    assert out[2] == 2
    assert isinstance(out[1], ValueError)
    assert str(out[1]) == "odd 1"


def test_empty_input_returns_empty_list_without_workers(case: Any) -> None:
    before = set(multiprocessing.active_children())
    f = case(echo, workers=2)
    assert call(f, []) == []
    assert call(f, iter(())) == []
    assert set(multiprocessing.active_children()) == before


def test_never_more_than_workers_items_at_once(case: Any) -> None:
    f = case(span, workers=2)
    spans = call(f, [0.05] * 8)
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak <= 2


def test_stream_yields_in_order(case: Any) -> None:
    f = case(slow_square, workers=2)
    assert collect_stream(f, iter(range(7))) == [x * x for x in range(7)]


def test_stream_reads_an_endless_generator_lazily(case: Any) -> None:
    consumed = itertools.count()
    taken = []

    def endless() -> Any:
        for i in itertools.count():
            taken.append(next(consumed))
            yield i

    f = case(echo, workers=2)
    out = collect_stream(f, endless(), limit=20)
    assert out == [(i, "") for i in range(20)]
    # bounded: the window (2 x workers units; process chunks grow to at most 2048 items)
    assert len(taken) <= 20 + 4 * 2048


def test_pool_is_reused_and_close_releases_it(case: Any) -> None:
    f = case(echo, workers=2)
    call(f, [1, 2])
    pool = f._pool
    call(f, [3])
    assert f._pool is pool
    f.close()
    assert f._pool is None
    assert call(f, [4]) == [(4, "")]


def test_close_while_a_stream_runs_lets_it_go_on_then_releases_its_pool(case: Any) -> None:
    f = case(echo, workers=2)
    stream = f.stream(itertools.count())
    seen: dict[str, Any] = {}

    def middle() -> None:  # close() returns at once: the stream still uses the pool
        seen["pool"] = f._pool
        f.close()
        seen["detached"] = f._pool is None

    if hasattr(stream, "__anext__"):

        async def main() -> list[Any]:
            out = [await stream.__anext__() for _ in range(5)]
            middle()
            out += [await stream.__anext__() for _ in range(5)]
            await stream.aclose()
            return out

        out = asyncio.run(main())
    else:
        out = [next(stream) for _ in range(5)]
        middle()
        out += [next(stream) for _ in range(5)]
        stream.close()
    assert out == [(i, "") for i in range(10)]
    assert seen["detached"]
    assert seen["pool"] not in f._users  # released when the stream ended
    assert call(f, [1]) == [(1, "")]  # on a new pool
    assert f._pool is not seen["pool"]


# -- rules that do not depend on the backend ----------------------------------------------------


@pytest.mark.parametrize("items", ["abc", b"abc", bytearray(b"abc"), memoryview(b"abc"), 42, None])
def test_items_must_be_a_real_iterable(items: object) -> None:
    f = opmap()(echo)
    with pytest.raises(TypeError, match="iterable"):
        f(items)


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"mode": "threads"}, "mode"),
        ({"mode": 3}, "mode"),
        ({"workers": 0}, "workers"),
        ({"workers": True}, "workers"),
        ({"ordered": "yes"}, "ordered"),
        ({"progress": 1}, "progress"),
        ({"on_error": "ignore"}, "on_error"),
        ({"retries": -1}, "retries"),
        ({"rate_limit": 0}, "rate_limit"),
        ({"arg_fallback": "nope"}, "arg_fallback"),
        ({"cluster": "tcp://x:1"}, "cluster"),
        ({"rate_limit_backend": "carrier-pigeon"}, "rate_limit_backend"),
    ],
)
def test_impossible_options_fail_when_decorating(options: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        opmap(**options)(echo)


def test_unknown_option_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        opmap(retires=3)  # type: ignore[call-arg]


def test_async_process_refuses_a_sync_function() -> None:
    with pytest.raises(ValueError, match="async_process"):
        opmap(mode="async_process")(echo)


@pytest.mark.parametrize(
    ("mode", "module"), [("pathos", "pathos"), ("aiomultiprocess", "aiomultiprocess")]
)
def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch, mode: str, module: str) -> None:
    import sys

    target = {"pathos": "opero.concurrency.pathos", "aiomultiprocess": "opero.concurrency.aiomp"}
    for name in [n for n in sys.modules if n == module or n.startswith(module + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.delitem(sys.modules, target[mode], raising=False)
    with pytest.raises(MissingExtraError, match=rf"opero\[{mode}\]"):
        backend_class(mode)


@pytest.mark.parametrize("module", ["pathos", "dill", "multiprocess", "ppft"])
def test_pathos_missing_any_of_its_modules_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, module: str
) -> None:
    # Missing dill used to escape as a bare ModuleNotFoundError: pathos was the only name known.
    import sys

    before = set(sys.modules)
    for name in [n for n in sys.modules if n == module or n.startswith(module + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, module, None)
    # Fresh imports of pathos and opero's backend, so they reach the blocked module again.
    for name in [n for n in sys.modules if n.startswith("pathos.") and n != module]:
        monkeypatch.delitem(sys.modules, name)
    if module != "pathos":
        monkeypatch.delitem(sys.modules, "pathos", raising=False)
    monkeypatch.delitem(sys.modules, "opero.concurrency.pathos", raising=False)
    try:
        with pytest.raises(MissingExtraError, match=rf"'{module}': pip install 'opero\[pathos\]'"):
            backend_class("pathos")
    finally:
        for name in set(sys.modules) - before:  # half-imported modules of the failed attempt
            del sys.modules[name]


def test_keyword_arguments_go_to_every_call_with_fallback() -> None:
    seen = []

    def fetch(item: int, api_key: list[str] = ["primary", "backup"]) -> str:  # noqa: B006
        seen.append(api_key[0])
        if api_key[0] != "k2":
            raise ConnectionError("rejected")
        return f"{item}:{api_key[0]}"

    f = opmap(mode="thread", workers=2, arg_fallback="api_key")(fetch)
    assert f([1, 2], api_key=["k1", "k2"]) == ["1:k2", "2:k2"]
    assert sorted(seen) == ["k1", "k1", "k2", "k2"]


def test_retries_happen_in_the_caller_and_log_once(opero_log: list[logging.LogRecord]) -> None:
    attempts: dict[int, int] = {}
    lock = threading.Lock()

    def flaky(x: int) -> int:
        with lock:
            attempts[x] = attempts.get(x, 0) + 1
            if attempts[x] == 1:
                raise TimeoutError("first try")
        return x

    f = opmap(mode="thread", workers=2, retries=2)(flaky)
    with fake_time() as t:
        assert f([1, 2, 3]) == [1, 2, 3]
    assert attempts == {1: 2, 2: 2, 3: 2}
    assert len(t.slept) == 3
    assert len([r for r in opero_log if "retrying" in r.getMessage()]) == 3


def test_cache_is_shared_across_items_and_calls() -> None:
    calls = []

    def compute(x: int) -> int:
        calls.append(x)
        return x * 10

    f = opmap(mode="thread", workers=4, cache=True)(compute)
    assert f([1, 1, 2, 1, 2]) == [10, 10, 20, 10, 20]
    assert f([2, 3]) == [20, 30]
    assert sorted(calls) == [1, 2, 3]
    assert f.cache_clear() == 3


def test_stream_raise_stops_at_the_failing_item() -> None:
    f = opmap(mode="thread", workers=2)(fail_on_odd)
    out = []
    with pytest.raises(OpmapError, match="item 1 failed") as info:
        out.extend(f.stream([0, 1, 2]))
    assert out == [0]
    assert isinstance(info.value.errors[1], ValueError)
    assert isinstance(info.value.__cause__, ValueError)


def test_progress_bar_counts_items_and_closes_on_error(capsys: pytest.CaptureFixture[str]) -> None:
    f = opmap(mode="thread", workers=2, progress=True)(fail_on_odd)
    with pytest.raises(OpmapError):
        f([0, 1, 2, 4])
    assert "4/4" in capsys.readouterr().err
    g = opmap(mode="thread", workers=2, progress=True)(echo)
    assert len(list(g.stream(iter(range(3))))) == 3
    assert "3item" in capsys.readouterr().err.replace(" ", "")


def test_context_managers_close_the_pool() -> None:
    f = opmap(mode="thread", workers=2)(echo)
    with f as g:
        assert g([1]) == [(1, "")]
        assert f._pool is not None
    assert f._pool is None

    async def main() -> None:
        a = opmap(mode="async", workers=2)(aecho)
        async with a:
            assert await a([1]) == [(1, "")]
        assert a._pool is None

    asyncio.run(main())


async def test_async_mode_inside_a_running_loop_limits_coroutines() -> None:
    running = peak = 0

    async def work(x: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.005)
        running -= 1
        return x

    f = opmap(mode="async", workers=5)(work)
    assert await f(range(40)) == list(range(40))
    assert peak == 5
    assert [x async for x in f.stream(range(6))] == list(range(6))


async def test_sync_opmap_inside_a_running_loop() -> None:
    f = opmap(mode="thread", workers=2)(slow_square)
    assert f(range(5)) == [x * x for x in range(5)]
    g = opmap(mode="thread", workers=2, retries=1)(slow_square)  # the chain needs its own loop
    assert g(range(5)) == [x * x for x in range(5)]
    assert list(g.stream(range(3))) == [0, 1, 4]


def test_sync_function_in_async_mode_runs_in_threads() -> None:
    names = []

    def where(x: int) -> int:
        names.append(threading.current_thread().name)
        return x

    f = opmap(mode="async", workers=2)(where)
    assert f([1, 2, 3]) == [1, 2, 3]
    assert all(name.startswith("opero-opmap") for name in names)


def test_cancelling_an_async_map_cancels_its_items() -> None:
    started = []

    async def slow(x: int) -> int:
        started.append(x)
        await asyncio.sleep(10)
        return x

    f = opmap(mode="async", workers=3)(slow)

    async def main() -> None:
        task = asyncio.ensure_future(f(range(100)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(asyncio.all_tasks()) == 1

    asyncio.run(main())
    assert len(started) == 3


def test_worker_pid_differs_from_caller_in_process_mode() -> None:
    f = opmap(mode="process", workers=2)(_pid)
    try:
        pids = f(range(4))
    finally:
        f.close()
    assert os.getpid() not in pids


def _pid(_: object) -> int:
    return os.getpid()


def test_a_worker_is_not_held_while_an_item_waits_for_its_backoff() -> None:
    events: list[str] = []
    lock = threading.Lock()

    def work(x: int) -> int:
        with lock:
            events.append(f"start {x}")
            if x == 0 and events.count("start 0") == 1:
                raise TimeoutError("try again")
        return x

    # one worker; item 0 fails and backs off 0.3 s (real time): item 1 must run meanwhile
    f = opmap(mode="thread", workers=1, retries=1, min_delay=0.3, jitter=False)(work)
    assert f([0, 1]) == [0, 1]
    assert events == ["start 0", "start 1", "start 0"]


def test_stopping_a_stream_early_keeps_the_pool() -> None:
    f = opmap(mode="process", workers=2)(slow_square)
    try:
        stream = f.stream(iter(range(100)))
        assert next(stream) == 0
        stream.close()
        pool = f._pool
        assert pool is not None
        assert f([3]) == [9]
        assert f._pool is pool
    finally:
        f.close()


def test_progress_without_a_length_counts(capsys: pytest.CaptureFixture[str]) -> None:
    f = opmap(mode="thread", workers=2, progress=True, retries=1)(echo)
    assert len(f(x for x in range(5))) == 5
    assert "5item" in capsys.readouterr().err.replace(" ", "")


def test_a_failing_shared_rate_limit_does_not_leak_worker_slots() -> None:
    from opero.errors import OperoError

    # Nothing listens on port 1: every attempt's rate-limit reservation fails; with 2 workers,
    # a slot lost per failure would leave items 3..6 waiting forever.
    f = opmap(
        mode="thread",
        workers=2,
        on_error="return",
        rate_limit=5,
        rate_limit_backend="redis://127.0.0.1:1/0",
        rate_limit_on_error="raise",
    )(echo)
    out = f(range(6))
    assert len(out) == 6
    assert all(isinstance(e, OperoError) for e in out), out
