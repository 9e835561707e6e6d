"""Outcomes that cross a process boundary: exceptions as themselves, with the worker's traceback.

Used by every backend whose workers are other processes, each with its own pickler (cloudpickle,
dill, Ray's). No pickler is imported here, so that each extra needs only its own.
"""

from __future__ import annotations

import functools
import pickle
import traceback
from collections.abc import Callable
from typing import Any

from opero.errors import RemoteError


def portable_exception(
    exc: BaseException,
    dumps: Callable[[object], bytes],
    loads: Callable[[bytes], object] = pickle.loads,
) -> BaseException:
    """``exc``, made to cross a process boundary (with ``dumps``) as itself where it can.

    The worker's traceback goes with it as a note (shown under the exception in the caller, as
    ``ProcessPoolExecutor`` does with its remote traceback). An exception whose constructor
    cannot take back its ``args`` (``def __init__(self, status, message)``, a common pattern)
    is re-created in the caller without calling it, so ``retry_on`` and ``except`` still see its
    type. Only one that cannot cross even so arrives as a RemoteError naming its type and
    message.
    """
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if hasattr(exc, "add_note"):  # Python 3.11+
        exc.add_note(f"Traceback in the worker process:\n{tb.rstrip()}")
    if _survives(exc, dumps, loads):
        return exc
    state = _attributes(exc)
    # pickle asks the object itself for __reduce_ex__, so this instance alone pickles this way
    exc.__reduce_ex__ = functools.partial(_reduce_without_init, type(exc), exc.args, state)  # type: ignore[method-assign]
    if _survives(exc, dumps, loads):
        return exc
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        message = str(exc)
    except Exception:
        message = "<str() failed>"
    return RemoteError(name, message, tb)


def _attributes(exc: BaseException) -> dict[str, Any]:
    """What ``__init__`` would have set: the instance's attributes, its slots, and for OSError
    the fields its own constructor fills in (a subclass's ``__init__`` is not called again)."""
    state = dict(vars(exc))
    for klass in type(exc).__mro__:
        slots = klass.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and hasattr(exc, name):
                state[name] = getattr(exc, name)
    if isinstance(exc, OSError):
        for name in ("errno", "strerror", "filename", "filename2"):
            if getattr(exc, name) is not None:  # a None filename2 would still show in str()
                state[name] = getattr(exc, name)
    return state


def _survives(
    exc: BaseException, dumps: Callable[[object], bytes], loads: Callable[[bytes], object]
) -> bool:
    try:
        loads(dumps(exc))
    except Exception:
        return False
    return True


def _reduce_without_init(
    cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any], protocol: object
) -> tuple[Any, ...]:
    return (_rebuild_exception, (cls, args, state))


def _rebuild_exception(
    cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]
) -> BaseException:
    exc = cls.__new__(cls, *args)
    exc.args = args
    for name, value in state.items():
        setattr(exc, name, value)
    return exc


def pickle_outcome(
    ok: bool,
    value: object,
    dumps: Callable[[object], bytes],
    loads: Callable[[bytes], object] = pickle.loads,
) -> bytes:
    """``(ok, value)`` pickled with ``dumps`` for the caller: an exception made portable, a
    result that cannot be pickled replaced by a RemoteError that says so."""
    if not ok:
        assert isinstance(value, BaseException)
        return dumps((False, portable_exception(value, dumps, loads)))
    try:
        return dumps((True, value))
    except Exception as exc:
        error = RemoteError(type(exc).__qualname__, f"the result could not be pickled: {exc}")
        return dumps((False, error))
