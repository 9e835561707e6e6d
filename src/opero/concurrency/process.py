"""``mode="process"`` and ``mode="async_process"``: a supervised pool of worker processes.

Why not ``multiprocessing.Pool`` or ``ProcessPoolExecutor``: the first waits forever for a call
whose worker died, the second fails every queued call and cannot pickle lambdas. Here one
dispatcher thread owns every worker and its pipe, so it always knows which calls each worker is
running. It waits on the pipes and the process sentinels together: a result completes its
future; a dead worker fails exactly the calls it was running with ``WorkerCrashedError`` and is
replaced on demand. Calls not started yet wait in the parent's queue, never on a worker's pipe,
and go to the idle worker (started if the pool is below its size), or the least busy one.

Functions travel with cloudpickle once per worker (closures and lambdas included, under every
start method); arguments and results travel per call. Workers start lazily, are reused across
calls, and ignore SIGINT: the parent decides when they stop.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import multiprocessing
import multiprocessing.forkserver
import os
import pickle
import struct
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from multiprocessing.connection import wait
from typing import Any, ClassVar

import cloudpickle

from opero.concurrency import Backend, ChunkCrashedError, _worker, settle_future
from opero.errors import RemoteError, WorkerCrashedError

_CALL = struct.Struct("!QQ")


def default_context() -> Any:
    """The start method the user chose if it is spawn or forkserver, else forkserver, else
    spawn."""
    # "fork" is also what get_start_method() fixes once anything asks, so only a deliberate
    # spawn/forkserver choice is honoured; forking the dispatcher's threaded parent is unsafe.
    chosen = multiprocessing.get_start_method(allow_none=True)
    if chosen == "spawn":
        return multiprocessing.get_context(chosen)
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        _preload_worker(ctx)
        return ctx
    return multiprocessing.get_context("spawn")


def _preload_worker(ctx: Any) -> None:
    """Have a forkserver that has not started yet import the worker code once, so each new
    worker is a cheap fork instead of a fresh import of opero (the user's preloads are kept)."""
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    if server is None or getattr(server, "_forkserver_pid", 1) is not None:
        return  # already running (or an unknown implementation): leave it alone
    modules = list(getattr(server, "_preload_modules", ["__main__"]))
    if _worker.__name__ not in modules:
        ctx.set_forkserver_preload([*modules, _worker.__name__])


class _Task:
    __slots__ = ("future", "id", "key", "payload", "pieces", "started")

    def __init__(self, task_id: int, future: Future[Any], key: int, payload: bytes) -> None:
        self.id = task_id
        self.future = future
        self.key = key
        self.payload = payload
        self.started = False
        self.pieces: list[_worker.Piece] = []  # a chunk's outcomes sent ahead of its return


class _Worker:
    __slots__ = ("broken", "conn", "functions", "proc", "progress", "tasks")

    def __init__(self, proc: Any, conn: Any, progress: Any) -> None:
        self.proc = proc
        self.conn = conn
        self.progress = progress  # the chunk item it runs (None: several calls at once)
        self.tasks: dict[int, _Task] = {}  # in the order sent, so the first one is running
        self.functions: set[int] = set()
        self.broken = False


class ProcessBackend(Backend):
    """``workers`` processes, each running one call at a time.

    A call goes to an idle process (started when none is idle and the pool is below
    ``workers``); when all are busy it waits in the parent for the first one to become free,
    never on a busy worker's pipe, where a short call would wait behind a long one.
    """

    batching = True
    concurrent_calls: ClassVar[bool] = False

    def __init__(self, workers: int, *, context: Any = None) -> None:
        super().__init__(workers)
        self._ctx = default_context() if context is None else context
        if self.concurrent_calls:
            self._processes = max(1, min(workers, os.cpu_count() or 1))
            self._capacity = math.ceil(workers / self._processes)
        else:
            # No call is queued on a busy worker: measured with 10,000 trivial items in chunks
            # and 200 x 10 ms items on 2 workers, the round trip it would save is not visible.
            self._processes = workers
            self._capacity = 1
        self._lock = threading.Lock()
        self._pending: deque[_Task] = deque()
        self._workers: list[_Worker] = []
        self._functions: dict[int, tuple[Callable[..., Any], int, bytes]] = {}
        self._fn_data: dict[int, bytes] = {}
        self._ids = itertools.count(1)
        self._wake_r, self._wake_w = multiprocessing.Pipe(duplex=False)
        self._woken = False
        self._closing = False
        self._cancel = False
        self._thread: threading.Thread | None = None

    # -- caller side ---------------------------------------------------------------------------

    def submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            key = self._function_key(fn)
            payload = b"C" + _CALL.pack(0, key) + _dumps_arguments(args, kwargs)
        except Exception as exc:  # unpicklable function or arguments: this item fails
            future.set_exception(exc)
            return future
        with self._lock:
            if self._closing:
                raise RuntimeError("this process pool is closed")
            task_id = next(self._ids)
            payload = payload[:1] + _CALL.pack(task_id, key) + payload[17:]
            self._pending.append(_Task(task_id, future, key, payload))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="opero-process-dispatcher", daemon=True
                )
                self._thread.start()
            self._wake()
        return future

    def close(self, *, cancel: bool = False) -> None:
        with self._lock:
            self._closing = True
            self._cancel = self._cancel or cancel
            thread = self._thread
            if thread is None:
                self._release()
                return
            self._wake()
        if thread is not threading.current_thread():
            thread.join()

    def _function_key(self, fn: Callable[..., Any]) -> int:
        entry = self._functions.get(id(fn))
        if entry is None or entry[0] is not fn:
            data = cloudpickle.dumps(fn)
            with self._lock:
                entry = (fn, len(self._functions) + 1, data)
                self._functions[id(fn)] = entry
                self._fn_data[entry[1]] = data
        return entry[1]

    def _wake(self) -> None:  # called with the lock held
        if not self._woken:
            self._woken = True
            self._wake_w.send_bytes(b"")

    # -- dispatcher thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._step():
                pass
        finally:
            self._shutdown()

    def _step(self) -> bool:
        with self._lock:
            if self._cancel:
                return False
            self._start_workers()
            self._dispatch()  # may drop queued calls that were cancelled
            # Checked after dispatching: when the last queued calls were cancelled, nothing is
            # left to wake this thread, so waiting would be forever.
            if self._closing and not self._pending and not any(w.tasks for w in self._workers):
                return False
            waitables: list[Any] = [self._wake_r]
            for w in self._workers:
                waitables += (w.conn, w.proc.sentinel)
        ready = set(wait(waitables))
        if self._wake_r in ready:
            while self._wake_r.poll():
                self._wake_r.recv_bytes()
            with self._lock:
                self._woken = False
        for w in list(self._workers):
            if w.conn in ready:
                self._receive(w)
            if w.proc.sentinel in ready:
                self._bury(w)
        return True

    def _start_workers(self) -> None:
        # Start a process for every task that could run now but would find no idle process:
        # a task never waits behind another while the pool is below its size.
        running = sum(len(w.tasks) for w in self._workers)
        idle = sum(1 for w in self._workers if not w.tasks and not w.broken)
        missing = min(len(self._pending), self.workers - running) - idle
        while missing > 0 and len(self._workers) < self._processes:
            parent_end, child_end = self._ctx.Pipe()
            progress = None if self.concurrent_calls else self._ctx.RawArray("q", [-1])
            proc = self._ctx.Process(
                target=_worker.main,
                args=(
                    child_end,
                    self._capacity if self.concurrent_calls else 1,
                    os.getpid(),
                    progress,
                ),
                name="opero-worker",
            )
            proc.start()
            child_end.close()
            self._workers.append(_Worker(proc, parent_end, progress))
            missing -= 1

    def _dispatch(self) -> None:
        running = sum(len(w.tasks) for w in self._workers)
        while self._pending:
            if self.concurrent_calls and running >= self.workers:
                return
            w = self._least_busy()
            if w is None:
                return
            task = self._pending.popleft()
            if not task.started:
                if not task.future.set_running_or_notify_cancel():
                    continue  # cancelled before it started
                task.started = True
            try:
                if task.key not in w.functions:
                    w.conn.send_bytes(b"F" + _worker.ID.pack(task.key) + self._fn_bytes(task))
                    w.functions.add(task.key)
                w.conn.send_bytes(task.payload)
            except OSError:  # the worker is dying; its sentinel will tell
                w.broken = True
                self._pending.appendleft(task)
                continue
            w.tasks[task.id] = task
            running += 1

    def _least_busy(self) -> _Worker | None:
        """The worker with the fewest calls that can take one more, if any."""
        best: _Worker | None = None
        for w in self._workers:
            if w.broken or len(w.tasks) >= self._capacity:
                continue
            if best is None or len(w.tasks) < len(best.tasks):
                best = w
                if not w.tasks:
                    break
        return best

    def _fn_bytes(self, task: _Task) -> bytes:
        return self._fn_data[task.key]

    def _receive(self, w: _Worker) -> None:
        while True:
            try:
                if not w.conn.poll():
                    return
                data = w.conn.recv_bytes()
            except (EOFError, OSError):
                w.broken = True
                return
            (task_id,) = _worker.ID.unpack_from(data, 0)
            status = data[8:9]
            task = w.tasks.get(task_id) if status == b"P" else w.tasks.pop(task_id, None)
            if task is None:  # pragma: no cover - outcome of a task already failed
                continue
            try:
                value = pickle.loads(data[9:])
            except Exception as exc:
                value = RemoteError(type(exc).__qualname__, f"cannot unpickle the outcome: {exc}")
                ok = False
            else:
                ok = status == b"1"
                if status == b"P":
                    task.pieces.append(value)
                    continue
                if ok and task.pieces:
                    value = _worker.join_pieces([*task.pieces, value])
            settle_future(task.future, ok, value)

    def _bury(self, w: _Worker) -> None:
        self._receive(w)  # outcomes sent before it died are not lost
        w.proc.join(timeout=1)
        self._workers.remove(w)
        w.conn.close()
        running = -1 if w.progress is None else w.progress[0]
        for task in w.tasks.values():
            message = (
                f"worker process {w.proc.pid} died (exit code {w.proc.exitcode}) "
                "while running this item"
            )
            if task.pieces or running >= 0:
                exc: WorkerCrashedError = ChunkCrashedError(
                    message, _worker.join_pieces(task.pieces), running
                )
            else:
                exc = WorkerCrashedError(message)
            settle_future(task.future, False, exc)

    def _shutdown(self) -> None:
        with self._lock:
            self._closing = True
            pending, self._pending = list(self._pending), deque()
        for task in pending:
            if not task.future.cancel():
                settle_future(task.future, False, CancelledError())
        for w in self._workers:
            if self._cancel:
                w.proc.terminate()
            else:
                with contextlib.suppress(OSError):
                    w.conn.send_bytes(b"")
        for w in self._workers:
            w.proc.join(timeout=2 if not self._cancel else 0.5)
            if w.proc.exitcode is None:
                w.proc.kill()
                w.proc.join()
            for task in w.tasks.values():
                settle_future(task.future, False, CancelledError())
            w.conn.close()
        self._workers = []
        self._release()

    def _release(self) -> None:
        for conn in (self._wake_r, self._wake_w):
            conn.close()


def _dumps_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    data = _worker.dumps((args, kwargs))
    if b"__main__" in data:
        # Something defined in the caller's __main__ (maybe under its `if __name__` guard, which
        # a worker never runs) was pickled by reference: send it by value instead.
        data = cloudpickle.dumps((args, kwargs), pickle.HIGHEST_PROTOCOL)
    return data


class AsyncProcessBackend(ProcessBackend):
    """``async def`` functions on an event loop inside each worker process, several calls per
    process at once: ``workers`` calls in flight, spread over at most one process per core."""

    concurrent_calls = True
    accepts_sync = False
    batching = False
