"""Retry rules of @opero: attempts, waits, filtering, what is never retried, what is re-raised."""

from __future__ import annotations

import asyncio
import threading
import traceback

import pytest

from opero import opero
from opero.core.retry import RetryPolicy
from opero.testing import fake_time


class Boom(Exception):
    pass


def failing(calls: list[object], error: BaseException | None = None, succeed_after: int = -1):
    """A body that records each call and raises until it has been called ``succeed_after`` times."""

    def body(x: int = 0) -> int:
        calls.append(x)
        if succeed_after < 0 or len(calls) <= succeed_after:
            raise error if error is not None else Boom(f"failure {len(calls)}")
        return x * 10

    return body


def test_attempts_are_retries_plus_one(mode):
    calls: list[object] = []
    f = opero(retries=3)(mode.fn(failing(calls)))
    with fake_time() as t, pytest.raises(Boom, match="failure 4"):
        mode.run(f, 1)
    assert len(calls) == 4
    assert len(t.slept) == 3  # no wait after the final attempt


def test_success_after_failures_returns_value(mode):
    calls: list[object] = []
    f = opero(retries=3)(mode.fn(failing(calls, succeed_after=2)))
    with fake_time() as t:
        assert mode.run(f, 4) == 40
    assert len(calls) == 3
    assert len(t.slept) == 2


def test_no_retries_by_default(mode):
    calls: list[object] = []
    f = opero()(mode.fn(failing(calls)))
    with fake_time() as t, pytest.raises(Boom):
        mode.run(f)
    assert len(calls) == 1
    assert t.slept == []


@pytest.mark.parametrize(
    ("min_delay", "factor", "max_delay", "retries"),
    [
        (0.5, 2.0, 3.0, 6),
        (0.1, 1.5, 30.0, 5),
        (1.0, 1.0, 1.0, 3),
        (0.0, 2.0, 5.0, 2),
        (2, 3, 100, 5),
    ],
)
def test_waits_without_jitter_are_exact(mode, min_delay, factor, max_delay, retries):
    calls: list[object] = []
    f = opero(
        retries=retries,
        min_delay=min_delay,
        backoff_factor=factor,
        max_delay=max_delay,
        jitter=False,
    )(mode.fn(failing(calls)))
    with fake_time() as t, pytest.raises(Boom):
        mode.run(f)
    expected = [min(max_delay, min_delay * factor ** (n - 1)) for n in range(1, retries + 1)]
    assert t.slept == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert len(calls) == retries + 1


def test_huge_backoff_is_capped_not_overflowing():
    policy = RetryPolicy(
        retries=5000, backoff_factor=10.0, min_delay=1.0, max_delay=7.0, jitter=False, retry_on=Boom
    )
    assert policy.delay(4000) == 7.0
    jittered = RetryPolicy(
        retries=5000, backoff_factor=10.0, min_delay=1.0, max_delay=7.0, jitter=True, retry_on=Boom
    )
    assert 1.0 <= jittered.delay(4000) <= 7.0


def test_jittered_waits_stay_within_bounds_and_vary(mode):
    calls: list[object] = []
    f = opero(retries=60, min_delay=0.2, backoff_factor=2.0, max_delay=3.0)(mode.fn(failing(calls)))
    with fake_time() as t, pytest.raises(Boom):
        mode.run(f)
    assert len(t.slept) == 60
    assert all(0.2 <= w <= 3.0 for w in t.slept)
    assert len(set(t.slept)) > 30  # randomised, not a fixed schedule


def test_jitter_with_equal_bounds_is_that_bound():
    policy = RetryPolicy(
        retries=3, backoff_factor=2.0, min_delay=0.5, max_delay=0.5, jitter=True, retry_on=Boom
    )
    assert {policy.delay(n) for n in range(1, 20)} == {0.5}


def test_retry_on_filters_what_is_retried(mode):
    calls: list[object] = []
    f = opero(retries=3, retry_on=ConnectionError)(mode.fn(failing(calls, ValueError("no"))))
    with fake_time() as t, pytest.raises(ValueError, match="no"):
        mode.run(f)
    assert len(calls) == 1
    assert t.slept == []


@pytest.mark.parametrize(
    "retry_on", [ConnectionError, OSError, (KeyError, ConnectionError), (ConnectionError,)]
)
def test_retry_on_matches_subclasses_and_tuples(mode, retry_on):
    calls: list[object] = []
    f = opero(retries=2, retry_on=retry_on)(
        mode.fn(failing(calls, ConnectionResetError("reset"), succeed_after=2))
    )
    with fake_time():
        assert mode.run(f, 1) == 10
    assert len(calls) == 3


@pytest.mark.parametrize(
    "error", [KeyboardInterrupt(), SystemExit(3), asyncio.CancelledError()], ids=type
)
@pytest.mark.parametrize("fallback", [False, True], ids=["plain", "with_fallback"])
def test_base_exceptions_are_never_retried_nor_fall_back(mode, error, fallback):
    calls: list[object] = []

    def body(key: object = ("a", "b")) -> None:
        calls.append(key)
        raise error

    f = opero(
        retries=3,
        retry_on=BaseException,
        fallback_on=BaseException,
        arg_fallback="key" if fallback else None,
    )(mode.fn(body))
    with fake_time() as t, pytest.raises(type(error)) as info:
        mode.run(f)
    if not isinstance(error, asyncio.CancelledError) or not mode.is_async:
        # (asyncio.run re-raises a cancellation as a new CancelledError)
        assert info.value is error
    assert calls == [("a", "b")] if fallback else len(calls) == 1
    assert t.slept == []


@pytest.mark.parametrize(
    "error", [KeyboardInterrupt(), SystemExit(0), asyncio.CancelledError(), GeneratorExit()]
)
def test_policy_never_retries_base_exceptions(error):
    policy = RetryPolicy(
        retries=5, backoff_factor=1, min_delay=0, max_delay=0, jitter=False, retry_on=BaseException
    )
    assert not policy.should_retry(error, 1)
    assert policy.should_retry(ValueError(), 1)
    assert not policy.should_retry(ValueError(), 6)


def _raise_marked(calls: list[object]) -> None:
    calls.append(None)
    raise Boom("the original message")  # <- the raising line


@pytest.mark.parametrize(
    "options",
    [{}, {"retries": 2}, {"retries": 2, "rate_limit": 1000.0}, {"retries": 1, "cache": True}],
    ids=["no-retry", "retries", "retries+limit", "retries+cache"],
)
def test_last_original_exception_is_reraised_unchanged(mode, options):
    calls: list[object] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            _raise_marked(calls)
        except Boom as exc:
            errors.append(exc)
            raise

    f = opero(**options)(mode.fn(body))
    with fake_time(), pytest.raises(Boom) as info:
        mode.run(f)
    assert info.value is errors[-1]  # the last attempt's own exception object
    assert type(info.value) is Boom
    assert str(info.value) == "the original message"
    lines = [frame.line for frame in traceback.extract_tb(info.value.__traceback__)]
    assert 'raise Boom("the original message")  # <- the raising line' in lines
    # Earlier attempts are not chained on as "during handling of the above exception".
    assert info.value.__context__ is None
    assert info.value.__cause__ is None


@pytest.mark.timeout(10)  # a blocking wait would hold the loop for 60 s
async def test_async_wait_is_cancellable_at_once():
    started = asyncio.Event()
    calls: list[object] = []

    @opero(retries=3, min_delay=60.0, max_delay=60.0, jitter=False)
    async def slow() -> None:
        calls.append(None)
        started.set()
        raise Boom

    task = asyncio.create_task(slow())
    await started.wait()
    for _ in range(3):  # let the driver reach its 60 s backoff wait
        await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5.0)
    assert task in done
    assert task.cancelled()
    assert len(calls) == 1


def test_concurrent_threads_keep_their_own_attempt_state():
    # Each thread's call fails twice then succeeds; the barrier makes the first attempts overlap.
    # Shared counters would let one call run out of attempts or borrow the other's.
    barrier = threading.Barrier(4, timeout=5)
    attempts: dict[int, int] = {}
    lock = threading.Lock()

    @opero(retries=2, min_delay=0.001, max_delay=0.001)
    def work(n: int) -> int:
        with lock:
            attempts[n] = attempts.get(n, 0) + 1
            mine = attempts[n]
        if mine == 1:
            barrier.wait()
        if mine < 3:
            raise Boom(n)
        return n

    results: dict[int, object] = {}

    def run(n: int) -> None:
        try:
            results[n] = work(n)
        except Exception as exc:
            results[n] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == {0: 0, 1: 1, 2: 2, 3: 3}
    assert attempts == {0: 3, 1: 3, 2: 3, 3: 3}


async def test_concurrent_tasks_keep_their_own_attempt_state():
    attempts: dict[int, int] = {}
    arrived = 0
    all_arrived = asyncio.Event()

    @opero(retries=2)
    async def work(n: int) -> int:
        nonlocal arrived
        attempts[n] = attempts.get(n, 0) + 1
        if attempts[n] == 1:
            arrived += 1
            if arrived == 4:
                all_arrived.set()
            await all_arrived.wait()
        if attempts[n] < 3:
            raise Boom(n)
        return n

    with fake_time():
        results = await asyncio.gather(*(work(n) for n in range(4)))
    assert results == [0, 1, 2, 3]
    assert attempts == {0: 3, 1: 3, 2: 3, 3: 3}


def test_each_call_starts_with_fresh_attempts(mode):
    calls: list[object] = []
    f = opero(retries=1)(mode.fn(failing(calls)))
    with fake_time():
        for _ in range(3):
            with pytest.raises(Boom):
                mode.run(f)
    assert len(calls) == 6
