"""Cache policy: stable keys, single flight, and the adapter that keeps a failing store harmless.

Keys are ``"{namespace}:{module}.{qualname}:{fingerprint}:{digest}"`` (a ``:`` or ``%`` in the
namespace is escaped, see :func:`namespace_prefix`). The fingerprint names this
version of the function (its source text and the values it closes over, computed once when
decorating); the digest is a BLAKE2b hash of a deterministic text form of the call's arguments,
bound to the signature with defaults applied. The text form never uses ``hash()``, ``id()`` or the
``repr`` of arbitrary objects, so keys are the same in every process, machine and run.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import decimal
import enum
import fractions
import inspect
import pathlib
import textwrap
import threading
import types
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from hashlib import blake2b
from typing import Any, Protocol, runtime_checkable

from opero._log import logger
from opero.errors import CacheKeyError

__all__ = [
    "MISSING",
    "CacheBackend",
    "CacheLayer",
    "Flights",
    "KeyBuilder",
    "Serializer",
    "function_fingerprint",
    "serialise_for_key",
]

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


class _Fingerprinting(set[int]):
    """The ``seen`` set while fingerprinting a function: functions, local classes and modules
    that it closes over are read (source, closure) instead of refused as arguments would be."""

    lenient = False  # cache_key= was given: closure values that cannot be keyed are left out


def _encode(obj: Any, out: list[str], seen: set[int]) -> None:
    """Append a deterministic, type-tagged text form of ``obj`` to ``out``."""
    cls = type(obj)
    if cls in _PRIMITIVES:
        try:
            out.append(repr(obj))
        except ValueError:
            # An int longer than sys.get_int_max_str_digits() (4300 by default) has no repr;
            # hex has no limit, and no int's repr starts with "0x" or "-0x".
            out.append(hex(obj))
        return
    if isinstance(obj, enum.Enum):
        out.append(f"E<{_qualname(cls)}>(")
        _encode(obj.value, out, seen)
        out.append(")")
        return
    if isinstance(obj, _REPR_TYPES):
        _encode_value(obj, cls, out, seen)
        return
    if isinstance(obj, int | float | str | bytes):
        # A subclass (class UserId(int)) keys on its value, read through the base type's repr:
        # its own __repr__ may not show the value. Attributes it was given join the key.
        base = next(b for b in (int, float, str, bytes) if isinstance(obj, b))
        value = _int_text(obj) if isinstance(obj, int) else base.__repr__(obj)
        out.append(f"P<{_qualname(cls)}>:{value}")
        _encode_extra(obj, cls, (), out, seen)
        return
    if isinstance(obj, type):
        out.append(f"C<{_class_name(obj, seen)}>")
        return
    if inspect.isroutine(obj):
        _encode_routine(obj, out, seen)
        return
    marker = id(obj)
    if marker in seen:
        raise CacheKeyError("it contains a reference cycle")
    seen.add(marker)
    try:
        _encode_composite(obj, cls, out, seen)
    finally:
        seen.discard(marker)


def _int_text(value: int) -> str:
    try:
        return int.__repr__(value)
    except ValueError:  # too many digits for repr(): see _encode
        return hex(value)


def _encode_value(obj: Any, cls: type, out: list[str], seen: set[int]) -> None:
    """The stdlib value types of _REPR_TYPES: their repr, except where it can hold an address."""
    if isinstance(obj, datetime.datetime | datetime.time) and obj.tzinfo is not None:
        # repr() shows the tzinfo's repr, which for most tzinfo classes is an address.
        tz = obj.tzinfo
        out.append(f"{_qualname(cls)}:{obj.replace(tzinfo=None)!r}@")
        if type(tz) is datetime.timezone:
            out.append(repr(tz))
        elif type(tz).__module__ == "zoneinfo" and isinstance(getattr(tz, "key", None), str):
            out.append(f"Z<{tz.key}>")  # type: ignore[attr-defined]
        else:
            _encode(tz, out, seen)  # by the rules for any object: class and attributes
        return
    if isinstance(obj, fractions.Fraction):
        out.append(f"{_qualname(cls)}:{_int_text(obj.numerator)}/{_int_text(obj.denominator)}")
        return
    try:
        out.append(f"{_qualname(cls)}:{obj!r}")
    except ValueError as exc:  # range(10**5000): an int too long for repr()
        raise CacheKeyError(f"its {cls.__name__} value cannot be written out ({exc})") from None


def _encode_routine(obj: Any, out: list[str], seen: set[int]) -> None:
    owner = getattr(obj, "__self__", None)
    if owner is not None and not isinstance(owner, types.ModuleType):
        # A bound method computes with its instance: Scaler(2).scale and Scaler(100).scale, or
        # d1.get and d2.get, must not share a key, so the instance joins it (by the usual rules).
        module = getattr(obj, "__module__", None) or type(owner).__module__
        out.append(f"M<{module}.{obj.__qualname__}>(")
        func = getattr(obj, "__func__", None)
        if isinstance(seen, _Fingerprinting) and isinstance(func, types.FunctionType):
            _encode_function(func, out, seen)
        _encode(owner, out, seen)
        out.append(")")
        return
    if isinstance(seen, _Fingerprinting) and isinstance(obj, types.FunctionType):
        _encode_function(obj, out, seen)
        return
    _refuse_local(obj)
    out.append(f"F<{_qualname(obj)}>")


def _refuse_local(obj: Any) -> None:
    name = getattr(obj, "__qualname__", "")
    if "<lambda>" in name or "<locals>" in name:
        raise CacheKeyError(f"{name} is a lambda or a local object with no stable name")


def _class_name(cls: type, seen: set[int]) -> str:
    """``module.qualname`` of a class; a class defined in a function has no stable name, so it
    is refused, except in a closure, where its source text tells it apart."""
    if "<locals>" not in cls.__qualname__ or not isinstance(seen, _Fingerprinting):
        _refuse_local(cls)
        return _qualname(cls)
    source = _source_text(cls)
    if source is None:
        return _qualname(cls)  # no source and no stable name: as good as it gets
    return f"{_qualname(cls)}#{blake2b(source.encode(), digest_size=8).hexdigest()}"


def _encode_composite(obj: Any, cls: type, out: list[str], seen: set[int]) -> None:
    if cls is tuple or cls is list or isinstance(obj, tuple | list):
        out.append(f"{'T' if isinstance(obj, tuple) else 'L'}<{_qualname(cls)}>[")
        for item in obj:
            _encode(item, out, seen)
            out.append(",")
        out.append("]")
        if cls is not tuple and cls is not list:
            _encode_extra(obj, cls, (), out, seen)
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
        if cls is not dict and isinstance(obj, dict):
            _encode_extra(obj, cls, (), out, seen)
    elif isinstance(obj, set | frozenset):
        items = []
        for item in obj:
            part: list[str] = []
            _encode(item, part, seen)
            items.append("".join(part))
        items.sort()
        out.append(f"S<{_qualname(cls)}>{{{','.join(items)}}}")
        if cls is not set and cls is not frozenset:
            _encode_extra(obj, cls, (), out, seen)
    elif callable(getattr(obj, "__opero_key__", None)):
        out.append(f"K<{_qualname(cls)}>(")
        _encode(obj.__opero_key__(), out, seen)
        out.append(")")
    elif dataclasses.is_dataclass(obj):
        out.append(f"O<{_qualname(cls)}>(")
        fields = [field.name for field in dataclasses.fields(obj)]
        for name in fields:
            out.append(f"{name}=")
            _encode(getattr(obj, name), out, seen)
            out.append(",")
        out.append(")")
        # Attributes that are not fields (set in __post_init__ from an InitVar, say) are state
        # like any other: they join the key.
        _encode_extra(obj, cls, fields, out, seen)
    else:
        _encode_instance(obj, cls, out, seen)


def _instance_state(obj: Any, cls: type) -> tuple[bool, dict[str, Any]]:
    """Whether ``obj`` has a ``__dict__`` or slots, and the attributes found in them."""
    attrs: dict[str, Any] = {}
    visible = False
    state = getattr(obj, "__dict__", None)
    if isinstance(state, dict):
        visible = True
        attrs.update(state)
    for klass in cls.__mro__:
        slots = vars(klass).get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if slot in ("__dict__", "__weakref__"):
                continue
            visible = True
            # A private slot (__x) is stored under its mangled name (_Class__x).
            name = slot
            if slot.startswith("__") and not slot.endswith("__"):
                name = f"_{klass.__name__.lstrip('_')}{slot}"
            if hasattr(obj, name):
                attrs[slot] = getattr(obj, name)
    return visible, attrs


def _encode_extra(obj: Any, cls: type, skip: Iterable[str], out: list[str], seen: set[int]) -> None:
    """Attributes of an instance beyond its value (a dict subclass given a ``currency``, a
    dataclass's non-field attributes), appended when there are any."""
    attrs = _instance_state(obj, cls)[1]
    for name in skip:
        attrs.pop(name, None)
    if attrs:
        out.append("+")
        _encode(attrs, out, seen)


# A base class whose __reduce__ pickles __dict__ and slots: it does not hide state elsewhere.
_GENERIC_REDUCE = frozenset({datetime.tzinfo})


def _encode_instance(obj: Any, cls: type, out: list[str], seen: set[int]) -> None:
    """Plain instances key on their class and attribute values (``__dict__`` and ``__slots__``).

    This is also the rule for ``self``: two instances of one class with equal attributes share
    entries. An instance of a Python class with no attributes at all keys on its class alone; an
    object whose state opero cannot see (no ``__dict__``, no slots: a C type; or a class that
    defines ``__reduce__``, whose state lives elsewhere) is refused.
    """
    if isinstance(obj, types.ModuleType) and isinstance(seen, _Fingerprinting):
        out.append(f"Mod<{obj.__name__}>")  # `import x` inside the enclosing function
        return
    attrs: dict[str, Any] = {}
    visible = False
    # A class that pickles itself (functools.partial, deque, exceptions, ...) keeps state
    # outside __dict__ and slots: keying on those alone would give different values one key.
    pickles_itself = any(
        "__reduce__" in vars(k) or "__reduce_ex__" in vars(k)
        for k in cls.__mro__[:-1]
        if k not in _GENERIC_REDUCE
    )
    if cls.__module__ != "builtins" and not pickles_itself:
        visible, attrs = _instance_state(obj, cls)
    if not visible:
        raise CacheKeyError(
            f"a {cls.__qualname__} object has no value opero can serialise "
            "(define __opero_key__() on its class or pass cache_key=)"
        )
    out.append(f"O<{_class_name(cls, seen)}>")
    _encode(attrs, out, seen)


def serialise_for_key(value: Any) -> str:
    """The deterministic text form of ``value`` used for cache keys."""
    out: list[str] = []
    _encode(value, out, set())
    return "".join(out)


# --- function fingerprints ----------------------------------------------------------------------


class _ClosureError(CacheKeyError):
    """A closure value that cannot be keyed; ``path`` is its variable name, then the names of
    the closure variables (functions) it was reached through, innermost first."""

    def __init__(self, path: list[str], reason: str) -> None:
        super().__init__(reason)
        self.path = path
        self.reason = reason


def function_fingerprint(func: Callable[..., Any], *, lenient: bool = False) -> str:
    """Sixteen hex digits that change when this version of ``func`` changes.

    The text hashed is ``func``'s source (dedented, without its decorator lines, so changing
    ``cache_ttl=`` keeps the entries) or, when Python cannot find the source (a REPL, ``exec``),
    its code object; plus the value of every variable it closes over, by the key rules, with
    functions among them fingerprinted in turn. A lambda whose source lines hold another lambda
    adds its code object, since both have that source text. Raises :class:`CacheKeyError`
    naming a closure variable that cannot be keyed, unless ``lenient`` (``cache_key=`` given),
    which leaves it out.
    """
    target = getattr(func, "__func__", func)  # a bound method: its function
    out: list[str] = []
    if isinstance(target, types.FunctionType):
        seen = _Fingerprinting()
        seen.lenient = lenient
        try:
            _encode_function(target, out, seen)
        except _ClosureError as exc:
            name = target.__qualname__
            variable, *outer = exc.path
            via = f" (used through {' -> '.join(map(repr, reversed(outer)))})" if outer else ""
            raise CacheKeyError(
                f"cannot cache {name}: the variable {variable!r}{via} it uses from an enclosing "
                f"function cannot be part of a cache key: {exc.reason}. Pass cache_key= "
                "(closure values that cannot be keyed are then left out of the key), or make "
                f"{name.rsplit('.', 1)[-1]} a module-level function that takes "
                f"{variable!r} as an argument"
            ) from None
    else:
        out.append(_source_text(target) or "")  # a builtin: nothing to read
    return blake2b("".join(out).encode(), digest_size=8).hexdigest()


def _encode_function(func: types.FunctionType, out: list[str], seen: set[int]) -> None:
    wrapped = getattr(func, "__wrapped__", None)
    if isinstance(wrapped, types.FunctionType) and hasattr(func, "opero_chain"):
        func = wrapped  # another @opero function: it computes what it wraps
    marker = id(func)
    if marker in seen:
        out.append(f"R<{_qualname(func)}>")  # a function that refers to itself
        return
    seen.add(marker)
    try:
        code = func.__code__
        out.append(f"fn<{_qualname(func)}>(")
        source = _source_text(code)
        # Lambdas on one line share their source text: then their code tells them apart.
        if source is None or (code.co_name == "<lambda>" and source.count("lambda") > 1):
            _code_text(code, out)
        if source is not None:
            out.append(source)
        for name, cell in zip(code.co_freevars, func.__closure__ or (), strict=True):
            _encode_cell(name, cell, out, seen)
        out.append(")")
    finally:
        seen.discard(marker)


def _encode_cell(name: str, cell: types.CellType, out: list[str], seen: set[int]) -> None:
    out.append(f"|{name}=")
    try:
        value = cell.cell_contents
    except ValueError:  # not assigned yet, as a function decorated in its own def sees itself
        out.append("<unset>")
        return
    part: list[str] = []
    try:
        _encode(value, part, seen)
    except _ClosureError as exc:
        if getattr(seen, "lenient", False):
            out.append("<not keyed>")
            return
        raise _ClosureError([*exc.path, name], exc.reason) from None
    except (CacheKeyError, RecursionError) as exc:
        if getattr(seen, "lenient", False):
            out.append("<not keyed>")
            return
        reason = "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise _ClosureError([name], reason) from None
    out.extend(part)


def _source_text(obj: Any) -> str | None:
    try:
        source = inspect.getsource(obj)
    except Exception:  # no file, a stale line cache, an unparsable block: no source
        return None
    text = textwrap.dedent(source)
    if text.startswith("@"):
        # Decorator lines hold options (cache_ttl=, retries=): changing them keeps the entries.
        try:
            node = ast.parse(text).body[0]
        except (SyntaxError, IndexError):
            return text
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            text = "".join(text.splitlines(keepends=True)[node.lineno - 1 :])
    return text


def _code_text(code: types.CodeType, out: list[str]) -> None:
    # Without source, the bytecode: it differs between Python versions, so entries do too.
    out.append(f"co<{code.co_code.hex()}|{','.join(code.co_names)}|")
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _code_text(const, out)
        else:
            try:
                _encode(const, out, set())
            except CacheKeyError:
                out.append(repr(const))  # Ellipsis
        out.append(",")
    out.append(">")


def namespace_prefix(namespace: str) -> str:
    """The start of every key in ``namespace``: the namespace with ``%`` and ``:`` escaped, then
    ``":"``. Escaping keeps namespaces apart: clearing ``"api"`` never touches ``"api:v2"``."""
    return namespace.replace("%", "%25").replace(":", "%3A") + ":"


class KeyBuilder:
    """Builds the cache key of one call of one function.

    A key is ``prefix + fingerprint + ":" + digest``. ``prefix`` is
    ``"{namespace}:{module}.{qualname}:"``, shared by every version of the function (so clearing
    by it removes them all); ``fingerprint`` (:func:`function_fingerprint`, computed here, once)
    tells apart functions that share a name (lambdas, closures from one factory, two scripts'
    ``__main__.compute``) and versions of one function (an edited body). With
    ``fingerprint=False`` (for a store only this function uses) the key is ``prefix + digest``.

    Arguments are bound to the signature with defaults applied, so ``f(1)``, ``f(1, 2)`` and
    ``f(a=1, b=2)`` share a key when ``b`` defaults to 2. When the call is already canonical (all
    parameters passed positionally, nothing else) binding is skipped. ``cache_key=`` is called
    with the bound arguments, defaults applied, and its result is keyed instead.

    The text that is hashed is ``repr()`` of the tuple of values when every value is a primitive
    (``int``, ``float``, ``str``, ``bytes``, ``bool``, ``None``: their repr is deterministic and
    tells the types apart), else the type-tagged form of :func:`serialise_for_key` of each value,
    joined by ``\x1f``. The two forms cannot collide: only the first starts with ``(``.
    """

    __slots__ = (
        "_base",
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
        "fingerprint",
        "prefix",
    )

    def __init__(
        self,
        func: Callable[..., Any],
        namespace: str,
        key_fn: Callable[..., object] | None,
        *,
        fingerprint: bool = True,
    ) -> None:
        qualname = getattr(func, "__qualname__", None)
        if not isinstance(qualname, str):
            # A functools.partial or a callable object: no stable name to key on, and the
            # partial's bound arguments would not be part of the key.
            raise TypeError(
                f"cache=True needs a function with a __qualname__, got {func!r}: decorate a "
                "function (def) that makes this call instead"
            )
        self.prefix = f"{namespace_prefix(namespace)}{func.__module__}.{qualname}:"
        # A store of this function's own (the memory cache) needs no fingerprint: no other
        # function and no other version of this one can reach its entries.
        self.fingerprint: str | None = None
        self._base = self.prefix
        if fingerprint:
            self.fingerprint = function_fingerprint(func, lenient=key_fn is not None)
            self._base = f"{self.prefix}{self.fingerprint}:"
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
            return self._hash(self._chosen_text(args, kwargs))
        if kwargs or not self._n_required <= len(args) <= self._n_params:
            args = self._bind(args, kwargs)
        elif len(args) < self._n_params:
            args = args + self._tail[len(args) - self._n_required :]
        # args now holds every parameter's value, in signature order
        if _PRIMITIVES.issuperset(map(type, args)):
            try:
                text = repr(args)
            except ValueError:  # an int too long for repr(): the tagged form writes it in hex
                pass
            else:
                key = self._memo.get(text)
                return self._hash(text) if key is None else key
        return self._hash(
            "\x1f".join([_argument_text(n, v) for n, v in zip(self._names, args, strict=True)])
        )

    def _text(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The text of the arguments that ``__call__`` hashes, without its shortcuts."""
        if self._key_fn is not None:
            return self._chosen_text(args, kwargs)
        values = self._bind(args, kwargs)
        if _PRIMITIVES.issuperset(map(type, values)):
            try:
                return repr(values)
            except ValueError:
                pass
        return "\x1f".join([_argument_text(n, v) for n, v in zip(self._names, values, strict=True)])

    def _chosen_text(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The text of what ``cache_key=`` returns, called with the bound arguments."""
        assert self._key_fn is not None
        if not kwargs and self._n_required <= len(args) <= self._n_params:
            chosen = self._key_fn(*args, *self._tail[len(args) - self._n_required :])
        elif self._pairs is not None:
            chosen = self._key_fn(*self._bind(args, kwargs))
        else:
            bound = self._signature.bind(*args, **kwargs)
            bound.apply_defaults()
            chosen = self._key_fn(*bound.args, **bound.kwargs)
        return _argument_text("cache_key", chosen)

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
        key = self._base + blake2b(text.encode(), digest_size=20).hexdigest()
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
