"""Shared fixtures. Backend-specific fixtures live next to the tests that use them."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

import pytest


class Mode:
    """Runs one test body as a sync function or as an async one (``mode`` fixture)."""

    def __init__(self, is_async: bool) -> None:
        self.is_async = is_async

    def __repr__(self) -> str:
        return "async" if self.is_async else "sync"

    def fn(self, body: Callable[..., Any]) -> Callable[..., Any]:
        """``body`` itself, or an async function with its name and signature that awaits once."""
        if not self.is_async:
            return body

        @functools.wraps(body)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(0)
            return body(*args, **kwargs)

        return wrapper

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call a decorated function: directly, or in a fresh event loop."""
        if self.is_async:
            return asyncio.run(fn(*args, **kwargs))
        return fn(*args, **kwargs)


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> Mode:
    """The same test, once with a sync function and once with an async one."""
    return Mode(request.param)
