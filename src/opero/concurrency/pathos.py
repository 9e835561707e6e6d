"""``mode="pathos"``: a pathos ``ProcessPool`` (dill serialisation), supervised by opero.

A pathos pool waits forever for a call whose worker died and for an outcome it cannot unpickle,
and shares pools between instances through a global cache. So each backend gets a pool of its
own (a unique pool id), outcomes travel as dill bytes that are decoded here (a failure becomes a
RemoteError), and a watcher thread checks the worker processes: when one dies, the calls in
flight on that pool fail with WorkerCrashedError (pathos does not say which call a worker ran,
so every call running at that moment fails) and the pool is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import Any

import dill
from pathos.pools import ProcessPool

from opero.concurrency import Backend
from opero.errors import RemoteError, WorkerCrashedError

_ids = itertools.count()


def _invoke(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Runs in the worker: the call's outcome as dill bytes, never an exception."""
    try:
        value = fn(*args, **kwargs)
        if inspect.iscoroutine(value):
            value = asyncio.run(value)
    except Exception as exc:
        try:
            dill.loads(dill.dumps(exc))
        except Exception:
            exc = RemoteError(
                f"{type(exc).__module__}.{type(exc).__qualname__}",
                str(exc),
                "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
            )
        data: bytes = dill.dumps((False, exc))
        return data
    try:
        data = dill.dumps((True, value))
    except Exception as exc:
        data = dill.dumps(
            (False, RemoteError(type(exc).__qualname__, f"the result could not be pickled: {exc}"))
        )
    return data


class PathosBackend(Backend):
    """``workers`` pathos processes; dead workers are detected and the pool rebuilt."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self._lock = threading.Lock()
        self._pool: Any = None
        self._in_flight: dict[int, Future[Any]] = {}
        self._seen: list[Any] = []
        self._ids = itertools.count()
        self._closed = False
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()

    def _ensure_pool(self) -> Any:  # called with the lock held
        if self._pool is None:
            self._pool = ProcessPool(self.workers, id=f"opero-{next(_ids)}")
            # Workers start with the pool: note them now, before one can die unseen.
            self._seen = list(getattr(self._pool._serve(), "_pool", ()))
        if self._watcher is None:
            self._watcher = threading.Thread(
                target=self._watch, name="opero-pathos-watch", daemon=True
            )
            self._watcher.start()
        return self._pool._serve()

    def submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_running_or_notify_cancel()
        with self._lock:
            if self._closed:
                raise RuntimeError("this pathos pool is closed")
            pool = self._ensure_pool()
            key = next(self._ids)
            self._in_flight[key] = future

            def done(data: bytes) -> None:
                self._settle(key, data)

            def failed(exc: BaseException) -> None:
                self._settle(key, dill.dumps((False, exc)))

            pool.apply_async(_invoke, (fn, args, kwargs), callback=done, error_callback=failed)
        return future

    def _settle(self, key: int, data: bytes) -> None:
        with self._lock:
            future = self._in_flight.pop(key, None)
        if future is None or future.done():
            return
        try:
            ok, value = dill.loads(data)
        except Exception as exc:
            ok, value = False, RemoteError(type(exc).__qualname__, f"cannot unpickle: {exc}")
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            with self._lock:
                if self._pool is None:
                    continue
                mp_pool = self._pool._serve()
                for proc in list(getattr(mp_pool, "_pool", ())):
                    if proc not in self._seen:
                        self._seen.append(proc)
                dead = [p for p in self._seen if p.exitcode is not None]
                if not dead:
                    continue
                crashed, self._in_flight = self._in_flight, {}
                old, self._pool = self._pool, None
            _terminate(old)
            for future in crashed.values():
                if not future.done():
                    future.set_exception(
                        WorkerCrashedError(
                            f"a pathos worker process died (pid {dead[0].pid}, exit code "
                            f"{dead[0].exitcode}) while this item was in flight"
                        )
                    )

    def close(self, *, cancel: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None and not cancel:
            with contextlib.suppress(Exception):
                pool._serve().close()
                pool._serve().join()
        self._stop.set()
        if pool is not None:
            _terminate(pool)
        with self._lock:
            left, self._in_flight = self._in_flight, {}
        for future in left.values():
            if not future.done():
                future.set_exception(CancelledError())


def _terminate(pool: Any) -> None:
    with contextlib.suppress(Exception):
        mp_pool = pool._serve()
        mp_pool.terminate()
        mp_pool.join()
    with contextlib.suppress(Exception):
        pool._clear()
