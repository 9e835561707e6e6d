"""What the cluster backends (``mode="ray"``, ``mode="dask"``) share.

A cluster task runs :func:`invoke`, which never raises: it returns the call's outcome as
cloudpickle bytes, with an exception that would not survive the trip replaced by a
:class:`~opero.errors.RemoteError`. The caller decodes the bytes itself (:func:`decode`), so an
outcome that cannot be unpickled here becomes a RemoteError too, instead of an engine error raised
from deep inside Ray or Dask. Anything else the engine reports (a dead worker, a lost task) is
translated by the backend.

:class:`ClusterBackend` keeps at most ``workers`` tasks on the cluster: calls wait in a queue in
the caller's process and one dispatcher thread hands them to the engine as tasks finish. So
``future.cancel()`` on a queued call means it never reaches the cluster. The engine's completion
callbacks record outcomes; they start the next call themselves only where the engine allows it
(``launch_in_callbacks``: Dask yes; Ray can deadlock when a callback submits work).

Connecting includes warming up: opero waits, for at most
:attr:`ClusterBackend.ready_timeout` seconds, until the cluster has workers and each has loaded
opero (an :class:`~opero.errors.OperoError` otherwise). A rate-limited ``@opmap`` awaits
:meth:`ClusterBackend.aready` before its first item: a start slot granted while a cold cluster is
still starting would let the calls queued meanwhile start together once it is up.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import inspect
import pickle
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import Any, ClassVar

from opero.concurrency import Backend, settle_future
from opero.concurrency._portable import pickle_outcome
from opero.errors import OperoError, RemoteError

try:
    import cloudpickle
except ModuleNotFoundError:  # pragma: no cover - a Ray-only install: Ray ships its own copy
    from ray import cloudpickle


def invoke(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Runs on a cluster worker: ``fn(*args, **kwargs)`` (a coroutine is run to completion), and
    its outcome ``(ok, value)`` as bytes; never raises."""
    return run(fn, args, kwargs, cloudpickle.dumps)


def warm() -> bool:
    """Runs on a cluster worker while connecting: importing this module is the warm-up."""
    return True


def not_ready(engine: str, timeout: float, what: str) -> OperoError:
    """The error of a cluster that did not get ready in time."""
    return OperoError(
        f"mode={engine!r}: the cluster was not ready after {timeout:g} s ({what}); "
        "check that it has workers"
    )


def fast_dumps(value: object, dumps: Callable[[object], bytes]) -> bytes:
    """Plain pickle when it can (much faster for plain data), else ``dumps`` (cloudpickle)."""
    try:
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    except Exception:
        return dumps(value)


def run(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    dumps: Callable[[object], bytes],
) -> bytes:
    """:func:`invoke` with the engine's own pickler: classes and functions sent by value keep
    their identity in the caller only when the outcome is pickled by the same cloudpickle copy
    that sent them (Ray ships its own)."""
    fast = functools.partial(fast_dumps, dumps=dumps)
    try:
        value = fn(*args, **kwargs)
        if inspect.iscoroutine(value):
            value = asyncio.run(value)
    except (Exception, SystemExit) as exc:  # sys.exit() in an item is its outcome
        return pickle_outcome(False, exc, fast)
    return pickle_outcome(True, value, fast)


def decode(data: bytes) -> tuple[bool, Any]:
    """The ``(ok, value)`` that :func:`invoke` sent; a RemoteError when it cannot be unpickled."""
    try:
        ok, value = pickle.loads(data)
    except Exception as exc:
        return False, RemoteError(type(exc).__qualname__, f"cannot unpickle the outcome: {exc}")
    return bool(ok), value


class _Call:
    __slots__ = ("args", "fn", "future", "handle", "kwargs")

    def __init__(
        self,
        future: Future[Any],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.handle: Any = None  # the engine's task (ObjectRef, distributed.Future)


class ClusterBackend(Backend):
    """A queue in front of a cluster engine; subclasses connect, launch, cancel, disconnect."""

    batching = True
    accepts_cluster = True
    engine: ClassVar[str]
    # True when the engine's completion callbacks may submit work: the next call then starts
    # there, without a hop through the dispatcher thread (each hop between threads costs time
    # when the caller's process is busy).
    launch_in_callbacks: ClassVar[bool] = False
    # How long connecting may wait for the cluster's workers before failing the queued calls.
    ready_timeout: ClassVar[float] = 60.0

    def __init__(self, workers: int, *, cluster: object = None) -> None:
        super().__init__(workers)
        self.cluster = cluster
        self._cond = threading.Condition()
        self._pending: deque[_Call] = deque()
        self._running: set[_Call] = set()
        self._delivering = 0  # calls done on the cluster whose future is not completed yet
        self._thread: threading.Thread | None = None
        self._connected = False
        # Completed once connected and warmed up (or with the connection error).
        self._up: Future[None] = Future()
        self._closing = False
        self._cancel = False

    # -- what an engine provides ---------------------------------------------------------------

    @classmethod
    def check_cluster(cls, cluster: object) -> None:
        """Raise ValueError when ``cluster`` cannot name a cluster for this engine."""
        if not isinstance(cluster, str) or not cluster:
            raise ValueError(f"cluster must be an address (str) for mode={cls.engine!r}")

    @abc.abstractmethod
    def _connect(self) -> None:
        """Connect to (or start) the cluster; called once, on the dispatcher thread."""

    @abc.abstractmethod
    def _launch(self, call: _Call) -> None:
        """Send ``call`` to the cluster, set ``call.handle``, and arrange for
        :meth:`_finished` to be called exactly once when it ends."""

    @abc.abstractmethod
    def _abort(self, calls: list[_Call]) -> None:
        """Cancel the engine's tasks for ``calls`` (``close(cancel=True)``)."""

    @abc.abstractmethod
    def _disconnect(self) -> None:
        """Release what :meth:`_connect` started or opened; never a cluster opero did not start."""

    # -- caller side ---------------------------------------------------------------------------

    def submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Future[Any]:
        future: Future[Any] = Future()
        with self._cond:
            if self._closing:
                raise RuntimeError(f"this {self.engine} backend is closed")
            self._pending.append(_Call(future, fn, args, kwargs))
            self._dispatch()
            self._cond.notify_all()
        return future

    async def aready(self) -> None:
        """Return once the cluster is connected and warm; raise the connection error if not.

        ``@opmap`` awaits this before its first item, so that no rate-limit slot is granted
        while a cold cluster is still starting.
        """
        with self._cond:
            if self._closing:
                raise RuntimeError(f"this {self.engine} backend is closed")
            self._dispatch()
            up = self._up
        await asyncio.wrap_future(up)

    def _dispatch(self) -> None:  # called with the lock held
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"opero-{self.engine}-dispatcher", daemon=True
            )
            self._thread.start()

    def close(self, *, cancel: bool = False) -> None:
        with self._cond:
            self._closing = True
            self._cancel = self._cancel or cancel
            thread = self._thread
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._cond:
            connected, self._connected = self._connected, False
        if connected:
            self._disconnect()

    def _finished(self, call: _Call, ok: bool, value: object) -> None:
        """Record one task's outcome; called from the engine's threads."""
        if self._freed(call):
            self._deliver(call, ok, value)

    def _freed(self, call: _Call, *, launch: bool = True) -> bool:
        """The task ended on the cluster: its slot goes to the next call, before the outcome is
        delivered. False when ``close(cancel=True)`` already failed it."""
        with self._cond:
            if call not in self._running:
                return False
            self._running.discard(call)
            self._delivering += 1
            call.handle = None
            batch = self._take() if launch and self.launch_in_callbacks else []
            self._cond.notify_all()
        for started in batch:
            self._start(started)
        return True

    def _deliver(self, call: _Call, ok: bool, value: object) -> None:
        """Complete the future of a call that :meth:`_freed` released."""
        try:
            settle_future(call.future, ok, value)
        finally:
            with self._cond:
                self._delivering -= 1
                self._cond.notify_all()

    # -- dispatcher thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if not self._connected:
                self._connect()
                self._connected = True
            if not self._up.done():
                self._up.set_result(None)
        except BaseException as exc:
            # Every queued call fails with the connection error; the next submit tries again.
            with self._cond:
                self._thread = None
                failed, self._pending = list(self._pending), deque()
                up, self._up = self._up, Future()
            up.set_exception(exc)
            for call in failed:
                if call.future.set_running_or_notify_cancel():
                    call.future.set_exception(exc)
            return
        try:
            while True:
                with self._cond:
                    while not self._ready():
                        self._cond.wait()
                    if self._cancel or not (self._pending or self._running or self._delivering):
                        break
                    batch = self._take()
                for call in batch:
                    self._start(call)
        finally:
            self._shutdown()

    def _take(self) -> list[_Call]:  # called with the lock held
        """The queued calls that may start now (a cancelled one never starts)."""
        batch: list[_Call] = []
        while self._pending and len(self._running) < self.workers and not self._cancel:
            call = self._pending.popleft()
            if call.future.set_running_or_notify_cancel():
                self._running.add(call)
                batch.append(call)
        return batch

    def _start(self, call: _Call) -> None:
        try:
            self._launch(call)
        except Exception as exc:  # arguments the engine cannot serialise
            if self._freed(call, launch=False):  # (no recursion: the dispatcher starts the next)
                self._deliver(call, False, exc)

    def _ready(self) -> bool:  # called with the lock held
        if self._cancel:
            return True
        if self._pending and len(self._running) < self.workers:
            return True
        return self._closing and not (self._pending or self._running or self._delivering)

    def _shutdown(self) -> None:
        with self._cond:
            self._closing = True
            pending, self._pending = list(self._pending), deque()
            running, self._running = list(self._running), set()
        for call in pending:
            if not call.future.cancel():
                settle_future(call.future, False, CancelledError())
        if running:
            try:
                self._abort(running)
            finally:
                for call in running:
                    settle_future(call.future, False, CancelledError())
