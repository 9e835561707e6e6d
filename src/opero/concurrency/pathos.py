"""``mode="pathos"``: a pathos ``ProcessPool`` (dill serialisation), supervised by opero.

A pathos pool waits forever for a call whose worker died and for an outcome it cannot unpickle,
and shares pools between instances through a global cache. So each backend gets a pool of its
own (a unique pool id), outcomes travel as dill bytes that are decoded here (a failure becomes a
RemoteError), and a watcher thread checks the worker processes.

Only ``workers`` calls are handed to pathos at a time; the rest wait here. Each call handed over
gets a slot in a small shared array where the worker writes its pid when the call starts, so when
a worker dies exactly the call it was running fails with WorkerCrashedError. The pool is then
retired: calls already running on its live workers finish there, calls it has not started come
back unrun (the worker sees the retired flag) and go to a fresh pool with the queued ones.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import itertools
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, wait
from dataclasses import dataclass, field
from typing import Any

import dill
import multiprocess
from pathos.pools import ProcessPool

from opero.concurrency import Backend, settle_future
from opero.concurrency._portable import pickle_outcome
from opero.errors import RemoteError, WorkerCrashedError

_ids = itertools.count()

# A retired pool whose handed-over call has still not started after this long is taken to be
# stuck (a worker killed while holding the pool's task-queue lock blocks every other worker).
_STUCK_AFTER = 2.0

_slots: Any = None  # in a worker: its pool's shared slot array (pids; the last entry = retired)


def _init(slots: Any) -> None:
    """Runs once in every worker of a pool (pool initializer)."""
    global _slots  # noqa: PLW0603 - per-process state handed over by the pool
    _slots = slots


def _invoke(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], slot: int
) -> bytes | None:
    """Runs in the worker: the call's outcome as dill bytes, never an exception; ``None`` when
    the pool was retired before the call started (the caller sends it to the next pool)."""
    # The pid goes in first: a call that saw no retired flag is then known to have started.
    _slots[slot] = os.getpid()
    if _slots[len(_slots) - 1]:
        return None
    try:
        value = fn(*args, **kwargs)
        if inspect.iscoroutine(value):
            value = asyncio.run(value)
    except (Exception, SystemExit) as exc:  # sys.exit() in an item is its outcome
        return pickle_outcome(False, exc, dill.dumps, dill.loads)
    return pickle_outcome(True, value, dill.dumps, dill.loads)


@dataclass
class _Call:
    future: Future[Any]
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    slot: int = -1


@dataclass
class _Pool:
    """One pathos pool and the calls handed to it."""

    workers: int
    slots: Any = None
    pathos: Any = None
    mp: Any = None
    seen: list[Any] = field(default_factory=list)
    free: list[int] = field(default_factory=list)
    calls: dict[int, _Call] = field(default_factory=dict)
    buried: set[int] = field(default_factory=set)  # pids of dead workers already handled
    retired_at: float | None = None

    def __post_init__(self) -> None:
        self.slots = multiprocess.Array("q", self.workers + 1, lock=False)
        self.pathos = ProcessPool(
            self.workers, id=f"opero-{next(_ids)}", initializer=_init, initargs=(self.slots,)
        )
        self.mp = self.pathos._serve()
        # Workers start with the pool: note them now, before one can die unseen.
        self.seen = list(getattr(self.mp, "_pool", ()))
        self.free = list(range(self.workers))

    def retire(self) -> None:
        if self.retired_at is None:
            self.retired_at = time.monotonic()
            self.slots[self.workers] = 1


class PathosBackend(Backend):
    """``workers`` pathos processes; dead workers are detected and the pool rebuilt."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self._lock = threading.Lock()
        self._pool: _Pool | None = None  # the pool new calls go to
        self._retired: list[_Pool] = []  # pools finishing the calls they had started
        self._queue: collections.deque[_Call] = collections.deque()
        self._running = 0  # calls handed to pathos, over every pool
        self._keys = itertools.count()
        self._closed = False
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()

    def submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("this pathos pool is closed")
            if self._watcher is None:
                self._watcher = threading.Thread(
                    target=self._watch, name="opero-pathos-watch", daemon=True
                )
                self._watcher.start()
            self._queue.append(_Call(future, fn, args, kwargs))
            self._pump()
        return future

    def _pump(self) -> None:  # called with the lock held
        """Hand queued calls to the current pool while fewer than ``workers`` run."""
        while self._queue and self._running < self.workers and not self._stop.is_set():
            call = self._queue.popleft()
            # A call sent back unrun by a retired pool is already running (as the caller sees it).
            if not call.future.running() and not call.future.set_running_or_notify_cancel():
                continue  # cancelled before it started: it never starts
            if self._pool is None:
                self._pool = _Pool(self.workers)
            pool, key = self._pool, next(self._keys)
            call.slot = pool.free.pop()
            pool.slots[call.slot] = 0
            pool.calls[key] = call
            self._running += 1

            def done(data: bytes | None, pool: _Pool = pool, key: int = key) -> None:
                self._settle(pool, key, data)

            def failed(exc: BaseException, pool: _Pool = pool, key: int = key) -> None:
                self._settle(pool, key, None, exc)  # e.g. the call could not be pickled

            pool.mp.apply_async(
                _invoke,
                (call.fn, call.args, call.kwargs, call.slot),
                callback=done,
                error_callback=failed,
            )

    def _release(self, pool: _Pool, key: int) -> _Call | None:  # called with the lock held
        call = pool.calls.pop(key, None)
        if call is not None:
            pool.free.append(call.slot)
            self._running -= 1
        return call

    def _settle(
        self, pool: _Pool, key: int, data: bytes | None, error: BaseException | None = None
    ) -> None:
        # Runs on the pool's result thread, which must never raise (pathos would hang).
        unrun = data is None and error is None  # the pool was retired before the call started
        with self._lock:
            call = self._release(pool, key)
            if call is not None and unrun:
                self._queue.appendleft(call)
            self._pump()
        if call is None or unrun:
            return
        if data is None:
            settle_future(call.future, False, error)
            return
        try:
            ok, value = dill.loads(data)
        except Exception as exc:
            ok, value = False, RemoteError(type(exc).__qualname__, f"cannot unpickle: {exc}")
        settle_future(call.future, ok, value)

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            lost: list[tuple[_Call, str]] = []
            finished: list[_Pool] = []
            with self._lock:
                pools = [*self._retired, *([self._pool] if self._pool else [])]
                for pool in pools:
                    lost += self._check(pool)
                    if pool.retired_at is not None and pool is self._pool:
                        self._pool = None
                        self._retired.append(pool)
                for pool in list(self._retired):
                    if not pool.calls:
                        self._retired.remove(pool)
                        finished.append(pool)
                if lost:
                    self._pump()
            for call, why in lost:
                settle_future(call.future, False, WorkerCrashedError(why))
            for pool in finished:  # in the background: a stuck pool must not stop the watcher
                threading.Thread(target=_terminate, args=(pool,), daemon=True).start()

    def _check(self, pool: _Pool) -> list[tuple[_Call, str]]:  # called with the lock held
        """The calls of ``pool`` lost to a dead worker (or to a stuck retired pool)."""
        lost: list[tuple[_Call, str]] = []
        for proc in list(getattr(pool.mp, "_pool", ())):
            if proc not in pool.seen:
                pool.seen.append(proc)
        for proc in pool.seen:
            if proc.exitcode is None or proc.pid in pool.buried:
                continue
            pool.buried.add(proc.pid)
            pool.retire()
            for key, call in list(pool.calls.items()):
                if pool.slots[call.slot] == proc.pid:
                    self._release(pool, key)
                    lost.append(
                        (
                            call,
                            f"a pathos worker process died (pid {proc.pid}, exit code "
                            f"{proc.exitcode}) while running this item",
                        )
                    )
        if pool.retired_at is not None and time.monotonic() - pool.retired_at > _STUCK_AFTER:
            for key, call in list(pool.calls.items()):
                if pool.slots[call.slot] == 0:
                    self._release(pool, key)
                    lost.append((call, "a pathos pool stopped taking calls after a worker died"))
        return lost

    def close(self, *, cancel: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if cancel:
                queued, self._queue = list(self._queue), collections.deque()
            outstanding = [c.future for c in self._queue]
            for pool in [*self._retired, *([self._pool] if self._pool else [])]:
                outstanding += [c.future for c in pool.calls.values()]
        if cancel:
            for call in queued:
                if not call.future.cancel():  # already sent back unrun by a retired pool
                    settle_future(call.future, False, CancelledError())
        else:
            wait(outstanding)  # the watcher keeps failing calls whose worker dies meanwhile
        self._stop.set()
        with self._lock:
            pools = [*self._retired, *([self._pool] if self._pool else [])]
            self._pool, self._retired, self._running = None, [], 0
            left = [c for pool in pools for c in pool.calls.values()]
            for pool in pools:
                pool.calls.clear()
        for call in left:
            settle_future(call.future, False, CancelledError())
        for pool in pools:
            _terminate(pool)


def _terminate(pool: _Pool) -> None:
    """Stop the pool's workers; returns within about a second even when the pool is stuck."""
    stopper = threading.Thread(target=_shut, args=(pool.pathos,), daemon=True)
    stopper.start()
    stopper.join(1.0)
    if stopper.is_alive():
        # terminate() waits for the task-queue lock, which a killed idle worker may hold forever
        # (the stopper thread then stays blocked): kill the workers directly instead.
        for proc in {*pool.seen, *getattr(pool.mp, "_pool", ())}:
            with contextlib.suppress(Exception):
                proc.kill()


def _shut(pool: Any) -> None:
    with contextlib.suppress(Exception):
        mp_pool = pool._serve()
        mp_pool.terminate()
        mp_pool.join()
    with contextlib.suppress(Exception):
        pool._clear()
