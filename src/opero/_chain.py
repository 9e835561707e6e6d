"""THE layer order, stated once.

For every call, outermost first::

    cache lookup -> fallback over candidates -> retry (per candidate)
                 -> rate limit (per attempt) -> the call

So a cache hit costs no rate-limit token and no attempt, every real attempt (retries and fallbacks
included) takes a token, and each fallback candidate gets its own ``retries + 1`` attempts.
:mod:`opero._engine` carries this order out, once for sync and once for async code; ``@opero`` and
``@opmap`` both build a :class:`Chain` here and hand it to the engine.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from opero.core.cache import CacheLayer
from opero.core.fallback import Fallback
from opero.core.retry import RetryPolicy, _check_retry_on
from opero.limiters import make_limiter


class Limiter(Protocol):
    """Decides how long a call must wait before it may start (the engine does the waiting).

    ``reserve``/``areserve`` answer the first ask (0 = start now). A caller told to wait sleeps,
    then asks ``settle`` until it answers 0; a caller that gives up while waiting calls
    ``abandon``.
    """

    def reserve(self, now: float) -> float: ...
    async def areserve(self, now: float) -> float: ...
    def settle(self, now: float) -> float: ...
    def abandon(self) -> None: ...


@dataclass(frozen=True)
class Options:
    """Every option shared by ``@opero`` and ``@opmap``, as the user gave them."""

    retries: int = 0
    backoff_factor: float = 1.5
    min_delay: float = 0.1
    max_delay: float = 30.0
    jitter: bool = True
    retry_on: object = Exception
    fallback_on: object = Exception
    arg_fallback: str | None = None
    rate_limit: float | None = None
    rate_limit_backend: str = "local"
    rate_limit_key: str | None = None
    rate_limit_on_error: str = "local"
    cache: bool = False
    cache_ttl: float | None = None
    cache_backend: object = "memory"
    cache_key: Callable[..., object] | None = None
    cache_namespace: str = "opero"
    cache_maxsize: int = 4096
    cache_dir: str | os.PathLike[str] | None = None
    cache_serializer: str = "pickle"


@dataclass(frozen=True)
class Chain:
    """The layers of one decorated function; ``call`` is what the last layer invokes."""

    func: Callable[..., Any]
    call: Callable[..., Any]
    name: str
    cache: CacheLayer | None
    fallback: Fallback | None
    fallback_on: tuple[type[BaseException], ...]
    retry: RetryPolicy
    limiter: Limiter | None


def _check_cache_options(opts: Options) -> None:
    if not isinstance(opts.cache, bool):
        # ValueError, like every impossible option value (issue 2), not TypeError
        raise ValueError(f"cache must be True or False, got {opts.cache!r}")  # noqa: TRY004
    if opts.cache_ttl is not None and (
        isinstance(opts.cache_ttl, bool)
        or not isinstance(opts.cache_ttl, int | float)
        or not math.isfinite(opts.cache_ttl)
        or opts.cache_ttl <= 0
    ):
        raise ValueError(
            f"cache_ttl must be a positive number of seconds or None, got {opts.cache_ttl!r}"
        )
    if opts.cache_key is not None and not callable(opts.cache_key):
        raise ValueError(f"cache_key must be a callable or None, got {opts.cache_key!r}")
    if not isinstance(opts.cache_namespace, str) or not opts.cache_namespace:
        raise ValueError(
            f"cache_namespace must be a non-empty string, got {opts.cache_namespace!r}"
        )
    if (
        isinstance(opts.cache_maxsize, bool)
        or not isinstance(opts.cache_maxsize, int)
        or opts.cache_maxsize < 1
    ):
        raise ValueError(f"cache_maxsize must be an integer >= 1, got {opts.cache_maxsize!r}")
    defaults = Options()
    custom_size = opts.cache_maxsize != defaults.cache_maxsize
    if opts.cache and opts.cache_backend != "memory" and custom_size:
        raise ValueError(
            f"cache_maxsize={opts.cache_maxsize!r} bounds the memory backend only; "
            f"cache_backend={opts.cache_backend!r} keeps its own size"
        )
    if not opts.cache:
        for name in (
            "cache_ttl",
            "cache_backend",
            "cache_key",
            "cache_dir",
            "cache_maxsize",
            "cache_serializer",
            "cache_namespace",
        ):
            if getattr(opts, name) != getattr(defaults, name):
                raise ValueError(f"{name}={getattr(opts, name)!r} has no effect without cache=True")


def callable_name(func: Callable[..., Any]) -> str:
    """``module.qualname`` for log lines and errors; partials and callable objects have none."""
    target = func.func if isinstance(func, functools.partial) else func
    module = getattr(target, "__module__", None) or type(target).__module__
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}.{qualname}"


def build_chain(
    func: Callable[..., Any],
    opts: Options,
    *,
    is_async: bool,
    call: Callable[..., Any] | None = None,
) -> Chain:
    """Validate ``opts`` against ``func`` and build its chain (raises ``ValueError`` naming the
    option on an impossible value)."""
    from opero.cache import make_layer  # noqa: PLC0415 - backends import the chain's types

    retry = RetryPolicy(
        retries=opts.retries,
        backoff_factor=opts.backoff_factor,
        min_delay=opts.min_delay,
        max_delay=opts.max_delay,
        jitter=opts.jitter,
        retry_on=opts.retry_on,
    )
    try:
        fallback_on = _check_retry_on(opts.fallback_on)
    except ValueError:
        raise ValueError(
            f"fallback_on must be an exception type or a tuple of them, got {opts.fallback_on!r}"
        ) from None
    fallback = None if opts.arg_fallback is None else Fallback(func, opts.arg_fallback)
    limiter = make_limiter(
        func,
        rate=opts.rate_limit,
        backend=opts.rate_limit_backend,
        key=opts.rate_limit_key,
        on_error=opts.rate_limit_on_error,
    )
    _check_cache_options(opts)
    layer = None
    if opts.cache:
        layer = make_layer(
            func,
            backend=opts.cache_backend,
            namespace=opts.cache_namespace,
            ttl=opts.cache_ttl,
            key_fn=opts.cache_key,
            maxsize=opts.cache_maxsize,
            cache_dir=opts.cache_dir,
            serializer=opts.cache_serializer,
            is_async=is_async,
        )
    return Chain(
        func=func,
        call=func if call is None else call,
        name=callable_name(func),
        cache=layer,
        fallback=fallback,
        fallback_on=fallback_on,
        retry=retry,
        limiter=limiter,
    )
