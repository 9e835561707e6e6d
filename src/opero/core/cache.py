"""Cache policy: stable keys, single flight, and the adapter that keeps a failing store harmless.

Keys are ``"{namespace}:{module}.{qualname}:{digest}"`` where the digest is a BLAKE2b hash of a
deterministic text form of the call's arguments, bound to the signature with defaults applied. The
text form never uses ``hash()``, ``id()`` or the ``repr`` of arbitrary objects, so keys are the
same in every process, machine and run.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import fractions
import inspect
import pathlib
import threading
import types
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from hashlib import blake2b
from typing import Any, Protocol, runtime_checkable

from opero._log import logger
from opero.errors import CacheKeyError

__all__ = ["MISSING", "CacheBackend", "CacheLayer", "Flights", "KeyBuilder", "Serializer"]

MISSING: Any = type("MissingType", (), {"__repr__": lambda self: "MISSING"})()
"""Returned by a lookup that found nothing (``None`` is a legitimate cached value)."""

# Types whose repr() is deterministic, distinct per type (1, 1.0, True and "1" differ) and free of
# addresses: the fast path serialises a tuple made only of these with one repr() call.
_PRIMITIVES = frozenset({int, float, str, bytes, bool, type(None)})
_REPR_TYPES = (
    complex,
    decimal.Decimal,
    fractions.Fraction,
    datetime.datetime,
    datetime.date,
    datetime.time,
    datetime.timedelta,
    datetime.timezone,
    uuid.UUID,
    pathlib.PurePath,
    range,
)


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _encode(obj: Any, out: list[str], seen: set[int]) -> None:
    """Append a deterministic, type-tagged text form of ``obj`` to ``out``."""
    cls = type(obj)
    if cls in _PRIMITIVES:
        out.append(repr(obj))
        return
    if isinstance(obj, enum.Enum):
        out.append(f"E<{_qualname(cls)}>(")
        _encode(obj.value, out, seen)
        out.append(")")
        return
    if isinstance(obj, _REPR_TYPES):
        out.append(f"{_qualname(cls)}:{obj!r}")
        return
    if isinstance(obj, int | float | str | bytes):
        # A subclass (class UserId(int)) keys on its value, read through the base type's repr:
        # its own __repr__ may not show the value, and its (usually empty) __dict__ never does.
        base = next(b for b in (int, float, str, bytes) if isinstance(obj, b))
        out.append(f"P<{_qualname(cls)}>:{base.__repr__(obj)}")
        return
    if isinstance(obj, type):
        _refuse_local(obj)
        out.append(f"C<{_qualname(obj)}>")
        return
    if inspect.isroutine(obj):
        _refuse_local(obj)
        out.append(f"F<{_qualname(obj)}>")
        return
    marker = id(obj)
    if marker in seen:
        raise CacheKeyError("it contains a reference cycle")
    seen.add(marker)
    try:
        _encode_composite(obj, cls, out, seen)
    finally:
        seen.discard(marker)


def _refuse_local(obj: Any) -> None:
    name = getattr(obj, "__qualname__", "")
    if "<lambda>" in name or "<locals>" in name:
        raise CacheKeyError(f"{name} is a lambda or a local object with no stable name")


def _encode_composite(obj: Any, cls: type, out: list[str], seen: set[int]) -> None:
    if cls is tuple or cls is list or isinstance(obj, tuple | list):
        out.append(f"{'T' if isinstance(obj, tuple) else 'L'}<{_qualname(cls)}>[")
        for item in obj:
            _encode(item, out, seen)
            out.append(",")
        out.append("]")
    elif isinstance(obj, Mapping):
        pairs = []
        for key, value in obj.items():
            key_part: list[str] = []
            _encode(key, key_part, seen)
            value_part: list[str] = []
            _encode(value, value_part, seen)
            pairs.append(("".join(key_part), "".join(value_part)))
        pairs.sort()
        out.append(f"D<{_qualname(cls)}>{{")
        out.extend(f"{k}:{v}," for k, v in pairs)
        out.append("}")
    elif isinstance(obj, set | frozenset):
        items = []
        for item in obj:
            part: list[str] = []
            _encode(item, part, seen)
            items.append("".join(part))
        items.sort()
        out.append(f"S<{_qualname(cls)}>{{{','.join(items)}}}")
    elif callable(getattr(obj, "__opero_key__", None)):
        out.append(f"K<{_qualname(cls)}>(")
        _encode(obj.__opero_key__(), out, seen)
        out.append(")")
    elif dataclasses.is_dataclass(obj):
        out.append(f"O<{_qualname(cls)}>(")
        for field in dataclasses.fields(obj):
            out.append(f"{field.name}=")
            _encode(getattr(obj, field.name), out, seen)
            out.append(",")
        out.append(")")
    else:
        _encode_instance(obj, cls, out, seen)


def _encode_instance(obj: Any, cls: type, out: list[str], seen: set[int]) -> None:
    """Plain instances key on their class and attribute values (``__dict__`` and ``__slots__``).

    This is also the rule for ``self``: two instances of one class with equal attributes share
    entries. An instance of a Python class with no attributes at all keys on its class alone; an
    object whose state opero cannot see (no ``__dict__``, no slots: a C type; or a class that
    defines ``__reduce__``, whose state lives elsewhere) is refused.
    """
    attrs: dict[str, Any] = {}
    visible = False
    # A class that pickles itself (functools.partial, deque, exceptions, ...) keeps state
    # outside __dict__ and slots: keying on those alone would give different values one key.
    pickles_itself = any(
        "__reduce__" in vars(k) or "__reduce_ex__" in vars(k) for k in cls.__mro__[:-1]
    )
    if cls.__module__ != "builtins" and not pickles_itself:
        state = getattr(obj, "__dict__", None)
        if isinstance(state, dict):
            visible = True
            attrs.update(state)
        for klass in cls.__mro__:
            slots = getattr(klass, "__slots__", ())
            for slot in (slots,) if isinstance(slots, str) else slots:
                if slot not in ("__dict__", "__weakref__"):
                    visible = True
                    if hasattr(obj, slot):
                        attrs[slot] = getattr(obj, slot)
    if not visible:
        raise CacheKeyError(
            f"a {cls.__qualname__} object has no value opero can serialise "
            "(define __opero_key__() on its class or pass cache_key=)"
        )
    _refuse_local(cls)
    out.append(f"O<{_qualname(cls)}>")
    _encode(attrs, out, seen)


def serialise_for_key(value: Any) -> str:
    """The deterministic text form of ``value`` used for cache keys."""
    out: list[str] = []
    _encode(value, out, set())
    return "".join(out)


class KeyBuilder:
    """Builds the cache key of one call of one function.

    Arguments are bound to the signature with defaults applied, so ``f(1)``, ``f(1, 2)`` and
    ``f(a=1, b=2)`` share a key when ``b`` defaults to 2. When the call is already canonical (all
    parameters passed positionally, nothing else) binding is skipped.

    The text that is hashed is ``repr()`` of the tuple of values when every value is a primitive
    (``int``, ``float``, ``str``, ``bytes``, ``bool``, ``None``: their repr is deterministic and
    tells the types apart), else the type-tagged form of :func:`serialise_for_key` of each value,
    joined by ``\x1f``. The two forms cannot collide: only the first starts with ``(``.
    """

    __slots__ = (
        "_key_fn",
        "_memo",
        "_n_params",
        "_n_required",
        "_names",
        "_open",
        "_owner",
        "_pairs",
        "_signature",
        "_tail",
        "prefix",
    )

    def __init__(
        self, func: Callable[..., Any], namespace: str, key_fn: Callable[..., object] | None
    ) -> None:
        qualname = getattr(func, "__qualname__", None)
        if not isinstance(qualname, str):
            # A functools.partial or a callable object: no stable name to key on, and the
            # partial's bound arguments would not be part of the key.
            raise TypeError(
                f"cache=True needs a function with a __qualname__, got {func!r}: decorate a "
                "function (def) that makes this call instead"
            )
        self.prefix = f"{namespace}:{func.__module__}.{qualname}:"
        self._key_fn = key_fn
        # A bound method computes with its __self__, which its parameters do not show:
        # a.method and b.method must not share entries, so __self__ joins every key (the rule
        # for `self`, read per call because the object may change between calls).
        self._owner: object = _NO_OWNER
        if inspect.ismethod(func) or (
            inspect.isbuiltin(func) and not isinstance(func.__self__, types.ModuleType | None)
        ):
            self._owner = func.__self__
        self._signature = inspect.signature(func)
        params = list(self._signature.parameters.values())
        self._names = [p.name for p in params]
        simple = all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
        self._n_params = len(params) if simple else -1
        # Positional calls that leave out trailing defaults are completed from this tuple.
        required = sum(p.default is p.empty for p in params)
        self._n_required = required if simple else len(params) + 1
        self._tail = tuple(p.default for p in params[required:])
        # For signatures of plain parameters only, keyword calls are bound by hand: each
        # parameter with its default (or _NO_DEFAULT), and for each number of positional
        # arguments the names a keyword may still take. Anything else goes to Signature.bind.
        self._pairs: tuple[tuple[str, Any], ...] | None = None
        self._open: tuple[frozenset[str], ...] = ()
        if all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params):
            self._pairs = tuple(
                (p.name, _NO_DEFAULT if p.default is p.empty else p.default) for p in params
            )
            self._open = tuple(frozenset(self._names[i:]) for i in range(len(params) + 1))
        # Recent short texts and their keys: a repeated call (a cache hit) skips the hash. A pure
        # memo of a pure function, so it cannot change a key; bounded, and cleared when full.
        self._memo: dict[str, str] = {}

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        if self._owner is not _NO_OWNER:
            owner = _argument_text("self", self._owner)
            return self._hash(owner + "\x1e" + self._text(args, kwargs))
        if self._key_fn is not None:
            return self._hash(_argument_text("cache_key", self._key_fn(*args, **kwargs)))
        if kwargs or not self._n_required <= len(args) <= self._n_params:
            args = self._bind(args, kwargs)
        elif len(args) < self._n_params:
            args = args + self._tail[len(args) - self._n_required :]
        # args now holds every parameter's value, in signature order
        if _PRIMITIVES.issuperset(map(type, args)):
            text = repr(args)
            key = self._memo.get(text)
            return self._hash(text) if key is None else key
        return self._hash(
            "\x1f".join([_argument_text(n, v) for n, v in zip(self._names, args, strict=True)])
        )

    def _text(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The text of the arguments that ``__call__`` hashes, without its shortcuts."""
        if self._key_fn is not None:
            return _argument_text("cache_key", self._key_fn(*args, **kwargs))
        values = self._bind(args, kwargs)
        if _PRIMITIVES.issuperset(map(type, values)):
            return repr(values)
        return "\x1f".join([_argument_text(n, v) for n, v in zip(self._names, values, strict=True)])

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """Every parameter's value in signature order, defaults applied."""
        pairs = self._pairs
        n = len(args)
        if pairs is not None and n <= len(pairs) and kwargs.keys() <= self._open[n]:
            get = kwargs.get
            values = list(args)
            for name, default in pairs[n:]:
                value = get(name, default)
                if value is _NO_DEFAULT:
                    break  # a required argument is missing: Signature.bind raises the TypeError
                values.append(value)
            else:
                return tuple(values)
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return tuple(bound.arguments.values())

    def _hash(self, text: str) -> str:
        memo = self._memo
        key = memo.get(text)
        if key is not None:
            return key
        key = self.prefix + blake2b(text.encode(), digest_size=20).hexdigest()
        if len(text) <= _MEMO_TEXT:
            if len(memo) >= _MEMO_SIZE:
                memo.clear()
            memo[text] = key
        return key


_MEMO_SIZE = 256
_NO_DEFAULT: Any = object()
_NO_OWNER: Any = object()
_MEMO_TEXT = 256


def _argument_text(name: str, value: Any) -> str:
    try:
        return serialise_for_key(value)
    except CacheKeyError as exc:
        raise CacheKeyError(
            f"cannot build a cache key from argument {name!r}: {exc}. Pass cache_key= to "
            "choose the key yourself, or give the type an __opero_key__() method"
        ) from None
    except RecursionError:
        raise CacheKeyError(
            f"cannot build a cache key from argument {name!r}: it is nested too deeply"
        ) from None


class Serializer(Protocol):
    """Turns values into bytes and back for stores outside the process."""

    def dumps(self, value: object) -> bytes: ...
    def loads(self, data: bytes) -> object: ...


@runtime_checkable
class CacheBackend(Protocol):
    """A store for serialised results. Implement this to plug in your own store.

    Keys are strings that start with ``"{namespace}:"``; values are bytes (``None`` from ``get``
    means a miss). ``ttl`` is in seconds, ``None`` for no expiry. ``clear(prefix)`` removes every
    key that starts with ``prefix`` and returns how many it removed. Each sync method has an
    async twin used by async functions, which must not block the event loop.
    """

    def get(self, key: str) -> bytes | None: ...
    def set(self, key: str, value: bytes, ttl: float | None) -> None: ...
    def delete(self, key: str) -> None: ...
    def clear(self, prefix: str) -> int: ...
    async def aget(self, key: str) -> bytes | None: ...
    async def aset(self, key: str, value: bytes, ttl: float | None) -> None: ...
    async def adelete(self, key: str) -> None: ...
    async def aclear(self, prefix: str) -> int: ...


class ObjectStore(Protocol):
    """An in-process store that keeps the objects themselves (no serialisation)."""

    def get(self, key: str) -> object: ...  # MISSING on a miss
    def set(self, key: str, value: object, ttl: float | None) -> None: ...
    def delete(self, key: str) -> None: ...
    def clear(self, prefix: str) -> int: ...


class Flights:
    """Single flight: concurrent calls with one key run the function once and share its outcome.

    The leader (first caller) gets a ``concurrent.futures.Future`` that every follower waits on,
    whether it is a thread or a task on any event loop. A leader that is cancelled or interrupted
    hands leadership on instead of failing its followers. A leader that calls itself recursively
    with the same key does not wait on itself.
    """

    __slots__ = ("_lock", "_running")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, tuple[Future[Any], object]] = {}

    def join(self, key: str, owner: object) -> tuple[bool, Future[Any] | None]:
        """Return ``(True, future)`` for a new leader, ``(False, future)`` for a follower, and
        ``(True, None)`` when ``owner`` already leads this key (recursion: just compute)."""
        with self._lock:
            running = self._running.get(key)
            if running is None:
                future: Future[Any] = Future()
                self._running[key] = (future, owner)
                return True, future
        if running[1] == owner:
            return True, None
        return False, running[0]

    def finish(
        self, key: str, future: Future[Any], value: object, error: BaseException | None
    ) -> None:
        with self._lock:
            if self._running.get(key, (None,))[0] is future:
                del self._running[key]
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)


class LeaderGone(Exception):  # an internal signal, not an error users see
    """Set on a flight whose leader was cancelled: followers race to lead again."""


class CacheLayer:
    """Lookup and store through one backend, never letting the store fail the call.

    A store error is a miss (lookup) or a no-op (store); the first one logs one WARNING and later
    ones stay quiet until the store works again, so an outage is reported once, not per call.
    """

    __slots__ = (
        "_failing",
        "_warned_unstorable",
        "backend",
        "flights",
        "key",
        "namespace",
        "raw",
        "serializer",
        "ttl",
    )

    def __init__(
        self,
        backend: CacheBackend | ObjectStore,
        key: KeyBuilder,
        namespace: str,
        ttl: float | None,
        serializer: Serializer | None,
    ) -> None:
        self.backend = backend
        self.key = key
        self.namespace = namespace
        self.ttl = ttl
        self.serializer = serializer
        self.raw = serializer is None  # an in-process store keeps objects as they are
        self.flights = Flights()
        self._failing = False
        self._warned_unstorable = False

    def clear_own(self) -> int:
        """Remove this function's entries (every key with this function's prefix)."""
        return self.backend.clear(self.key.prefix)

    def _failed(self, action: str, exc: BaseException) -> None:
        if not self._failing:
            self._failing = True
            logger.warning(
                "cache %s failed on %s (%s: %s); calls run uncached until it recovers",
                action,
                type(self.backend).__name__,
                type(exc).__name__,
                exc,
            )

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            logger.info("cache backend %s works again", type(self.backend).__name__)

    def _unstorable(self, key: str, exc: BaseException) -> None:
        # Once per function: a result type that cannot be serialised will not change per call.
        if not self._warned_unstorable:
            self._warned_unstorable = True
            logger.warning(
                "results of %s cannot be cached by %s (%s: %s); such calls run uncached",
                key.rsplit(":", 1)[0],
                type(self.serializer).__name__,
                type(exc).__name__,
                exc,
            )

    def _decode(self, data: object) -> object:
        if self.raw or data is None or data is MISSING:
            return MISSING if data is None and not self.raw else data
        assert self.serializer is not None
        try:
            return self.serializer.loads(data)  # type: ignore[arg-type]
        except Exception as exc:
            # Corrupt, foreign or from an incompatible version: a miss, overwritten on store.
            logger.debug("cache entry could not be decoded (%s); treating as a miss", exc)
            return MISSING

    def lookup(self, key: str) -> object:
        try:
            data = self.backend.get(key)
        except Exception as exc:
            self._failed("lookup", exc)
            return MISSING
        if self._failing:
            self._recovered()
        return self._decode(data)

    def store(self, key: str, value: object) -> None:
        try:
            payload = value if self.raw else self.serializer.dumps(value)  # type: ignore[union-attr]
        except Exception as exc:
            self._unstorable(key, exc)
            return
        try:
            self.backend.set(key, payload, self.ttl)  # type: ignore[arg-type]
        except Exception as exc:
            self._failed("store", exc)
        else:
            if self._failing:
                self._recovered()

    async def alookup(self, key: str) -> object:
        if self.raw:
            return self.lookup(key)
        try:
            data = await self.backend.aget(key)  # type: ignore[union-attr]
        except Exception as exc:
            self._failed("lookup", exc)
            return MISSING
        if self._failing:
            self._recovered()
        return self._decode(data)

    async def astore(self, key: str, value: object) -> None:
        if self.raw:
            self.store(key, value)
            return
        assert self.serializer is not None
        try:
            payload = self.serializer.dumps(value)
        except Exception as exc:
            self._unstorable(key, exc)
            return
        try:
            await self.backend.aset(key, payload, self.ttl)  # type: ignore[union-attr]
        except Exception as exc:
            self._failed("store", exc)
        else:
            if self._failing:
                self._recovered()
