"""``mode="thread"``: a thread pool in the caller's process."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from opero.concurrency import Backend


def run_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Call ``fn``; an ``async def`` function runs to completion on a fresh event loop."""
    result = fn(*args, **kwargs)
    if inspect.iscoroutine(result):
        return asyncio.run(result)
    return result


class ThreadBackend(Backend):
    """``workers`` threads; threads cannot crash or be killed, so this is ``ThreadPoolExecutor``."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="opero-opmap")
        self._last: tuple[object, bool] = (None, False)  # (function, is async): one atomic pair

    def submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Future[Any]:
        last = self._last
        if last[0] is not fn:
            last = self._last = (fn, inspect.iscoroutinefunction(fn))
        if last[1]:
            return self._pool.submit(run_call, fn, args, kwargs)
        return self._pool.submit(fn, *args, **kwargs)

    def close(self, *, cancel: bool = False) -> None:
        # A running thread cannot be stopped; with cancel=True its result is simply not awaited.
        self._pool.shutdown(wait=not cancel, cancel_futures=cancel)
