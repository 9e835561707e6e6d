"""``@opmap``: the ``@opero`` chain per item, driven in the caller's process, over a backend.

The map logic lives here once for every backend (:mod:`opero.concurrency`): input checks, the
bounded number of items in flight, input order, ``on_error``, progress, keyword arguments for
every call. Resilience is per item and stays in the caller's process: each item runs
:func:`opero._engine.run_async` on an event loop of the caller's, and only the plain call goes to
a worker. So one rate limit covers the whole map, the cache (memory included) is shared by all
items and calls, a worker is never held while an item waits for its backoff, and retries and
fallbacks are logged once, here. A function with no per-item resilience skips the event loop:
its calls go straight to the backend, in chunks when the backend's per-call cost is high.

Sync functions are driven by :func:`_outcomes_sync` (futures, from any thread, also inside a
running event loop: the orchestrating loop then runs in a helper thread); ``async def``
functions by :func:`_outcomes_async` on the caller's loop. The two are the same algorithm.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import os
import queue
import threading
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sized,
)
from concurrent.futures import Future
from typing import Any, Concatenate, Generic, Literal, Protocol, TypeVar, overload

from opero._chain import Chain, Limiter, Options, build_chain
from opero._clock import clock
from opero._engine import run_async
from opero.concurrency import Backend, ChunkCrashedError, backend_class
from opero.decorators.opero import check_function, is_async_function
from opero.errors import MissingExtraError, OpmapError, WorkerCrashedError

T = TypeVar("T")
R = TypeVar("R")

Mode = Literal[
    "thread", "process", "async", "async_process", "pathos", "aiomultiprocess", "ray", "dask"
]
# (index, ok, value): one item's outcome; value is the exception when ok is False
Outcome = tuple[int, bool, Any]

_LIST_WINDOW = 1024  # items in flight for a call that returns a list (a stream keeps 2 x workers)
_MAX_CHUNK = 2048
_FILL_TIME = 0.002  # seconds a stream's chunk waits for its input before it goes out short
_NOTHING: list[Outcome] = []  # shared, never mutated: "no outcome ready yet"


def opmap(
    _func: None = None,
    /,
    *,
    mode: Mode | str = "thread",
    workers: int = 4,
    ordered: bool = True,
    progress: bool = False,
    on_error: Literal["raise", "return"] = "raise",
    cluster: object = None,
    retries: int = 0,
    backoff_factor: float = 1.5,
    min_delay: float = 0.1,
    max_delay: float = 30.0,
    jitter: bool = True,
    retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
    fallback_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
    arg_fallback: str | None = None,
    rate_limit: float | None = None,
    rate_limit_backend: str = "local",
    rate_limit_key: str | None = None,
    rate_limit_on_error: str = "local",
    cache: bool = False,
    cache_ttl: float | None = None,
    cache_backend: object = "memory",
    cache_key: Callable[..., object] | None = None,
    cache_namespace: str = "opero",
    cache_maxsize: int = 4096,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_serializer: str = "pickle",
) -> _Decorator:
    """Turn a one-item function into a resilient parallel map over many items.

    ``f(items, **kwargs)`` calls ``f(item, **kwargs)`` for every item on ``workers`` threads
    (``mode="thread"``), processes (``"process"``), coroutines of the caller's loop (``"async"``),
    event loops in worker processes (``"async_process"``) or the ``"pathos"`` and
    ``"aiomultiprocess"`` pools, and returns the results in input order. An ``async def``
    function gives an awaitable. ``f.stream(items)`` yields results as they are ready (in input
    order unless ``ordered=False``), reading the input lazily.

    Every ``@opero`` option applies per item in the caller's process: one rate limit for the
    whole map, one cache for all items and calls. ``cluster`` is the Ray or Dask cluster of the
    modes that use one. ``on_error="raise"`` raises
    :class:`~opero.OpmapError` after every item was attempted; ``"return"`` puts each exception
    in place of its result. ``progress=True`` shows a tqdm bar. Impossible values raise
    ``ValueError`` naming the option when decorating.
    """
    if _func is not None:
        raise TypeError(
            "write @opmap(...) with parentheses: opmap takes keyword-only options, "
            f"got {_func!r} as a positional argument"
        )
    opts = Options(
        retries=retries,
        backoff_factor=backoff_factor,
        min_delay=min_delay,
        max_delay=max_delay,
        jitter=jitter,
        retry_on=retry_on,
        fallback_on=fallback_on,
        arg_fallback=arg_fallback,
        rate_limit=rate_limit,
        rate_limit_backend=rate_limit_backend,
        rate_limit_key=rate_limit_key,
        rate_limit_on_error=rate_limit_on_error,
        cache=cache,
        cache_ttl=cache_ttl,
        cache_backend=cache_backend,
        cache_key=cache_key,
        cache_namespace=cache_namespace,
        cache_maxsize=cache_maxsize,
        cache_dir=cache_dir,
        cache_serializer=cache_serializer,
    )
    if type(mode) is not str:
        raise ValueError(f"mode must be a backend name (str), got {mode!r}")
    backend = backend_class(mode)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if type(ordered) is not bool:
        raise ValueError(f"ordered must be True or False, got {ordered!r}")
    if type(progress) is not bool:
        raise ValueError(f"progress must be True or False, got {progress!r}")
    if progress:
        try:
            import tqdm  # noqa: F401, PLC0415
        except ModuleNotFoundError as exc:
            raise MissingExtraError("@opmap(progress=True)", "progress", "tqdm") from exc
    if on_error not in ("raise", "return"):
        raise ValueError(f"on_error must be 'raise' or 'return', got {on_error!r}")
    if cluster is not None and not backend.accepts_cluster:
        raise ValueError(f"cluster= has no effect with mode={mode!r}")
    if cluster is not None:
        backend.check_cluster(cluster)
    settings = _Settings(mode, backend, workers, ordered, progress, on_error, cluster)

    def decorate(func: Callable[..., Any]) -> Any:
        check_function(func, "opmap")
        is_async = is_async_function(func)
        if not is_async and not backend.accepts_sync:
            raise ValueError(
                f"mode={mode!r} runs async functions; {getattr(func, '__qualname__', func)!r} "
                "is sync: use mode='process'"
            )
        chain = build_chain(func, opts, is_async=True)
        cls = AsyncOpmap if is_async else Opmap
        return cls(func, chain, settings)

    return decorate


class _Decorator(Protocol):
    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, func: Callable[Concatenate[T, ...], Awaitable[R]]
    ) -> AsyncOpmap[T, R]: ...
    @overload
    def __call__(self, func: Callable[Concatenate[T, ...], R]) -> Opmap[T, R]: ...


@dataclasses.dataclass(frozen=True)
class _Settings:
    mode: str
    backend: type[Backend]
    workers: int
    ordered: bool
    progress: bool
    on_error: str
    cluster: object

    def new_backend(self) -> Backend:
        if self.cluster is None:
            return self.backend(self.workers)
        return self.backend(self.workers, cluster=self.cluster)  # type: ignore[call-arg]


class _GatedLimiter:
    """The rate limit, reserved only once a worker is free.

    Reserving first and queueing for a worker afterwards would let queued calls start back to
    back when workers free up, breaking the limit; so an attempt first takes one of ``workers``
    slots (released when its call ends), then its start slot.
    """

    __slots__ = ("_gate", "_inner")

    def __init__(self, inner: Limiter, gate: asyncio.Semaphore) -> None:
        self._inner = inner
        self._gate = gate

    def reserve(self, now: float) -> float:  # pragma: no cover - @opmap chains are async
        raise NotImplementedError

    async def areserve(self, now: float) -> float:
        await self._gate.acquire()
        try:
            return await self._inner.areserve(clock.monotonic())
        except BaseException:  # e.g. a shared limiter's store is unreachable: no call follows
            self._gate.release()
            raise

    def settle(self, now: float) -> float:
        return self._inner.settle(now)

    def abandon(self) -> None:
        # The waiter gave up before its call (cancelled while waiting): free its worker slot.
        try:
            self._inner.abandon()
        finally:
            self._gate.release()


class _Base(Generic[T, R]):
    """What every ``@opmap`` function has: its pool, ``close()`` and context managers."""

    def __init__(self, func: Callable[..., Any], chain: Chain, settings: _Settings) -> None:
        functools.update_wrapper(self, func)  # type: ignore[arg-type]
        self._func = func
        self._is_async = is_async_function(func)
        self._chunk_fn: Callable[..., Any] | None = None
        self._chain = chain
        self._settings = settings
        self._lock = threading.Lock()
        self._pool: Backend | None = None
        self._users: dict[Backend, int] = {}  # calls running on each pool
        bare = chain.cache is None and chain.fallback is None and chain.limiter is None
        self._plain = bare and chain.retry.attempts == 1
        # A chain of retries alone: the first attempt can go straight to the pool like a plain
        # call, and only items that failed it need their chain.
        self._retries_only = bare and chain.retry.attempts > 1
        self.opero_chain = chain

    def _chunk_call(self) -> Callable[..., Any]:
        """``call_chunk`` bound to this function, made once, so that a pool pickles the user's
        function once (pools key the functions they have sent by identity) rather than with
        every chunk."""
        if self._chunk_fn is None:
            self._chunk_fn = functools.partial(_call_chunk(), self._func)
        return self._chunk_fn

    def __repr__(self) -> str:
        return f"<opmap {self._chain.name} mode={self._settings.mode!r}>"

    # -- pool ownership ------------------------------------------------------------------------

    def _acquire(self) -> Backend:
        with self._lock:
            if self._pool is None:
                self._pool = self._settings.new_backend()
            pool = self._pool
            self._users[pool] = self._users.get(pool, 0) + 1
            return pool

    def _release(self, pool: Backend, *, abort: bool) -> None:
        # The last call on a pool closes it when close() let go of it meanwhile. An interrupted
        # or cancelled map terminates its workers, unless another call still uses them; the next
        # call then starts a fresh pool.
        with self._lock:
            left = self._users.pop(pool) - 1
            if left:
                self._users[pool] = left
                return
            if abort and self._pool is pool:
                self._pool = None
            elif self._pool is pool:
                return
        pool.close(cancel=abort)

    def close(self) -> None:
        """Release this function's workers (the next call starts new ones). A call still running
        (a stream another thread reads, say) keeps them until it ends."""
        with self._lock:
            pool, self._pool = self._pool, None
            if pool is None or pool in self._users:
                return
        pool.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)

    def cache_clear(self) -> int:
        """Remove this function's cache entries; return how many were removed."""
        return 0 if self._chain.cache is None else self._chain.cache.clear_own()

    # -- shared map logic ----------------------------------------------------------------------

    def _chain_for(self, pool: Backend) -> Chain:
        """This call's chain: the shared layers (one cache, one limiter) with a ``call`` that
        dispatches the plain call to ``pool``."""
        func = self._func
        limiter = self._chain.limiter
        gate = None
        if pool.inline or limiter is not None:
            gate = asyncio.Semaphore(self._settings.workers)
        call: Callable[..., Awaitable[Any]]
        if gate is None:

            async def call(*args: Any, **kwargs: Any) -> Any:
                return await pool.acall(func, args, kwargs)

        elif limiter is None:

            async def call(*args: Any, **kwargs: Any) -> Any:
                async with gate:
                    return await pool.acall(func, args, kwargs)

        else:
            limiter = _GatedLimiter(limiter, gate)

            async def call(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await pool.acall(func, args, kwargs)
                finally:
                    gate.release()

        return dataclasses.replace(self._chain, call=call, limiter=limiter)

    def _start(self, items: object, streaming: bool) -> _Run:
        if isinstance(items, str | bytes | bytearray | memoryview):
            raise TypeError(
                f"{self._chain.name} maps over an iterable of items, got a "
                f"{type(items).__name__}: wrap it in a list to map over one item"
            )
        try:
            iterator = iter(items)  # type: ignore[call-overload]
        except TypeError:
            raise TypeError(
                f"{self._chain.name} maps over an iterable of items, got {type(items).__name__}"
            ) from None
        total = len(items) if isinstance(items, Sized) else None
        return _Run(self, iterator, total, streaming)


class _Run:
    """One call's bookkeeping: the window, input order, progress."""

    def __init__(
        self, owner: _Base[Any, Any], items: Iterator[Any], total: int | None, streaming: bool
    ) -> None:
        settings = owner._settings
        self.items = enumerate(items)
        self.total = total
        self.name = owner._chain.name
        self.on_error = settings.on_error
        self.ordered = settings.ordered
        workers = settings.workers
        self.window = 2 * workers if streaming else max(2 * workers, _LIST_WINDOW)
        self.streaming = streaming
        self.results: list[Any] = []
        self.errors: dict[int, BaseException] = {}
        self._next = 0
        self._buffer: dict[int, tuple[bool, Any]] = {}
        self._bar: Any = None
        if settings.progress:
            from tqdm.auto import tqdm  # noqa: PLC0415

            self._bar = tqdm(total=total, desc=owner._func.__name__, unit="item")

    def room(self, in_flight: int) -> bool:
        return in_flight + len(self._buffer) < self.window

    def finished(self, index: int, ok: bool, value: object) -> list[Outcome]:
        """Record one item's outcome; return the outcomes now ready for a stream, in order
        (a call that returns a list keeps them by index instead)."""
        if self._bar is not None:
            self._bar.update(1)
        if not self.streaming:
            results = self.results
            if index >= len(results):
                results.extend([None] * (index + 1 - len(results)))
            results[index] = value
            if not ok:
                self.errors[index] = value  # type: ignore[assignment]
            return _NOTHING
        if not self.ordered:
            return [(index, ok, value)]
        if index != self._next:
            self._buffer[index] = (ok, value)
            return _NOTHING
        ready = [(index, ok, value)]
        self._next += 1
        while self._next in self._buffer:
            ready.append((self._next, *self._buffer.pop(self._next)))
            self._next += 1
        return ready

    def finished_chunk(
        self, first: int, values: list[Any], errors: dict[int, BaseException]
    ) -> list[Outcome]:
        """:meth:`finished` for a chunk: ``errors`` maps offsets in the chunk to exceptions."""
        if self.streaming or self._bar is not None:
            ready: list[Outcome] = []
            for offset, value in enumerate(values):
                exc = errors.get(offset)
                ready += self.finished(first + offset, exc is None, value if exc is None else exc)
            return ready
        end = first + len(values)
        if end > len(self.results):
            self.results.extend([None] * (end - len(self.results)))
        self.results[first:end] = values
        for offset, exc in errors.items():
            self.results[first + offset] = exc
            self.errors[first + offset] = exc
        return _NOTHING

    def failed(self, first: int, count: int, exc: BaseException) -> list[Outcome]:
        ready: list[Outcome] = []
        for index in range(first, first + count):
            ready += self.finished(index, False, exc)
        return ready

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    # -- result shapes, shared by sync and async -----------------------------------------------

    def collect(self) -> list[Any]:
        results, errors = self.results, self.errors
        if errors and self.on_error == "raise":
            first = min(errors)
            exc = errors[first]
            raise OpmapError(
                f"{self.name}: {len(errors)} of {len(results)} items failed "
                f"(first: item {first}: {type(exc).__name__}: {exc})",
                results,
                errors,
            ) from exc
        return results

    def streamed(self, outcome: Outcome) -> Any:
        index, ok, value = outcome
        if ok or self.on_error == "return":
            return value
        raise OpmapError(
            f"{self.name}: item {index} failed: {type(value).__name__}: {value}",
            [],
            {index: value},
        ) from value


class Opmap(_Base[T, R]):
    """A sync function decorated with ``@opmap``: call it with an iterable of items."""

    def __call__(self, items: Iterable[T], /, **kwargs: Any) -> list[R]:
        run = self._start(items, streaming=False)
        try:
            if self._plain or self._retries_only:
                for _ in _outcomes_sync(self, run, kwargs):
                    pass
            else:
                # The per-item chains need an event loop: run the whole map on one, so that an
                # item's outcome is not handed from thread to thread on its way to the list.
                _run_blocking(lambda: _drain(_outcomes_async(self, run, kwargs)))
        finally:
            run.close()
        return run.collect()

    def stream(self, items: Iterable[T], /, **kwargs: Any) -> Iterator[R]:
        """Yield results as they are ready (input order when ``ordered=True``), reading
        ``items`` lazily with about ``2 x workers`` items in flight."""
        run = self._start(items, streaming=True)
        return self._stream(run, kwargs)

    def _stream(self, run: _Run, kwargs: dict[str, Any]) -> Iterator[R]:
        try:
            for outcome in _outcomes_sync(self, run, kwargs):
                yield run.streamed(outcome)
        finally:
            run.close()


class AsyncOpmap(_Base[T, R]):
    """An ``async def`` function decorated with ``@opmap``: await it with an iterable of items."""

    async def __call__(self, items: Iterable[T], /, **kwargs: Any) -> list[R]:
        run = self._start(items, streaming=False)
        try:
            await _drain(_outcomes_async(self, run, kwargs))
        finally:
            run.close()
        return run.collect()

    def stream(self, items: Iterable[T], /, **kwargs: Any) -> AsyncIterator[R]:
        """Yield results as they are ready (input order when ``ordered=True``), reading
        ``items`` lazily with about ``2 x workers`` items in flight."""
        run = self._start(items, streaming=True)
        return self._stream(run, kwargs)

    async def _stream(self, run: _Run, kwargs: dict[str, Any]) -> AsyncIterator[R]:
        # Closed explicitly: an async generator left to the garbage collector is finalised only
        # by its loop, later, so its items and pool would stay busy after the stream ended.
        try:
            async with contextlib.aclosing(_outcomes_async(self, run, kwargs)) as outcomes:
                async for outcome in outcomes:
                    yield run.streamed(outcome)
        finally:
            run.close()


# ---------------------------------------------------------------------------------------------
# the drivers


_ITEM, _CHUNK, _CHAIN = 0, 1, 2  # what an in-flight future of the sync driver stands for


def _outcomes_sync(owner: _Base[Any, Any], run: _Run, kwargs: dict[str, Any]) -> Iterator[Outcome]:
    """Start items while there is room, yield outcomes as they complete (ordered by ``run``).

    A plain function's calls go straight to the pool (in chunks when it batches). A function
    with retries only does the same for its first attempt; an item whose first attempt failed
    with a retryable error continues through its chain (backoff and later attempts) on a helper
    event loop, exactly as if the chain had made that first attempt. Other chains run on the
    helper loop from the start.
    """
    pool = owner._acquire()
    func = owner._func
    retry = owner._chain.retry
    direct = owner._plain or owner._retries_only
    done: queue.SimpleQueue[Future[Any]] = queue.SimpleQueue()
    # future -> (kind, first index, the items it stands for)
    in_flight: dict[Future[Any], tuple[int, int, list[Any]]] = {}
    helper: _LoopThread | None = None
    chain: Chain | None = None
    chunks = _Chunks(run.total, pool.workers) if direct and pool.batching else None

    def has_room() -> bool:
        if chunks is None:
            return run.room(len(in_flight))
        if run.streaming:  # a stream's window counts items, so its input is read lazily
            return run.room(sum(len(entry[2]) for entry in in_flight.values()))
        # A list holds every result anyway: two chunks per worker keep each one busy with the
        # next chunk ready (counting items, a chunk above the window would run alone).
        return len(in_flight) < 2 * pool.workers

    def send(index: int, item: Any) -> None:
        future = pool.submit(func, (item,), kwargs)
        in_flight[future] = (_ITEM, index, [item])
        future.add_done_callback(done.put)

    def chained(index: int, item: Any, first_failure: BaseException | None = None) -> None:
        nonlocal helper, chain
        if helper is None:
            helper = _LoopThread()
            chain = owner._chain_for(pool)
        assert chain is not None
        item_chain = chain
        if first_failure is not None:
            item_chain = dataclasses.replace(chain, call=_failed_once(first_failure, chain.call))
        future = helper.submit(run_async(item_chain, (item,), kwargs))
        in_flight[future] = (_CHAIN, index, [item])
        future.add_done_callback(done.put)

    def retryable(exc: BaseException) -> bool:
        return owner._retries_only and retry.should_retry(exc, 1)

    def chunk_done(
        first: int, items: list[Any], values: list[Any], errors: dict[int, BaseException]
    ) -> list[Outcome]:
        """The outcomes of a chunk's first ``len(values)`` items; an item that failed with a
        retryable error continues through its chain instead."""
        if not errors or not owner._retries_only:
            return run.finished_chunk(first, values, errors)
        ready: list[Outcome] = []
        for offset, value in enumerate(values):
            error = errors.get(offset)
            if error is None:
                ready += run.finished(first + offset, True, value)
            elif retryable(error):
                chained(first + offset, items[offset], error)
            else:
                ready += run.finished(first + offset, False, error)
        return ready

    def crashed_chunk(first: int, items: list[Any], exc: WorkerCrashedError) -> list[Outcome]:
        """A chunk's worker died. The items whose outcomes it had sent keep them; the item it
        was running fails as one crashed item would (retried if ``retry_on`` covers it); the
        others run again one by one. When the running item is not known, all of them run again,
        so that only the one that kills its worker fails."""
        done: tuple[list[Any], dict[int, BaseException]] = ([], {})
        running = -1
        if isinstance(exc, ChunkCrashedError):
            done, running = exc.done, exc.running
        ready = chunk_done(first, items, *done) if done[0] else []
        for offset in range(len(done[0]), len(items)):
            if offset != running:
                send(first + offset, items[offset])
                continue
            crash = WorkerCrashedError(str(exc))
            if retryable(crash):
                chained(first + offset, items[offset], crash)
            else:
                ready += run.failed(first + offset, 1, crash)
        return ready

    abort = True
    try:
        exhausted = False
        while True:
            while not exhausted and has_room():
                if chunks is None:
                    entry = next(run.items, None)
                    if entry is None:
                        exhausted = True
                        break
                    (send if direct else chained)(*entry)
                    continue
                batch = chunks.fill(run.items, run.streaming)
                if not batch:
                    exhausted = True
                    break
                chunk = [item for _, item in batch]
                future = pool.submit(owner._chunk_call(), (chunk, kwargs), {})
                chunks.sent(future)
                in_flight[future] = (_CHUNK, batch[0][0], chunk)
                future.add_done_callback(done.put)
            if not in_flight:
                break
            future = done.get()
            kind, first, items = in_flight.pop(future)
            if chunks is not None and kind == _CHUNK:
                chunks.received(future)
            ready: list[Outcome]
            try:
                value = future.result()
                if kind == _CHAIN:
                    value = _unwrap(value)
            except BaseException as exc:
                if kind == _CHUNK and isinstance(exc, WorkerCrashedError) and len(items) > 1:
                    ready = crashed_chunk(first, items, exc)
                elif kind != _CHAIN and retryable(exc):
                    for offset, item in enumerate(items):
                        chained(first + offset, item, exc)
                    continue
                else:
                    ready = run.failed(first, len(items), exc)
            else:
                if kind != _CHUNK:
                    ready = run.finished(first, True, value)
                else:
                    ready = chunk_done(first, items, *value)
            if ready:
                yield from ready
        abort = False
    except (GeneratorExit, Exception):
        # The consumer stopped reading a stream, or the input iterator failed: not an interrupt.
        abort = False
        raise
    finally:
        for future in in_flight:
            future.cancel()
        if helper is not None:
            helper.stop()
        owner._release(pool, abort=abort)


def _failed_once(exc: BaseException, call: Callable[..., Any]) -> Callable[..., Any]:
    """``call``, except that its first invocation raises ``exc``: the first attempt was made
    directly on the pool and failed, so the chain goes on with its backoff and attempt 2."""
    pending = [exc]

    async def first_failed(*args: Any, **kwargs: Any) -> Any:
        if pending:
            raise pending.pop()
        return await call(*args, **kwargs)

    return first_failed


async def _outcomes_async(
    owner: _Base[Any, Any], run: _Run, kwargs: dict[str, Any]
) -> AsyncGenerator[Outcome, None]:
    """:func:`_outcomes_sync` on the caller's event loop."""
    pool = owner._acquire()
    loop = asyncio.get_running_loop()
    chain = owner._chain_for(pool)
    call = chain.call
    plain = owner._plain
    ready: list[asyncio.Task[Any]] = []
    waiter: asyncio.Future[None] | None = None
    in_flight: dict[asyncio.Task[Any], int] = {}

    def on_done(task: asyncio.Task[Any]) -> None:
        ready.append(task)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    abort = True
    try:
        warm_up = getattr(pool, "aready", None)
        if warm_up is not None and chain.limiter is not None:
            # A cluster backend connects and warms up first: a start slot granted while a cold
            # cluster is still starting would let the calls queued meanwhile start together.
            await warm_up()
        exhausted = False
        while True:
            while not exhausted and run.room(len(in_flight)):
                entry = next(run.items, None)
                if entry is None:
                    exhausted = True
                    break
                index, item = entry
                coro = call(item, **kwargs) if plain else run_async(chain, (item,), kwargs)
                task = loop.create_task(_contained(coro))
                in_flight[task] = index
                task.add_done_callback(on_done)
            if not in_flight:
                break
            if not ready:
                waiter = loop.create_future()
                await waiter
            batch, ready[:] = ready[:], []
            for task in batch:
                index = in_flight.pop(task)
                try:
                    value, ok = _unwrap(task.result()), True
                except BaseException as exc:  # the item's own, or its task was cancelled
                    value, ok = exc, False
                for outcome in run.finished(index, ok, value):
                    yield outcome
        abort = False
    except (GeneratorExit, Exception):
        abort = False
        raise
    finally:
        for task in in_flight:
            task.cancel()
        if in_flight:
            await asyncio.gather(*in_flight, return_exceptions=True)
        owner._release(pool, abort=abort)


@functools.cache
def _call_chunk() -> Callable[..., Any]:
    from opero.concurrency._worker import call_chunk  # noqa: PLC0415 - needs cloudpickle

    return call_chunk


class _Chunks:
    """How many items to send per call when calls are batched.

    A known length is split into about four chunks per worker; an unknown one starts with one
    item per chunk and doubles while chunks come back in under 20 ms, so a slow function is not
    batched and a trivial one quickly is.
    """

    def __init__(self, total: int | None, workers: int) -> None:
        if total is not None:
            self.size = max(1, min(_MAX_CHUNK, total // (4 * workers)))
            self._adaptive = False
        else:
            self.size = 1
            self._adaptive = True
        self._sent: dict[Future[Any], float] = {}

    def fill(self, items: Iterator[tuple[int, Any]], streaming: bool) -> list[tuple[int, Any]]:
        """The next chunk: ``size`` items, or for a stream those its input gave within
        :data:`_FILL_TIME`, so that a stream of a slow source (a queue, a socket) never holds
        items back while it waits for a full chunk."""
        if not streaming:
            return list(itertools.islice(items, self.size))
        batch: list[tuple[int, Any]] = []
        append, size = batch.append, self.size
        deadline = time.perf_counter() + _FILL_TIME
        look = 1  # the clock is read after items 1, 2, 4, 8, ...: cheap for a fast input
        for entry in items:
            append(entry)
            n = len(batch)
            if n >= size:
                break
            if n == look:
                if time.perf_counter() > deadline:
                    break
                look *= 2
        return batch

    def sent(self, future: Future[Any]) -> None:
        if self._adaptive:
            self._sent[future] = time.perf_counter()

    def received(self, future: Future[Any]) -> None:
        started = self._sent.pop(future, None)
        if started is not None and time.perf_counter() - started < 0.02:
            self.size = min(_MAX_CHUNK, self.size * 2)


async def _drain(outcomes: AsyncIterator[Outcome]) -> None:
    async for _ in outcomes:
        pass


def _run_blocking(main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main()`` to completion from sync code: on a new event loop in this thread, or in a
    helper thread when this thread already runs a loop (``asyncio.run`` cannot nest)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(main())  # type: ignore[arg-type]
        return
    helper = _LoopThread()
    try:
        future = helper.submit(main())
        try:
            _unwrap(future.result())
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt while waiting: cancel the map on its loop
            raise
    finally:
        helper.stop()


class _LoopThread:
    """An event loop in a helper thread, for the per-item chains of a sync call."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="opero-opmap-loop", daemon=True
        )
        self._thread.start()

    def submit(self, coro: Any) -> Future[Any]:
        """Run ``coro`` on the loop; a SystemExit or KeyboardInterrupt it raises comes back as a
        :class:`_Raised` value (see :func:`_unwrap`)."""
        return asyncio.run_coroutine_threadsafe(_contained(coro), self.loop)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(_cancel_all(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class _Raised:
    """A SystemExit or KeyboardInterrupt that an item's code raised in a task, carried out as a
    value, so that it is that item's outcome (as in a thread). Raised in the task, it would stop
    the event loop; on a helper loop, before the item's future learns of it, so the map would
    wait forever."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def _contained(coro: Awaitable[Any]) -> Any:
    try:
        return await coro
    except (SystemExit, KeyboardInterrupt) as exc:
        return _Raised(exc)


def _unwrap(value: Any) -> Any:
    if type(value) is _Raised:
        raise value.exc
    return value


async def _cancel_all() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
