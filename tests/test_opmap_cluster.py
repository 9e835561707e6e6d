"""@opmap on Ray and Dask, for real: a local Ray instance with 2 CPUs and a Dask LocalCluster with
2 worker processes, each started once for the session.

When an engine is not installed its tests skip, naming the extra; they fail instead when
OPERO_TEST_REQUIRE names the engine (as on CI).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from opero import OperoError, OpmapError, opmap
from opero.errors import MissingExtraError, RemoteError, WorkerCrashedError
from opero.testing import fake_time

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]

ENGINES = ["ray", "dask"]


def _require(engine: str, module: str) -> Any:
    """Import ``module`` or skip (fail when OPERO_TEST_REQUIRE names ``engine``)."""
    try:
        return __import__(module)
    except ImportError:
        reason = f"{engine} is not installed: pip install 'opero[{engine}]'"
        if engine in os.environ.get("OPERO_TEST_REQUIRE", "").split(","):
            pytest.fail(reason)
        pytest.skip(reason)


def _send_by_value() -> None:
    # The cluster workers do not have tests/ on their path: ship this module's functions and
    # classes by value (Ray's cloudpickle is a copy of its own).
    module = sys.modules[__name__]
    for pickler in ("cloudpickle", "ray.cloudpickle"):
        try:
            __import__(pickler)
        except ImportError:
            continue
        sys.modules[pickler].register_pickle_by_value(module)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    ray = _require("ray", "ray")
    _send_by_value()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def dask_cluster() -> Iterator[Any]:
    """The session's LocalCluster; tests use ``dask_client`` unless they need the cluster."""
    distributed = _require("dask", "distributed")
    _send_by_value()
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
    )
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def dask_client(dask_cluster: Any) -> Iterator[Any]:
    import distributed

    client = distributed.Client(dask_cluster, set_as_default=False)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """``engine(**options)``: an @opmap decorator for the engine under test."""
    if request.param == "ray":
        request.getfixturevalue("ray_cluster")
        cluster = None
    else:
        cluster = request.getfixturevalue("dask_client")
    made: list[Any] = []

    def decorator(**options: Any) -> Callable[[Callable[..., Any]], Any]:
        def decorate(func: Callable[..., Any]) -> Any:
            options.setdefault("workers", 2)
            options.setdefault("cluster", cluster)
            decorated = opmap(mode=request.param, **options)(func)
            made.append(decorated)
            return decorated

        return decorate

    yield decorator
    for decorated in made:
        decorated.close()


def run(result: Any) -> Any:
    return asyncio.run(result) if asyncio.iscoroutine(result) else result


# -- item functions ------------------------------------------------------------------------------


def slow_square(x: int, delay: float = 0.0) -> int:
    time.sleep(delay * (x % 3))  # later items often finish first
    return x * x


class Refused(Exception):
    """An exception type that exists only in this module (sent by value)."""


class Unpicklable(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def fail_on_odd(x: int) -> int:
    if x % 2:
        raise Refused(f"odd {x}")
    return x


def first_time_fails(x: int, marks: str, how: str) -> int:
    """Fails (``how``: raise, or kill its own worker) on its first call for ``x``, then works."""
    mark = Path(marks) / f"{x}.done"
    if not mark.exists():
        mark.touch()
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise Refused(f"first try for {x}")
    return x * 10


def kill_once(x: int, marks: str) -> int:
    """Item 2 kills its worker process the first time it runs."""
    if x == 2:
        return first_time_fails(x, marks, "kill")
    return x * 10


def span(x: float) -> tuple[float, float]:
    start = time.time()
    time.sleep(x)
    return start, time.time()


def max_overlap(spans: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    depth = best = 0
    for _, step in events:
        depth += step
        best = max(best, depth)
    return best


# -- the map semantics, on each engine -----------------------------------------------------------


def test_results_in_input_order(engine: Callable[..., Any]) -> None:
    f = engine()(slow_square)
    assert f(range(12), delay=0.01) == [x * x for x in range(12)]
    assert f([]) == []


def test_unordered_gives_every_result(engine: Callable[..., Any]) -> None:
    f = engine(ordered=False, retries=1)(slow_square)
    assert sorted(f(range(10), delay=0.01)) == [x * x for x in range(10)]


def test_closure_and_lambda(engine: Callable[..., Any]) -> None:
    offset = 100

    def shifted(x: int) -> int:
        return x + offset

    assert engine()(shifted)(range(5)) == [100, 101, 102, 103, 104]
    assert engine()(lambda x: -x)(range(3)) == [0, -1, -2]


def test_async_function(engine: Callable[..., Any]) -> None:
    async def double(x: int, factor: int = 2) -> int:
        await asyncio.sleep(0.01)
        return x * factor

    f = engine()(double)
    assert asyncio.run(f(range(6), factor=3)) == [0, 3, 6, 9, 12, 15]

    async def streamed() -> list[int]:
        return [value async for value in f.stream(range(4))]

    assert asyncio.run(streamed()) == [0, 2, 4, 6]


def test_extra_keyword_arguments_reach_every_call(engine: Callable[..., Any]) -> None:
    def tag(item: int, *, label: str, sep: str = ":") -> str:
        return f"{label}{sep}{item}"

    assert engine()(tag)(range(3), label="n", sep="=") == ["n=0", "n=1", "n=2"]


def test_on_error_return_keeps_the_original_exception(engine: Callable[..., Any]) -> None:
    results = engine(on_error="return")(fail_on_odd)(range(5))
    assert results[0::2] == [0, 2, 4]
    for index in (1, 3):
        assert type(results[index]) is Refused
        assert str(results[index]) == f"odd {index}"


def test_on_error_raise_reports_every_failed_item(engine: Callable[..., Any]) -> None:
    with pytest.raises(OpmapError) as info:
        engine()(fail_on_odd)(range(5))
    assert sorted(info.value.errors) == [1, 3]
    assert isinstance(info.value.errors[1], Refused)
    assert info.value.results[0::2] == [0, 2, 4]


def test_exception_that_cannot_travel_becomes_remote_error(engine: Callable[..., Any]) -> None:
    def refuse(x: int) -> int:
        raise Unpicklable(f"no {x}")

    def unpicklable_result(x: int) -> object:
        return threading.Lock()

    [error] = engine(on_error="return")(refuse)([7])
    assert isinstance(error, RemoteError)
    assert error.type_name.endswith("Unpicklable")
    assert error.message == "no 7"
    [error] = engine(on_error="return")(unpicklable_result)([1])
    assert isinstance(error, RemoteError)
    assert "could not be pickled" in error.message


def test_stream_reads_the_input_lazily(engine: Callable[..., Any]) -> None:
    read: list[int] = []

    def items() -> Iterator[int]:
        for x in range(1000):
            read.append(x)
            yield x

    stream = engine(workers=2)(slow_square).stream(items())
    assert [next(stream) for _ in range(3)] == [0, 1, 4]
    stream.close()
    assert len(read) <= 3 + 2 * 2 + 1  # what was consumed plus the window of 2 x workers


@pytest.mark.parametrize("per_item", [False, True], ids=["plain", "per-item-chain"])
def test_at_most_workers_tasks_at_once(engine: Callable[..., Any], per_item: bool) -> None:
    # The clusters have 2 CPUs: with workers=1 the limit is opero's, not the engine's.
    options = {"retries": 1} if per_item else {}
    spans = engine(workers=1, **options)(span)([0.05] * 6)
    assert max_overlap(spans) == 1


def test_retries_and_cache_run_in_the_caller(engine: Callable[..., Any], tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    calls.mkdir()

    def counted(x: int, marks: str) -> int:
        with open(Path(marks) / f"{x}.log", "a") as log:
            log.write("x")
        return first_time_fails(x, marks, "raise")

    with fake_time():  # the backoff sleeps happen here, in the caller
        f = engine(retries=1, retry_on=Refused, cache=True)(counted)
        assert f([1, 2, 1, 3, 2], marks=str(calls)) == [10, 20, 10, 30, 20]
        assert f([3, 1], marks=str(calls)) == [30, 10]  # from the cache: no new calls
    # one failed and one good call per distinct item, whatever the duplicates
    assert {p.name: p.read_text() for p in calls.glob("*.log")} == {
        "1.log": "xx",
        "2.log": "xx",
        "3.log": "xx",
    }


# -- which cluster, and who closes it ------------------------------------------------------------


def test_cluster_option_is_checked_when_decorating() -> None:
    with pytest.raises(ValueError, match="cluster"):
        opmap(mode="thread", cluster="127.0.0.1:8786")


@pytest.mark.parametrize("bad", ["", 42])
def test_bad_cluster_value_names_the_option(engine: Callable[..., Any], bad: object) -> None:
    with pytest.raises(ValueError, match="cluster"):
        engine(cluster=bad)(slow_square)


@pytest.mark.parametrize(("mode", "module"), [("ray", "ray"), ("dask", "distributed")])
def test_missing_engine_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, mode: str, module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # type: ignore[arg-type]
    monkeypatch.delitem(sys.modules, f"opero.concurrency.{mode}", raising=False)
    with pytest.raises(MissingExtraError, match=rf"opero\[{mode}\]") as info:
        opmap(mode=mode)
    assert info.value.extra == mode


@pytest.mark.parametrize(("required", "outcome"), [("redis,ray", "fail"), ("redis", "skip")])
def test_a_missing_engine_skips_unless_required(
    monkeypatch: pytest.MonkeyPatch, required: str, outcome: str
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # type: ignore[arg-type]
    monkeypatch.setenv("OPERO_TEST_REQUIRE", required)
    expected = pytest.fail.Exception if outcome == "fail" else pytest.skip.Exception
    with pytest.raises(expected, match=r"opero\[ray\]"):
        _require("ray", "ray")


def test_ray_started_by_the_user_stays_up(ray_cluster: Any) -> None:
    f = opmap(mode="ray", workers=2)(slow_square)
    assert f(range(3)) == [0, 1, 4]
    f.close()
    assert ray_cluster.is_initialized()
    assert ray_cluster.get(ray_cluster.put(5)) == 5


def test_dask_client_of_the_user_stays_open(dask_client: Any) -> None:
    f = opmap(mode="dask", cluster=dask_client)(slow_square)
    assert f(range(3)) == [0, 1, 4]
    f.close()
    assert dask_client.status == "running"
    assert dask_client.submit(abs, -3).result() == 3


def _worker_address(x: int) -> str:
    import distributed

    return str(distributed.get_worker().address)


def test_dask_scheduler_address_from_option_cluster_object_and_environment(
    dask_client: Any, dask_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours = set(dask_client.scheduler_info()["workers"])
    for cluster in (dask_cluster.scheduler_address, dask_cluster):
        f = opmap(mode="dask", cluster=cluster)(_worker_address)
        assert set(f(range(4))) <= ours
        f.close()
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", dask_cluster.scheduler_address)
    g = opmap(mode="dask")(_worker_address)
    assert set(g(range(4))) <= ours
    g.close()
    assert dask_client.status == "running"  # closing opero's clients left the cluster alone


def test_dask_local_cluster_started_by_opero_is_released_on_close(
    dask_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    f = opmap(mode="dask", workers=1)(_worker_address)
    [address] = set(f(range(3)))
    assert address not in dask_client.scheduler_info()["workers"]
    f.close()
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=2):
        pass


_RAY_SCRIPT = """
import os, ray
from opero import opmap

if __name__ == "__main__":
    f = opmap(mode="ray", workers=3)(lambda x: x + 1)
    print("result", f(range(4)))
    print("cpus", ray.cluster_resources().get("CPU"))
    f.close()
    print("connected after close", ray.is_initialized())
"""


def _run_ray_script(tmp_path: Path, env: dict[str, str]) -> str:
    script = tmp_path / "ray_script.py"
    script.write_text(textwrap.dedent(_RAY_SCRIPT))
    out = subprocess.run(
        [sys.executable, str(script)],
        check=False,
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "result [1, 2, 3, 4]" in out.stdout
    assert "connected after close False" in out.stdout
    return out.stdout


def test_ray_local_instance_started_by_opero_is_stopped_on_close(tmp_path: Path) -> None:
    _require("ray", "ray")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    assert "cpus 3.0" in _run_ray_script(tmp_path, env)  # its own instance: num_cpus=workers


def test_ray_address_connects_to_a_running_cluster_and_leaves_it_up(
    ray_cluster: Any, tmp_path: Path
) -> None:
    address = ray_cluster.get_runtime_context().gcs_address
    stdout = _run_ray_script(tmp_path, {**os.environ, "RAY_ADDRESS": address})
    assert "cpus 2.0" in stdout  # the session's cluster, not a new one with 3 CPUs
    assert ray_cluster.get(ray_cluster.put(7)) == 7  # its disconnect left the cluster up


# -- dead workers ----------------------------------------------------------------------------------


@pytest.fixture
def full_dask_client(dask_client: Any) -> Any:
    """The session client once both workers are up (a test before may have killed one)."""
    dask_client.wait_for_workers(2, timeout=60)
    return dask_client


def test_dask_worker_killed_mid_map_is_rescheduled(full_dask_client: Any, tmp_path: Path) -> None:
    f = opmap(mode="dask", cluster=full_dask_client, workers=2)(kill_once)
    # item 2 kills its worker on its first run; Dask runs it again on a live worker
    assert f([1, 2, 3, 4], marks=str(tmp_path)) == [10, 20, 30, 40]
    f.close()


def test_dask_worker_deaths_reach_the_caller_as_worker_crashed(
    full_dask_client: Any, dask_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Dask gives up on a task at once (KilledWorker) when no failure is allowed. (It then also
    # fails the tasks queued behind it on that worker, so the killer item runs alone here.)
    monkeypatch.setattr(dask_cluster.scheduler, "allowed_failures", 0)
    (tmp_path / "a").mkdir()
    f = opmap(mode="dask", cluster=full_dask_client, workers=2, on_error="return")(kill_once)
    [result] = f([2], marks=str(tmp_path / "a"))
    assert isinstance(result, WorkerCrashedError)
    assert "KilledWorker" in repr(result.__cause__)
    f.close()
    # retried by opero when retry_on covers it: the second attempt runs on a live worker
    (tmp_path / "b").mkdir()
    with fake_time():
        g = opmap(
            mode="dask",
            cluster=full_dask_client,
            workers=2,
            retries=1,
            retry_on=WorkerCrashedError,
        )(kill_once)
        assert g([2], marks=str(tmp_path / "b")) == [20]
    g.close()


def test_dask_worker_killed_from_outside(full_dask_client: Any) -> None:
    pids = full_dask_client.run(os.getpid)
    f = opmap(mode="dask", cluster=full_dask_client, workers=2, on_error="return")(span)
    stream = f.stream([0.5] * 4 + [0.01] * 4)
    assert isinstance(next(stream), tuple)
    os.kill(next(iter(pids.values())), signal.SIGKILL)
    results = list(stream)
    assert len(results) == 7
    for result in results:
        assert isinstance(result, tuple | WorkerCrashedError)
    f.close()


def test_dask_client_closed_mid_map_fails_the_items_without_hanging(
    dask_cluster: Any,
) -> None:
    import distributed

    client = distributed.Client(dask_cluster.scheduler_address, set_as_default=False)
    f = opmap(mode="dask", cluster=client, workers=2, on_error="return")(span)
    stream = f.stream([0.01] + [1.0] * 4)
    assert isinstance(next(stream), tuple)
    client.close()
    rest = list(stream)
    assert len(rest) == 4
    for result in rest:
        assert isinstance(result, Exception)  # WorkerCrashedError, or Dask's ClosedClientError
    f.close()


def test_ray_worker_death_is_worker_crashed_and_retried(ray_cluster: Any, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    f = opmap(mode="ray", workers=2, on_error="return")(kill_once)
    results = f([1, 2, 3], marks=str(tmp_path / "a"))
    assert results[0::2] == [10, 30]
    assert isinstance(results[1], WorkerCrashedError)
    f.close()
    (tmp_path / "b").mkdir()
    with fake_time():
        g = opmap(mode="ray", workers=2, retries=1, retry_on=WorkerCrashedError)(kill_once)
        assert g([1, 2, 3], marks=str(tmp_path / "b")) == [10, 20, 30]
    g.close()


# -- a cold cluster ------------------------------------------------------------------------------

_COLD_SCRIPT = """
import sys, time
from opero import opmap

def work(x):
    started = time.time()
    time.sleep(0.3)
    return started

if __name__ == "__main__":
    f = opmap(mode=sys.argv[1], workers=4, rate_limit=5)(work)
    print("starts", *f(range(12)))
    f.close()
"""


def most_starts_in_one_second(starts: list[float]) -> int:
    starts = sorted(starts)
    return max(sum(1 for t in starts if first <= t < first + 1.0) for first in starts)


@pytest.mark.parametrize("mode", ENGINES)
def test_rate_limit_holds_on_the_first_map_of_a_cold_cluster(mode: str, tmp_path: Path) -> None:
    # Regression: the limiter granted start slots while the cluster opero started was still
    # coming up; the calls queued meanwhile then started together (8 in one second here).
    _require(mode, "ray" if mode == "ray" else "distributed")
    script = tmp_path / "cold.py"
    script.write_text(textwrap.dedent(_COLD_SCRIPT))
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DASK_SCHEDULER_ADDRESS")
    }
    out = subprocess.run(
        [sys.executable, str(script), mode],
        check=False,
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    [line] = [line for line in out.stdout.splitlines() if line.startswith("starts")]
    starts = [float(t) for t in line.split()[1:]]
    assert len(starts) == 12
    assert most_starts_in_one_second(starts) <= 5 + 1, starts
    assert "SIGTERM handler is not set" not in out.stderr


def test_dask_cluster_without_workers_fails_after_a_bounded_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    distributed = _require("dask", "distributed")
    from opero.concurrency.dask import DaskBackend

    monkeypatch.setattr(DaskBackend, "ready_timeout", 0.5)
    with (
        distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=None) as empty,
        distributed.Client(empty, set_as_default=False) as client,
    ):
        limited = opmap(mode="dask", cluster=client, rate_limit=5)(slow_square)
        with pytest.raises(OperoError, match=r"not ready after 0\.5 s"):
            limited(range(3))
        limited.close()
        plain = opmap(mode="dask", cluster=client, on_error="return")(slow_square)
        outcomes = plain(range(3))
        plain.close()
    assert all(isinstance(o, OperoError) and "not ready" in str(o) for o in outcomes)


def test_ray_cluster_without_free_cpus_fails_after_a_bounded_wait(
    ray_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opero.concurrency.ray import RayBackend

    monkeypatch.setattr(RayBackend, "ready_timeout", 0.5)
    hog = ray_cluster.remote(num_cpus=1)(span)
    busy = [hog.remote(2.0) for _ in range(2)]  # both of the session's CPUs
    try:
        limited = opmap(mode="ray", workers=2, rate_limit=5)(slow_square)
        with pytest.raises(OperoError, match=r"not ready after 0\.5 s"):
            limited(range(3))
        limited.close()
    finally:
        ray_cluster.get(busy)
