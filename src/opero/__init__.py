"""opero: resilient, parallel Python functions with two decorators.

``@opero`` adds caching, parameter fallbacks, retries with backoff and rate limiting to a sync or
async function; ``@opmap`` adds the same per item plus a parallel map.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from opero._log import configure_logging
from opero.cache import clear_cache
from opero.core.cache import CacheBackend
from opero.decorators.opero import opero
from opero.decorators.opmap import opmap
from opero.errors import (
    FallbackError,
    OperoError,
    OpmapError,
    RateLimitUnavailableError,
    WorkerCrashedError,
)

try:
    __version__ = version("opero")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = [
    "CacheBackend",
    "FallbackError",
    "OperoError",
    "OpmapError",
    "RateLimitUnavailableError",
    "WorkerCrashedError",
    "__version__",
    "clear_cache",
    "configure_logging",
    "opero",
    "opmap",
]
