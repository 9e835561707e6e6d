"""``mode="async"``: coroutines on the caller's own event loop; sync functions in threads."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from opero.concurrency.thread import ThreadBackend


class AioBackend(ThreadBackend):
    """Awaits ``async def`` functions on the caller's loop (the map limits how many are in
    flight); a sync function runs in a pool of ``workers`` threads instead."""

    inline = True

    async def acall(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if inspect.iscoroutinefunction(fn):
            return await fn(*args, **kwargs)
        return await super().acall(fn, args, kwargs)
