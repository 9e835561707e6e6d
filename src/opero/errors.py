"""Every exception opero raises derives from :class:`OperoError`.

Wrapper errors keep the original exceptions (``.errors``, ``__cause__``), never only their text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = [
    "CacheKeyError",
    "FallbackError",
    "MissingExtraError",
    "OperoError",
    "OpmapError",
    "RateLimitUnavailableError",
    "RemoteError",
    "WorkerCrashedError",
]


class OperoError(Exception):
    """Base class of every error raised by opero itself."""


class FallbackError(OperoError):
    """Every candidate of an ``arg_fallback`` parameter failed.

    ``errors`` holds each candidate's final exception, in candidate order, with its traceback;
    ``__cause__`` is the last one.
    """

    def __init__(self, message: str, errors: Sequence[BaseException]) -> None:
        super().__init__(message)
        self.errors: list[BaseException] = list(errors)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.errors))


class OpmapError(OperoError):
    """Some items of an ``@opmap`` call failed.

    ``results`` is the full result list in input order, with the exception in place of each failed
    item; ``errors`` maps each failed item's index to its exception.
    """

    def __init__(
        self, message: str, results: Sequence[object], errors: Mapping[int, BaseException]
    ) -> None:
        super().__init__(message)
        self.results: list[object] = list(results)
        self.errors: dict[int, BaseException] = dict(errors)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.results, self.errors))


class WorkerCrashedError(OperoError):
    """The worker running an item died (killed, ``os._exit``, out of memory) before it answered."""


class RemoteError(OperoError):
    """A worker raised an exception that could not be sent back to the caller as itself.

    ``type_name`` is the original exception's qualified type name, ``message`` its ``str()`` and
    ``remote_traceback`` the formatted traceback from the worker.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.type_name, self.message, self.remote_traceback))


class RateLimitUnavailableError(OperoError):
    """The shared rate limit's store (Redis) was unreachable with ``rate_limit_on_error="raise"``.

    ``__cause__`` is the store's own error; the call was not made.
    """


class CacheKeyError(OperoError, TypeError):
    """An argument cannot be turned into a stable cache key."""


class MissingExtraError(OperoError, ImportError):
    """A feature needs an optional dependency: the message names the ``pip install opero[...]``."""

    def __init__(self, feature: str, extra: str, module: str) -> None:
        super().__init__(
            f"{feature} needs the optional dependency {module!r}: pip install 'opero[{extra}]'"
        )
        self.feature = feature
        self.extra = extra
        self.name = module

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.feature, self.extra, self.name))
