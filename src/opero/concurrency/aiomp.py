"""``mode="aiomultiprocess"``: an aiomultiprocess ``Pool``, supervised by opero.

aiomultiprocess waits forever for a call whose worker died, cannot pickle lambdas and returns
errors as traceback text. So the pool runs on an event loop in a helper thread, every call
travels as cloudpickle bytes to a module-level coroutine (lambdas and closures work, outcomes
keep their exception types), and a watcher checks the worker processes: when one dies, the
calls in flight on that pool fail with WorkerCrashedError (aiomultiprocess does not say which
call a worker ran) and the pool is replaced. At most ``workers`` calls are in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import os
import pickle
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import aiomultiprocess
import cloudpickle

from opero.concurrency import Backend, settle_future
from opero.concurrency._portable import pickle_outcome
from opero.errors import WorkerCrashedError


async def _ainvoke(payload: bytes) -> bytes:
    """Runs in the worker: the call's outcome as ``(ok, value)`` cloudpickle bytes."""
    try:
        fn, args, kwargs = pickle.loads(payload)
        value = fn(*args, **kwargs)
        if inspect.iscoroutine(value):
            value = await value
    except (Exception, SystemExit) as exc:  # sys.exit() in an item is its outcome
        return pickle_outcome(False, exc, cloudpickle.dumps)
    return pickle_outcome(True, value, cloudpickle.dumps)


class AioMultiprocessBackend(Backend):
    """Coroutines on event loops in up to one process per core, ``workers`` calls in flight."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self._processes = max(1, min(workers, os.cpu_count() or 1))
        self._concurrency = math.ceil(workers / self._processes)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="opero-aiomultiprocess", daemon=True
        )
        self._started = False
        self._lock = threading.Lock()
        self._closed = False
        self._pool: Any = None
        self._seen: list[Any] = []
        self._calls: set[asyncio.Task[Any]] = set()
        self._crashed: dict[asyncio.Task[Any], str] = {}
        self._gate: asyncio.Semaphore | None = None
        self._watcher: asyncio.Task[None] | None = None

    def submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Future[Any]:
        try:
            payload = cloudpickle.dumps((fn, args, kwargs))
        except Exception as exc:
            failed: Future[Any] = Future()
            failed.set_exception(exc)
            return failed
        with self._lock:
            if self._closed:
                raise RuntimeError("this aiomultiprocess pool is closed")
            if not self._started:
                self._started = True
                self._thread.start()
        inner = asyncio.run_coroutine_threadsafe(self._call(payload), self._loop)
        outer: Future[Any] = Future()  # pending until the outcome: cancel() reaches the call

        def relay(done: Future[tuple[bool, Any]]) -> None:
            if done.cancelled():
                outer.cancel()
                return
            exc = done.exception()
            if exc is not None:
                settle_future(outer, False, exc)
            else:
                settle_future(outer, *done.result())

        inner.add_done_callback(relay)
        outer.add_done_callback(lambda f: inner.cancel() if f.cancelled() else None)
        return outer

    async def _call(self, payload: bytes) -> tuple[bool, Any]:
        """The call's ``(ok, value)``. The item's own exception is returned, not raised: a
        SystemExit raised here would stop this backend's event loop."""
        if self._gate is None:
            self._gate = asyncio.Semaphore(self.workers)
        async with self._gate:
            if self._pool is None:
                self._pool = aiomultiprocess.Pool(
                    self._processes, childconcurrency=self._concurrency
                )
                self._seen = []
            if self._watcher is None:
                self._watcher = asyncio.ensure_future(self._watch())
            task = asyncio.ensure_future(self._pool.apply(_ainvoke, (payload,)))
            self._calls.add(task)
            try:
                data = await task
            except asyncio.CancelledError:
                reason = self._crashed.pop(task, None)
                if reason is None:
                    raise
                raise WorkerCrashedError(reason) from None
            finally:
                self._calls.discard(task)
        ok, value = pickle.loads(data)
        return bool(ok), value

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            pool = self._pool
            if pool is None:
                continue
            for proc in list(pool.processes):
                if proc not in self._seen:
                    self._seen.append(proc)
            dead = [p for p in self._seen if p.exitcode is not None]
            if not dead:
                continue
            self._pool = None
            reason = (
                f"an aiomultiprocess worker process died (pid {dead[0].pid}, exit code "
                f"{dead[0].exitcode}) while this item was in flight"
            )
            for task in list(self._calls):
                self._crashed[task] = reason
                task.cancel()
            await _stop(pool)

    async def _shutdown(self, cancel: bool) -> None:
        if not cancel and self._calls:
            await asyncio.gather(*self._calls, return_exceptions=True)
        for task in list(self._calls):
            task.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await _stop(pool)

    def close(self, *, cancel: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            started = self._started
        if not started:
            self._loop.close()
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(cancel), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not threading.current_thread():
            self._thread.join()
            self._loop.close()


async def _stop(pool: Any) -> None:
    pool.terminate()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(pool.join(), timeout=5)
