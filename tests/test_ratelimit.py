"""Rate limit rules: evenly spaced starts, no burst, shared by threads, tasks and event loops."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

from opero import FallbackError, opero
from opero.core.ratelimit import RateLimiter
from opero.testing import fake_time


def assert_rate(starts: list[float], rate: float, slack: float = 0.0) -> None:
    """In any window of T seconds at most ``rate * T + 1`` starts."""
    starts = sorted(starts)
    for i in range(len(starts)):
        for j in range(i + 1, len(starts)):
            window = starts[j] - starts[i] + slack
            assert j - i + 1 <= rate * window + 1 + 1e-9, (
                f"{j - i + 1} starts within {starts[j] - starts[i]:.4f}s at rate {rate}/s"
            )


@pytest.fixture
def slots(monkeypatch):
    """The moment each start was granted (by ``reserve`` or ``settle``), from any thread or loop.

    The limiter grants a start only at least one interval after the previous grant, whenever the
    caller wakes up, so the window rule is checked exactly on the grants; the real clock only has
    to show that the last call did not start before its turn.
    """
    given: list[float] = []
    lock = threading.Lock()
    reserve, settle = RateLimiter.reserve, RateLimiter.settle

    def recording_reserve(self: RateLimiter, now: float) -> float:
        wait = reserve(self, now)
        if wait == 0:
            with lock:
                given.append(now)
        return wait

    def recording_settle(self: RateLimiter, now: float) -> float:
        wait = settle(self, now)
        if wait == 0:
            with lock:
                given.append(now)
        return wait

    monkeypatch.setattr(RateLimiter, "reserve", recording_reserve)
    monkeypatch.setattr(RateLimiter, "settle", recording_settle)
    return given


def assert_real_schedule(began: float, starts: list[float], rate: float) -> None:
    # Late wake-ups only delay starts, so this lower bound cannot flake; a limiter that is not
    # shared (per thread or per loop) lets the last call start far too early.
    assert max(starts) - began >= (len(starts) - 1) / rate - 1e-6


def test_assert_rate_catches_a_burst():
    with pytest.raises(AssertionError):
        assert_rate([0.0, 0.0, 0.1], rate=10)
    assert_rate([0.0, 0.1, 0.2], rate=10)


def test_limiter_spaces_slots_evenly_and_keeps_no_burst_after_idle():
    limiter = RateLimiter(10)
    assert [limiter.reserve(0.0) for _ in range(4)] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert [limiter.settle(t) for t in (0.1, 0.2, 0.3)] == [0.0, 0.0, 0.0]
    # Idle for a long time: the next call starts at once, the one after waits a full interval
    # (no stored-up burst).
    assert limiter.reserve(100.0) == 0.0
    assert limiter.reserve(100.0) == pytest.approx(0.1)
    assert limiter.reserve(100.05) == pytest.approx(0.15)


def test_late_sleepers_never_start_closer_than_one_interval():
    limiter = RateLimiter(10)
    assert limiter.reserve(0.0) == 0.0
    assert limiter.reserve(0.0) == pytest.approx(0.1)
    assert limiter.reserve(0.0) == pytest.approx(0.2)
    # Both sleepers wake late, at the same moment: only one may start, the other waits on.
    assert limiter.settle(0.35) == 0.0
    assert limiter.settle(0.35) == pytest.approx(0.1)
    assert limiter.settle(0.45) == 0.0


def test_abandoned_waiters_hold_no_place_in_the_queue():
    limiter = RateLimiter(2)
    assert limiter.reserve(0.0) == 0.0
    for _ in range(5):
        assert limiter.reserve(0.0) > 0
        limiter.abandon()
    # Five cancelled waiters later, a new caller waits one interval, not six.
    assert limiter.reserve(0.0) == pytest.approx(0.5)


def test_cancelled_async_waiters_release_their_place():
    async def main() -> float:
        f = opero(rate_limit=2)(_async_now)
        await f()
        waiters = [asyncio.create_task(f()) for _ in range(5)]
        await asyncio.sleep(0.01)
        for task in waiters:
            task.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        began = time.monotonic()
        await f()
        return time.monotonic() - began

    assert asyncio.run(main()) < 1.5  # one interval (0.5 s), not six (3 s)


async def _async_now() -> float:
    return time.monotonic()


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), "10", True, 1e-320])
def test_limiter_rejects_impossible_rates(bad):
    with pytest.raises(ValueError, match="rate_limit"):
        RateLimiter(bad)


def test_decorated_calls_wait_for_their_slot(mode):
    starts: list[float] = []
    with fake_time(0.0) as t:
        f = opero(rate_limit=4)(mode.fn(lambda: starts.append(t.now)))
        for _ in range(5):
            mode.run(f)
    assert starts == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert t.slept == pytest.approx([0.25] * 4)


def test_every_retry_and_fallback_attempt_takes_a_token(mode):
    starts: list[float] = []

    with fake_time(0.0) as t:

        def body(key: list[str]) -> None:
            starts.append(t.now)
            raise ConnectionError(key[0])

        f = opero(
            rate_limit=10, retries=2, min_delay=0.0, max_delay=0.0, jitter=False, arg_fallback="key"
        )(mode.fn(body))
        with pytest.raises(FallbackError):
            mode.run(f, ["a", "b"])
    assert starts == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])


def test_limit_is_per_decorated_function():
    with fake_time(0.0) as t:
        f = opero(rate_limit=1)(lambda: None)
        g = opero(rate_limit=1)(lambda: None)
        f()
        g()
        assert t.slept == []
        f()
        assert t.slept == [1.0]


def test_threads_share_the_limit(slots):
    rate = 50.0
    began = time.monotonic()
    starts: list[float] = []
    lock = threading.Lock()

    @opero(rate_limit=rate)
    def call() -> None:
        now = time.monotonic()
        with lock:
            starts.append(now)

    def worker() -> None:
        for _ in range(4):
            call()

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(starts) == 24
    assert len(slots) == 24
    assert_rate(slots, rate)
    assert_real_schedule(began, starts, rate)


async def test_coroutines_share_the_limit(slots):
    rate = 50.0
    began = time.monotonic()
    starts: list[float] = []

    @opero(rate_limit=rate)
    async def call() -> None:
        starts.append(time.monotonic())

    await asyncio.gather(*(call() for _ in range(24)))
    assert len(starts) == 24
    assert len(slots) == 24
    assert_rate(slots, rate)
    assert_real_schedule(began, starts, rate)


@pytest.mark.timeout(10)
def test_successive_event_loops_share_the_limit(slots):
    rate = 50.0
    began = time.monotonic()
    starts: list[float] = []

    @opero(rate_limit=rate)
    async def call() -> None:
        starts.append(time.monotonic())

    async def batch() -> None:
        await asyncio.gather(*(call() for _ in range(12)))

    asyncio.run(batch())
    asyncio.run(batch())  # a limiter tied to the first loop hangs or fails here
    assert len(starts) == 24
    assert len(slots) == 24
    assert_rate(slots, rate)
    assert_real_schedule(began, starts, rate)


@pytest.mark.timeout(10)
def test_threads_with_their_own_loops_share_the_limit(slots):
    rate = 50.0
    began = time.monotonic()
    starts: dict[int, list[float]] = {0: [], 1: []}

    @opero(rate_limit=rate)
    async def call(n: int) -> None:
        starts[n].append(time.monotonic())

    async def batch(n: int) -> None:
        await asyncio.gather(*(call(n) for _ in range(12)))

    threads = [threading.Thread(target=asyncio.run, args=(batch(n),)) for n in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert [len(s) for s in starts.values()] == [12, 12]  # neither loop starved
    assert len(slots) == 24
    assert_rate(slots, rate)
    assert_real_schedule(began, starts[0] + starts[1], rate)


async def test_async_waiting_does_not_block_the_loop():
    events: list[str] = []

    @opero(rate_limit=20)
    async def call() -> None:
        events.append("start")

    async def ticker() -> None:
        while True:
            events.append("tick")
            await asyncio.sleep(0.005)

    tick_task = asyncio.create_task(ticker())
    await asyncio.gather(*(call() for _ in range(3)))  # 0.1 s of waiting for slots
    tick_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await tick_task
    starts = [i for i, e in enumerate(events) if e == "start"]
    assert len(starts) == 3
    # The loop kept running other tasks while calls waited for their slots.
    assert "tick" in events[starts[0] : starts[1]]
    assert "tick" in events[starts[1] : starts[2]]
