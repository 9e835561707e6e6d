"""Rate limiters, chosen by name: ``"local"`` limits one process, ``"redis"`` (or a ``redis://``
URL) shares one limit between every process and host using that Redis."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from opero.core.ratelimit import RateLimiter, check_rate

if TYPE_CHECKING:
    from opero._chain import Limiter

BACKENDS = ("local", "redis")
ON_ERROR = ("local", "raise")


def default_key(func: Callable[..., Any]) -> str:
    """The shared limit's name when ``rate_limit_key`` is not given: the function's module and
    qualified name (a script's ``__main__`` is the same name in spawned worker processes)."""
    module = getattr(func, "__module__", None) or "__main__"
    if module == "__mp_main__":
        module = "__main__"
    qualname = getattr(func, "__qualname__", None) or type(func).__qualname__
    return f"{module}.{qualname}"


def make_limiter(
    func: Callable[..., Any],
    *,
    rate: object,
    backend: object,
    key: object,
    on_error: object,
) -> Limiter | None:
    """The rate limiter of one decorated function, or ``None`` without ``rate_limit``.

    Raises ``ValueError`` naming the option for an impossible value or combination, and
    :class:`~opero.errors.MissingExtraError` when the backend's extra is not installed.
    """
    if rate is None:
        for name, value, default in (
            ("rate_limit_backend", backend, "local"),
            ("rate_limit_key", key, None),
            ("rate_limit_on_error", on_error, "local"),
        ):
            if value != default:
                raise ValueError(f"{name}={value!r} has no effect without rate_limit")
        return None
    checked = check_rate("rate_limit", rate)
    if on_error not in ON_ERROR:
        raise ValueError(f"rate_limit_on_error must be 'local' or 'raise', got {on_error!r}")
    if key is not None and (not isinstance(key, str) or not key.strip()):
        raise ValueError(f"rate_limit_key must be a non-empty string or None, got {key!r}")
    if backend == "local":
        for name, value, default in (
            ("rate_limit_key", key, None),
            ("rate_limit_on_error", on_error, "local"),
        ):
            if value != default:
                raise ValueError(
                    f"{name}={value!r} has no effect with rate_limit_backend='local' "
                    "(it applies to a shared limit, e.g. rate_limit_backend='redis')"
                )
        return RateLimiter(checked)
    # Any "scheme://" goes to resolve_url, which names an unknown scheme without the password.
    if isinstance(backend, str) and (backend == "redis" or "://" in backend):
        from opero.limiters.redis import RedisRateLimiter, resolve_url  # noqa: PLC0415 - extra

        url = resolve_url(backend)
        name = key if isinstance(key, str) else default_key(func)
        return RedisRateLimiter(checked, url, name, str(on_error))
    raise ValueError(
        f"rate_limit_backend={backend!r} is not available: choose one of "
        f"{', '.join(repr(b) for b in BACKENDS)} or a redis:// URL"
    )
