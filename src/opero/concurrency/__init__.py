"""Where ``@opmap`` runs the plain calls: one module per backend, chosen by name, imported lazily.

The backend contract
--------------------
A backend is a :class:`Backend` subclass constructed as ``Backend(workers)``. The map logic in
:mod:`opero.decorators.opmap` (ordering, ``on_error``, streaming with a bounded number of items in
flight, progress, keyword arguments, retries, cache, fallbacks, the rate limit) is shared by every
backend and never looks inside one; a backend only runs calls:

``submit(fn, args, kwargs) -> concurrent.futures.Future``
    Run ``fn(*args, **kwargs)`` somewhere and return a future for its outcome. Thread-safe and
    non-blocking (queue the call when every worker is busy). ``fn`` may be an ``async def``
    function: the backend then runs the coroutine to completion on an event loop of its own. The
    future must always complete, never hang:

    - with the return value, or the exception ``fn`` raised, of its original type and message;
    - with :class:`opero.errors.RemoteError` (naming the original type and message) when that
      exception cannot be sent back to the caller's process;
    - with :class:`opero.errors.WorkerCrashedError` when the worker running the call died. Only
      the calls that were running on that worker fail; the backend replaces the worker and
      carries on with the rest.

    At most ``workers`` calls run at the same time. Functions, closures and lambdas must work:
    anything crossing a process boundary is serialised with cloudpickle (or dill for pathos).
    ``future.cancel()`` on a call that has not started yet means it never starts.

``close(*, cancel=False) -> None``
    Release the workers; idempotent. ``cancel=False`` lets running calls finish first;
    ``cancel=True`` cancels queued calls, fails running ones with ``CancelledError`` and
    terminates worker processes at once (used on KeyboardInterrupt and cancellation). A backend
    belongs to one decorated function, so closing it never affects another function's pool. After
    ``close`` the owner creates a fresh backend for its next call.

``async acall(fn, args, kwargs)``
    Awaitable form of ``submit`` used by the map's event loop. The default awaits ``submit``'s
    future; a backend that runs coroutines on the caller's own loop (``inline = True``) overrides
    it and the map then limits how many calls are in flight itself.

Class attributes tell the map how to use a backend: ``batching`` (per-call overhead is high, so
send chunks of items when no per-item resilience applies), ``inline`` (see ``acall``),
``accepts_sync`` (False: only ``async def`` functions) and ``accepts_cluster`` (True: constructed
as ``Backend(workers, cluster=...)`` when the user passes ``@opmap(cluster=...)``).

Adding a backend is one module plus one :func:`register_backend` call (or one line in
``_BUILTIN``): ``register_backend("ray", "opero.concurrency.ray:RayBackend", extra="ray",
requires="ray")``.
"""

from __future__ import annotations

import abc
import asyncio
import atexit
import contextlib
import importlib
import multiprocessing.util  # noqa: F401 - see _close_all: its exit handler must be registered first
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, ClassVar

from opero.errors import MissingExtraError, WorkerCrashedError

__all__ = [
    "Backend",
    "ChunkCrashedError",
    "backend_class",
    "backend_names",
    "register_backend",
    "settle_future",
]


class ChunkCrashedError(WorkerCrashedError):
    """A worker died while it ran a chunk of items. ``done`` holds the outcomes of the chunk's
    first items, which it had sent (values, and errors by offset); ``running`` is the offset of
    the item it was running, or -1 when that is not known."""

    def __init__(
        self, message: str, done: tuple[list[Any], dict[int, BaseException]], running: int
    ) -> None:
        super().__init__(message)
        self.done = done
        self.running = running


def settle_future(future: Future[Any], ok: bool, value: object) -> None:
    """Complete ``future`` with a result (``ok``) or an exception, unless it is already done
    (cancelled by the caller, or failed by a crash check that got there first)."""
    if future.done():
        return
    # The caller may cancel between the check and the set: that outcome is simply not wanted.
    with contextlib.suppress(InvalidStateError):
        if ok:
            future.set_result(value)
        else:
            assert isinstance(value, BaseException)
            future.set_exception(value)


class Backend(abc.ABC):
    """Runs plain calls for ``@opmap``; see the module docstring for the contract."""

    batching: ClassVar[bool] = False
    inline: ClassVar[bool] = False
    accepts_sync: ClassVar[bool] = True
    accepts_cluster: ClassVar[bool] = False

    def __init__(self, workers: int) -> None:
        self.workers = workers
        _live.add(self)

    @classmethod  # noqa: B027 - an optional hook, not an abstract method
    def check_cluster(cls, cluster: object) -> None:
        """Raise ``ValueError`` naming ``cluster`` when the value cannot name a cluster for this
        backend; called when decorating (``accepts_cluster`` backends only)."""

    @abc.abstractmethod
    def submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` on a worker; the future always completes."""

    @abc.abstractmethod
    def close(self, *, cancel: bool = False) -> None:
        """Release the workers (idempotent); ``cancel=True`` stops everything at once."""

    async def acall(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        return await asyncio.wrap_future(self.submit(fn, args, kwargs))


@dataclass(frozen=True)
class _Entry:
    target: str  # "package.module:ClassName"
    extra: str | None  # the pip extra that provides the dependency
    requires: str | tuple[str, ...] | None  # the top-level module(s) the extra installs


_BUILTIN: dict[str, _Entry] = {
    "thread": _Entry("opero.concurrency.thread:ThreadBackend", None, None),
    "async": _Entry("opero.concurrency.aio:AioBackend", None, None),
    "process": _Entry("opero.concurrency.process:ProcessBackend", "process", "cloudpickle"),
    "async_process": _Entry(
        "opero.concurrency.process:AsyncProcessBackend", "process", "cloudpickle"
    ),
    "pathos": _Entry(
        "opero.concurrency.pathos:PathosBackend",
        "pathos",
        ("pathos", "dill", "multiprocess", "ppft", "pox"),
    ),
    "aiomultiprocess": _Entry(
        "opero.concurrency.aiomp:AioMultiprocessBackend", "aiomultiprocess", "aiomultiprocess"
    ),
    "ray": _Entry("opero.concurrency.ray:RayBackend", "ray", "ray"),
    "dask": _Entry("opero.concurrency.dask:DaskBackend", "dask", "distributed"),
}
_registry: dict[str, _Entry] = dict(_BUILTIN)


def register_backend(
    name: str,
    target: str,
    *,
    extra: str | None = None,
    requires: str | tuple[str, ...] | None = None,
) -> None:
    """Make ``mode=name`` use the :class:`Backend` subclass at ``target`` ("module:Class").

    ``requires`` is the module (or modules) whose absence means ``pip install opero[extra]`` is
    needed.
    """
    _registry[name] = _Entry(target, extra, requires)


def backend_names() -> tuple[str, ...]:
    return tuple(_registry)


def backend_class(mode: str) -> type[Backend]:
    """The backend class for ``mode``; ``MissingExtraError`` names the extra when it is missing."""
    entry = _registry.get(mode)
    if entry is None:
        raise ValueError(f"mode must be one of {', '.join(map(repr, _registry))}, got {mode!r}")
    module_name, _, class_name = entry.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if entry.extra is None or exc.name is None:
            raise
        missing = exc.name.partition(".")[0]
        requires = (entry.requires,) if isinstance(entry.requires, str) else entry.requires
        if requires is not None and missing not in {r.partition(".")[0] for r in requires}:
            raise
        raise MissingExtraError(f"@opmap(mode={mode!r})", entry.extra, missing) from exc
    cls = getattr(module, class_name)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):  # pragma: no cover
        raise TypeError(f"{entry.target} is not an opero.concurrency.Backend")
    return cls


# Every live backend is closed at interpreter exit, before multiprocessing's own exit handler
# (registered earlier, so run later) would wait for non-daemonic worker processes.
_live: weakref.WeakSet[Backend] = weakref.WeakSet()
_exit_lock = threading.Lock()


@atexit.register
def _close_all() -> None:
    with _exit_lock:
        backends = list(_live)
    for backend in backends:
        with contextlib.suppress(Exception):  # nothing useful to do about it at exit
            backend.close(cancel=True)
