"""@opero(cache=True) with the in-memory store: what hits, what never is cached, concurrency."""

from __future__ import annotations

import asyncio
import gc
import inspect
import threading
import time
from typing import ClassVar

import pytest

from opero import clear_cache, opero
from opero.testing import fake_time


def counted(calls: list[object]):
    def body(a: object, b: object = 2) -> object:
        calls.append((a, b))
        return [a, b]

    return body


def test_calls_equal_after_binding_share_an_entry(mode):
    calls: list[object] = []
    f = opero(cache=True)(mode.fn(counted(calls)))
    assert mode.run(f, 1) == [1, 2]
    assert mode.run(f, 1, 2) == [1, 2]
    assert mode.run(f, a=1, b=2) == [1, 2]
    assert mode.run(f, b=2, a=1) == [1, 2]
    assert calls == [(1, 2)]
    assert mode.run(f, 1, 3) == [1, 3]
    assert len(calls) == 2


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"a": 1, "b": [1, 2]}, {"b": [1, 2], "a": 1}),
        ([1, {"x": {2, 3}}], [1, {"x": {3, 2}}]),
        ({1, 2, 3}, {3, 2, 1}),
        ({"k": {"deep": [{"z": 1, "y": 2}]}}, {"k": {"deep": [{"y": 2, "z": 1}]}}),
    ],
    ids=["dict", "list", "set", "nested"],
)
def test_unhashable_arguments_hit_on_equal_values(mode, first, second):
    calls: list[object] = []
    f = opero(cache=True)(mode.fn(counted(calls)))
    mode.run(f, first)
    mode.run(f, second)
    assert len(calls) == 1


def test_equal_values_of_different_types_are_different_entries(mode):
    calls: list[object] = []
    f = opero(cache=True)(mode.fn(counted(calls)))
    for value in (1, 1.0, True, "1"):
        mode.run(f, value)
    assert [c[0] for c in calls] == [1, 1.0, True, "1"]
    assert [type(c[0]) for c in calls] == [int, float, bool, str]


def test_exceptions_are_never_cached(mode):
    calls: list[object] = []

    def body(a: int) -> int:
        calls.append(a)
        if len(calls) < 3:
            raise ValueError(len(calls))
        return a

    f = opero(cache=True)(mode.fn(body))
    for n in (1, 2):
        with pytest.raises(ValueError, match=str(n)):
            mode.run(f, 5)
    assert mode.run(f, 5) == 5
    assert mode.run(f, 5) == 5
    assert len(calls) == 3


@pytest.mark.parametrize("result", [None, 0, "", [], False, {}])
def test_none_and_falsy_results_are_cached(mode, result):
    calls: list[object] = []

    def body(a: int) -> object:
        calls.append(a)
        return result

    f = opero(cache=True)(mode.fn(body))
    assert mode.run(f, 1) == result
    assert mode.run(f, 1) == result
    assert calls == [1]


def test_async_caches_the_awaited_value_across_event_loops():
    calls: list[object] = []

    @opero(cache=True)
    async def fetch(a: int) -> dict[str, int]:
        calls.append(a)
        await asyncio.sleep(0)
        return {"a": a}

    first = asyncio.run(fetch(1))
    second = asyncio.run(fetch(1))  # a new loop: a cached coroutine or future would break here
    assert first == second == {"a": 1}
    assert second is first
    assert calls == [1]


@pytest.mark.timeout(10)
def test_single_flight_for_threads():
    calls: list[object] = []
    entered = threading.Event()
    release = threading.Event()

    @opero(cache=True)
    def slow(a: int) -> int:
        calls.append(a)
        entered.set()
        release.wait(5)
        return a * 2

    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(slow(21))) for _ in range(8)]
    threads[0].start()
    entered.wait(5)
    for thread in threads[1:]:
        thread.start()
    time.sleep(0.05)  # let the followers reach the flight while the leader still runs
    release.set()
    for thread in threads:
        thread.join(5)
    assert results == [42] * 8
    assert calls == [21]


@pytest.mark.timeout(10)
def test_single_flight_failure_is_shared_then_forgotten():
    calls: list[object] = []
    entered = threading.Event()
    release = threading.Event()

    @opero(cache=True)
    def slow(a: int) -> int:
        calls.append(a)
        if len(calls) == 1:
            entered.set()
            release.wait(5)
            raise ConnectionError("down")
        return a

    errors: list[object] = []

    def run() -> None:
        try:
            slow(1)
        except ConnectionError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    threads[0].start()
    entered.wait(5)
    for thread in threads[1:]:
        thread.start()
    time.sleep(0.05)
    release.set()
    for thread in threads:
        thread.join(5)
    # The followers share the leader's outcome, as with a success: one run, four failures.
    assert len(errors) == 4
    assert calls == [1]
    assert slow(1) == 1  # the failure was not cached


async def test_single_flight_for_tasks():
    calls: list[object] = []

    @opero(cache=True)
    async def slow(a: int) -> int:
        calls.append(a)
        await asyncio.sleep(0.01)
        return a * 2

    assert await asyncio.gather(*(slow(21) for _ in range(10))) == [42] * 10
    assert calls == [21]


async def test_cancelled_single_flight_leader_hands_over():
    calls: list[object] = []

    @opero(cache=True)
    async def slow(a: int) -> int:
        calls.append(a)
        await asyncio.sleep(0.05)
        return a

    leader = asyncio.create_task(slow(1))
    await asyncio.sleep(0)
    follower = asyncio.create_task(slow(1))
    await asyncio.sleep(0.01)
    leader.cancel()
    assert await asyncio.wait_for(follower, 5) == 1
    assert calls == [1, 1]


@pytest.mark.timeout(10)
def test_different_keys_are_not_serialised_threads():
    both_inside = threading.Barrier(2, timeout=5)

    @opero(cache=True)
    def work(a: int) -> int:
        both_inside.wait()  # BrokenBarrierError if the second key waits for the first
        return a

    results: list[object] = []
    threads = [threading.Thread(target=lambda n=n: results.append(work(n))) for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(results) == [1, 2]  # type: ignore[type-var]


async def test_different_keys_are_not_serialised_tasks():
    inside: set[int] = set()
    both = asyncio.Event()

    @opero(cache=True)
    async def work(a: int) -> int:
        inside.add(a)
        if len(inside) == 2:
            both.set()
        await asyncio.wait_for(both.wait(), 5)
        return a

    assert await asyncio.gather(work(1), work(2)) == [1, 2]


@pytest.mark.timeout(10)
def test_recursion_on_the_same_key_does_not_deadlock_sync():
    depth: list[int] = []

    @opero(cache=True)
    def nested(a: int) -> int:
        depth.append(a)
        if len(depth) < 3:
            return nested(a) + 1
        return 0

    assert nested(1) == 2
    assert len(depth) == 3
    assert nested(1) == 2  # cached
    assert len(depth) == 3


@pytest.mark.timeout(10)
async def test_recursion_on_the_same_key_does_not_deadlock_async():
    depth: list[int] = []

    @opero(cache=True)
    async def nested(a: int) -> int:
        depth.append(a)
        if len(depth) < 3:
            return await nested(a) + 1
        return 0

    assert await nested(1) == 2
    assert len(depth) == 3


def test_lru_bound(mode):
    calls: list[object] = []
    f = opero(cache=True, cache_maxsize=2)(mode.fn(counted(calls)))
    mode.run(f, 1)
    mode.run(f, 2)
    mode.run(f, 1)  # hit: 1 becomes the most recently used
    mode.run(f, 3)  # evicts 2
    assert len(calls) == 3
    mode.run(f, 1)
    assert len(calls) == 3
    mode.run(f, 2)
    assert [c[0] for c in calls] == [1, 2, 3, 2]


def test_default_bound_is_finite():
    f = opero(cache=True)(counted([]))
    assert f.opero_chain.cache.backend.maxsize == 4096


def test_ttl_expires_entries(mode):
    calls: list[object] = []
    with fake_time() as t:
        f = opero(cache=True, cache_ttl=10)(mode.fn(counted(calls)))
        mode.run(f, 1)
        t.advance(9.9)
        mode.run(f, 1)
        assert len(calls) == 1
        t.advance(0.2)
        mode.run(f, 1)
        assert len(calls) == 2
        t.advance(5)
        mode.run(f, 1)
        assert len(calls) == 2


def test_no_ttl_means_no_expiry(mode):
    calls: list[object] = []
    with fake_time() as t:
        f = opero(cache=True)(mode.fn(counted(calls)))
        mode.run(f, 1)
        t.advance(1e9)
        mode.run(f, 1)
    assert len(calls) == 1


class Account:
    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[str] = []

    @opero(cache=True)
    def greet(self, greeting: str) -> str:
        CALLS.append((self.name, greeting))
        return f"{greeting}, {self.name}"

    @opero(cache=True)
    async def agreet(self, greeting: str) -> str:
        CALLS.append((self.name, greeting))
        return f"{greeting}, {self.name}"


CALLS: list[object] = []


@pytest.fixture
def calls_log():
    CALLS.clear()
    yield CALLS
    CALLS.clear()
    Account.greet.cache_clear()
    Account.agreet.cache_clear()


def test_instance_methods_key_on_the_instance_value(mode, calls_log):
    def greet(acct: Account, greeting: str) -> str:
        return mode.run(acct.agreet if mode.is_async else acct.greet, greeting)

    assert greet(Account("ann"), "hi") == "hi, ann"
    assert greet(Account("ann"), "hi") == "hi, ann"  # an equal instance hits
    assert len(calls_log) == 1
    assert greet(Account("bob"), "hi") == "hi, bob"
    assert len(calls_log) == 2


def test_same_id_with_a_different_value_misses(calls_log):
    # The strongest form of "a reused id()": the very same object, now holding another value.
    acct = Account("ann")
    assert acct.greet("hi") == "hi, ann"
    acct.name = "bob"
    assert acct.greet("hi") == "hi, bob"
    acct.name = "ann"
    assert acct.greet("hi") == "hi, ann"  # and the old value still hits
    assert calls_log == [("ann", "hi"), ("bob", "hi")]


class Maker:
    created: ClassVar[list[object]] = []

    @opero(cache=True)
    @classmethod
    def above_cm(cls, n: int) -> str:
        cls.created.append(("above_cm", n))
        return f"{cls.__name__}{n}"

    @classmethod
    @opero(cache=True)
    def below_cm(cls, n: int) -> str:
        cls.created.append(("below_cm", n))
        return f"{cls.__name__}{n}"

    @opero(cache=True)
    @staticmethod
    def above_sm(n: int) -> str:
        Maker.created.append(("above_sm", n))
        return f"s{n}"

    @staticmethod
    @opero(cache=True)
    def below_sm(n: int) -> str:
        Maker.created.append(("below_sm", n))
        return f"s{n}"


class AsyncMaker:
    created: ClassVar[list[object]] = []

    @opero(cache=True, retries=1)
    @classmethod
    async def above_cm(cls, n: int) -> str:
        cls.created.append(("above_cm", n))
        return f"{cls.__name__}{n}"

    @classmethod
    @opero(cache=True, retries=1)
    async def below_cm(cls, n: int) -> str:
        cls.created.append(("below_cm", n))
        return f"{cls.__name__}{n}"

    @opero(cache=True, retries=1)
    @staticmethod
    async def above_sm(n: int) -> str:
        AsyncMaker.created.append(("above_sm", n))
        return f"s{n}"

    @staticmethod
    @opero(cache=True, retries=1)
    async def below_sm(n: int) -> str:
        AsyncMaker.created.append(("below_sm", n))
        return f"s{n}"


@pytest.mark.parametrize("name", ["above_cm", "below_cm", "above_sm", "below_sm"])
async def test_async_classmethods_and_staticmethods_both_ways(name):
    AsyncMaker.created.clear()
    expected = "AsyncMaker3" if name.endswith("cm") else "s3"
    assert inspect.iscoroutinefunction(getattr(AsyncMaker, name))
    assert await getattr(AsyncMaker, name)(3) == expected
    assert await getattr(AsyncMaker(), name)(n=3) == expected
    assert AsyncMaker.created == [(name, 3)]


@pytest.mark.parametrize("name", ["above_cm", "below_cm", "above_sm", "below_sm"])
def test_classmethods_and_staticmethods_both_ways(name):
    Maker.created.clear()
    expected = "Maker3" if name.endswith("cm") else "s3"
    assert getattr(Maker, name)(3) == expected
    assert getattr(Maker(), name)(3) == expected
    assert getattr(Maker, name)(n=3) == expected
    assert Maker.created == [(name, 3)]
    assert getattr(Maker, name)(4) != expected
    assert len(Maker.created) == 2


def test_cache_clear_and_clear_cache(mode):
    calls: list[object] = []
    f = opero(cache=True, cache_namespace="test-memory-clear")(mode.fn(counted(calls)))
    mode.run(f, 1)
    mode.run(f, 2)
    assert f.cache_clear() == 2
    mode.run(f, 1)
    assert len(calls) == 3
    assert clear_cache("test-memory-clear") == 1
    mode.run(f, 1)
    assert len(calls) == 4


def test_namespaces_separate_caches():
    calls: list[object] = []
    body = counted(calls)
    f = opero(cache=True, cache_namespace="ns-a")(body)
    f(1)
    f(1)
    assert clear_cache("ns-b") == 0
    assert len(calls) == 1


@pytest.mark.timeout(10)
def test_single_flight_across_event_loops_in_two_threads():
    calls: list[object] = []
    entered = threading.Event()
    release = threading.Event()

    @opero(cache=True)
    async def slow(a: int) -> int:
        calls.append(a)
        entered.set()
        while not release.is_set():
            await asyncio.sleep(0.005)
        return a + 1

    results: list[object] = []
    leader = threading.Thread(target=lambda: results.append(asyncio.run(slow(1))))
    follower = threading.Thread(target=lambda: results.append(asyncio.run(slow(1))))
    leader.start()
    entered.wait(5)
    follower.start()
    time.sleep(0.05)  # the follower's loop now waits on the leader's flight
    release.set()
    leader.join(5)
    follower.join(5)
    assert results == [2, 2]
    assert calls == [1]


async def test_cancelled_follower_leaves_no_unretrieved_future(caplog):
    # asyncio reports a failed future nobody awaited ("exception was never retrieved") when it
    # is collected, at some random later point; a follower that was cancelled must not leave one.
    @opero(cache=True)
    async def slow(a: int) -> int:
        await asyncio.sleep(0.02)
        raise ValueError("leader failed")

    async def scenario() -> None:
        leader = asyncio.create_task(slow(1))
        await asyncio.sleep(0)
        follower = asyncio.create_task(slow(1))
        await asyncio.sleep(0.005)
        follower.cancel()
        with pytest.raises(ValueError, match="leader failed"):
            await leader
        for _ in range(3):
            await asyncio.sleep(0)

    await scenario()
    gc.collect()
    assert "never retrieved" not in caplog.text
