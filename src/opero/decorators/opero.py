"""``@opero``: caching, fallbacks, retries and rate limiting for one sync or async function."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from opero._chain import Chain, Options, build_chain
from opero._engine import continue_after_failure_sync, run_async, run_sync

P = ParamSpec("P")
R = TypeVar("R")


def check_function(func: object, decorator: str) -> None:
    """Refuse what cannot be decorated, at decoration time."""
    if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        raise TypeError(
            f"@{decorator} cannot decorate the generator function "
            f"{getattr(func, '__qualname__', func)!r}: a retried or cached generator cannot keep "
            "its promise. Decorate a function that returns a list instead."
        )
    if not callable(func):
        raise TypeError(f"@{decorator} needs a function, got {func!r}")


def is_async_function(func: Callable[..., Any]) -> bool:
    """True for ``async def`` functions, wrappers of them, and objects whose ``__call__`` is
    ``async def``."""
    if inspect.iscoroutinefunction(inspect.unwrap(func)) or inspect.iscoroutinefunction(func):
        return True
    call = type(func).__dict__.get("__call__") or getattr(type(func), "__call__", None)  # noqa: B004
    return not inspect.isroutine(func) and inspect.iscoroutinefunction(call)


def opero(
    _func: None = None,
    /,
    *,
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
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Make a sync or async function resilient.

    Per call, outermost first: cache lookup, fallback over the ``arg_fallback`` candidates, retries
    with exponential backoff per candidate, the rate limit per attempt, then the call. Every option
    is off until named; see the README's option reference for each one. Impossible values raise
    ``ValueError`` naming the option when decorating; unknown options raise ``TypeError``.
    """
    if _func is not None:
        raise TypeError(
            "write @opero(...) with parentheses: opero takes keyword-only options, "
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

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        if isinstance(func, classmethod | staticmethod):
            return type(func)(decorate(func.__func__))
        check_function(func, "opero")
        is_async = is_async_function(func)
        chain = build_chain(func, opts, is_async=is_async)
        return _wrap(func, chain, is_async)

    return decorate


def _wrap(func: Callable[P, R], chain: Chain, is_async: bool) -> Callable[P, R]:
    wrapper: Any
    if is_async:

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            return await run_async(chain, args, kwargs)

    elif chain.cache is None and chain.limiter is None and chain.fallback is None:
        call = chain.call

        # With no cache, limit or fallback the first attempt is made inline and the engine is
        # entered only after a failure, so success costs one try block.
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return call(*args, **kwargs)
            except Exception as exc:
                error = exc
            # Outside the handler, so later attempts' errors do not chain this one as __context__.
            return continue_after_failure_sync(chain, error, args, kwargs)

    else:

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return run_sync(chain, args, kwargs)

    functools.update_wrapper(wrapper, func)
    wrapper.cache_clear = functools.partial(_cache_clear, chain)
    wrapper.opero_chain = chain
    return wrapper  # type: ignore[no-any-return]


def _cache_clear(chain: Chain) -> int:
    """Remove this function's entries from its cache; return how many were removed."""
    if chain.cache is None:
        return 0
    return chain.cache.clear_own()
