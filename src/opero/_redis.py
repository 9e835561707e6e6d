"""What the Redis cache and the Redis rate limiter share: the URL (resolved, checked when
decorating, redacted in every message), the lazy import of redis-py, and the clients.

One sync client (one connection pool) per URL per process, and one asyncio client per URL per
event loop, because an asyncio connection belongs to the loop that opened it. A loop's clients are
closed while it shuts down. Cache entries and rate limits on one URL share these pools.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, parse_qsl, unquote_plus, urlsplit

from opero.errors import MissingExtraError

if TYPE_CHECKING:
    import redis as redis_py
    import redis.asyncio as redis_asyncio

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_URL",
    "SCHEMES",
    "SOCKET_TIMEOUT",
    "async_client",
    "import_redis",
    "is_redis_url",
    "redact",
    "resolve_url",
    "sync_client",
]

DEFAULT_URL = "redis://localhost:6379/0"
SCHEMES = ("redis", "rediss", "unix")

# Short on purpose: every caller of a cached or rate-limited function waits on them, and both users
# back off after a failure, so a dead server costs one timeout now and then, not one per call.
# Connecting takes well under a millisecond on a working network; a read may wait for a busy server
# (a fork for BGSAVE, a large value). ``?socket_connect_timeout=`` / ``?socket_timeout=`` in the
# URL override them (redis-py's rule: URL options win).
CONNECT_TIMEOUT = 0.25
SOCKET_TIMEOUT = 1.0
# Connections per pool (one pool per URL per process, one per URL per event loop). Callers beyond
# it wait for a free connection instead of failing: redis-py's plain pool raises at its limit,
# which would look like a dead server to the cache and the shared rate limit.
MAX_CONNECTIONS = 50
# How long a caller waits for a free connection: long enough for the calls ahead of it to finish
# or time out against a hung server, so that only a dead server ends in "unreachable".
POOL_TIMEOUT = 2 * (CONNECT_TIMEOUT + SOCKET_TIMEOUT)


def import_redis(feature: str) -> Any:
    """redis-py (with its asyncio client), or :class:`MissingExtraError` naming ``opero[redis]``."""
    try:
        import redis  # noqa: PLC0415 - optional extra, imported on first use
        import redis.asyncio  # noqa: PLC0415
    except ImportError as exc:
        raise MissingExtraError(feature, "redis", exc.name or "redis") from exc
    return redis


def is_redis_url(backend: object) -> bool:
    return isinstance(backend, str) and backend.startswith(tuple(f"{s}://" for s in SCHEMES))


# --- redaction ----------------------------------------------------------------------------------


def redact(url: str) -> str:
    """``url`` with every password hidden (``user:***@`` and ``?password=***``), for messages.

    Works on malformed URLs too, since those end up in error messages.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    # The userinfo ends at the last "@" before the query. urlsplit would end it at the first "/"
    # or "#", which leaves a password holding an unescaped "/" (base64) in the clear.
    head, qmark, query = rest.partition("?")
    if "@" in head:
        creds, _, host = head.rpartition("@")
        user, colon, _ = creds.partition(":")
        head = f"{user}:***@{host}" if colon else f"{user}@{host}"
    if query:
        query = "&".join(_redact_param(param) for param in query.split("&"))
    return f"{scheme}{sep}{head}{qmark}{query}"


def _redact_param(param: str) -> str:
    name, eq, _ = param.partition("=")
    # redis-py decodes the name (parse_qs), so "pass%77ord" is a password too.
    return f"{name}=***" if eq and "password" in unquote_plus(name).lower() else param


# --- resolution and validation -----------------------------------------------------------------


def resolve_url(backend: str, option: str) -> str:
    """The Redis URL for ``option`` (``cache_backend`` / ``rate_limit_backend``) set to
    ``backend``: a URL as given, else ``$OPERO_REDIS_URL``, else :data:`DEFAULT_URL`.

    Raises ``ValueError`` naming the option for a malformed URL, so a typo fails when decorating
    rather than silently using database 0 or localhost, and :class:`MissingExtraError` without
    redis-py.
    """
    if backend == "redis":
        env = os.environ.get("OPERO_REDIS_URL")
        url = env or DEFAULT_URL
        source = f"{option}='redis' with OPERO_REDIS_URL={redact(url)!r}" if env else option
    else:
        url, source = backend, f"{option}={redact(backend)!r}"
    problem = _problem(url)
    if problem is None:
        # What redis-py itself refuses, such as ?socket_timeout=abc (it needs the extra).
        redis = import_redis(f"{option}={redact(backend)!r}")
        try:
            redis.connection.parse_url(url)
        except ValueError as exc:
            problem = str(exc)
    if problem is not None:
        raise ValueError(f"{source} is not a valid Redis URL: {problem}")
    return url


def _problem(url: str) -> str | None:
    """What is wrong with ``url``, or ``None``."""
    scheme = url.partition("://")[0] if "://" in url else ""
    if scheme not in SCHEMES:
        return "the scheme must be one of redis://, rediss://, unix://"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # a port out of range or not a number, or a malformed IPv6 host
        return "the port must be a number from 1 to 65535" if "ort" in str(exc) else str(exc)
    if scheme == "unix":
        if not parts.path or parts.path == "/":
            return "unix:// needs the socket's path (unix:///run/redis.sock)"
    else:
        if not parts.hostname:
            return "no host (redis://host:6379/0)"
        if port == 0:
            return "the port must be a number from 1 to 65535"
        db = parts.path.removeprefix("/")
        if db and not db.isdigit():
            return f"the database {db!r} is not a number (redis://host:6379/0)"
    return _query_problem(parts)


def _query_problem(parts: SplitResult) -> str | None:
    for name, value in parse_qsl(parts.query):
        if name == "db" and not value.isdigit():
            return f"the database {value!r} is not a number"
    return None


# --- clients ------------------------------------------------------------------------------------

_lock = threading.Lock()
_clients: dict[str, redis_py.Redis] = {}
# A plain dict, not weak keys: each entry's connections refer to their loop, so a weakly keyed
# entry would never be freed anyway. Entries leave when their loop shuts down (or is found closed).
_aclients: dict[
    asyncio.AbstractEventLoop,
    tuple[dict[str, redis_asyncio.Redis], AsyncGenerator[None, None]],
] = {}


def _options(redis: Any, retry_class: Any) -> dict[str, Any]:
    return {
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": SOCKET_TIMEOUT,
        "max_connections": MAX_CONNECTIONS,
        "timeout": POOL_TIMEOUT,  # the wait for a free connection
        # No retries inside redis-py: each user backs off on its own, and one more attempt
        # against a dead server only doubles the time a caller waits for it.
        "retry": retry_class(redis.backoff.NoBackoff(), 0),
    }


def sync_client(url: str) -> redis_py.Redis:
    """The process's client (and connection pool) for ``url``."""
    client = _clients.get(url)
    if client is None:
        with _lock:
            client = _clients.get(url)
            if client is None:
                redis = import_redis("Redis")
                options = _options(redis, redis.retry.Retry)
                pool = redis.BlockingConnectionPool.from_url(url, **options)
                client = redis.Redis(connection_pool=pool)
                client.auto_close_connection_pool = True  # as from_url does: close() frees it
                _clients[url] = client
    return client


async def async_client(url: str) -> redis_asyncio.Redis:
    """The running event loop's client for ``url``, closed when the loop shuts down."""
    loop = asyncio.get_running_loop()
    entry = _aclients.get(loop)
    if entry is None:
        clients: dict[str, redis_asyncio.Redis] = {}
        closer = _close_at_loop_shutdown(loop, clients)
        # Started here, the generator is tracked by the loop, whose shutdown_asyncgens() (run by
        # asyncio.run and every asyncio.Runner) finalises it: the clients are closed while their
        # loop still runs, instead of warning "unclosed Connection" when collected later.
        await closer.__anext__()
        with _lock:
            # A loop closed without shutdown_asyncgens() never ran its closer: forget it here.
            for old in [old for old in _aclients if old.is_closed()]:
                del _aclients[old]
            entry = _aclients[loop] = (clients, closer)
    clients = entry[0]
    client = clients.get(url)
    if client is None:
        redis = import_redis("Redis")
        options = _options(redis, redis.asyncio.retry.Retry)
        apool = redis.asyncio.BlockingConnectionPool.from_url(url, **options)
        client = redis.asyncio.Redis(connection_pool=apool)
        client.auto_close_connection_pool = True  # as from_url does: aclose() frees it
        clients[url] = client
    return client


async def _close_at_loop_shutdown(
    loop: asyncio.AbstractEventLoop, clients: dict[str, redis_asyncio.Redis]
) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        with _lock:
            _aclients.pop(loop, None)
        redis = import_redis("Redis")
        for client in clients.values():
            with contextlib.suppress(redis.RedisError, OSError):
                await client.aclose()
