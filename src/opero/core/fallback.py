"""Fallback policy: the candidate values of one parameter, found through the signature."""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import Any

_NO_DEFAULT = inspect.Parameter.empty
_SCALARS = (str, bytes, bytearray, memoryview)


class Fallback:
    """Where the ``arg_fallback`` parameter lives in a call, and the argument lists to try.

    Candidate ``i`` passes ``values[i:]`` (same sequence type), so a body written as ``key[0]``
    sees the current candidate and what is left. The caller's sequence and the default are never
    mutated. A ``str``/``bytes`` or a non-sequence is a single candidate passed as is.
    """

    __slots__ = ("default", "name", "position")

    def __init__(self, func: object, name: object) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"arg_fallback must be a parameter name (str), got {name!r}")
        try:
            params = inspect.signature(func).parameters  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"arg_fallback={name!r}: cannot read the signature of {func!r}"
            ) from exc
        param = params.get(name)
        if param is None:
            raise ValueError(
                f"arg_fallback={name!r} names no parameter of "
                f"{getattr(func, '__qualname__', func)!r} (parameters: {', '.join(params)})"
            )
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ValueError(f"arg_fallback={name!r} must name a regular parameter, not *{name}")
        self.name = name
        self.default: object = param.default
        positional = (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD)
        self.position: int | None = list(params).index(name) if param.kind in positional else None

    def values(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Sequence[object] | None:
        """The candidate sequence of this call, or None when there is nothing to fall back over."""
        if self.name in kwargs:
            value = kwargs[self.name]
        elif self.position is not None and self.position < len(args):
            value = args[self.position]
        elif self.default is not _NO_DEFAULT:
            value = self.default
        else:
            return None  # missing argument: let the call itself raise its TypeError
        if isinstance(value, _SCALARS) or not isinstance(value, Sequence):
            return None
        if len(value) == 0:
            raise ValueError(f"arg_fallback parameter {self.name!r} got an empty sequence")
        return value

    def candidates(
        self, values: Sequence[object], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
        """Arguments for candidate 0, 1, ...: the parameter replaced by ``values[i:]``."""
        in_args = (
            self.name not in kwargs and self.position is not None and self.position < len(args)
        )
        for i in range(len(values)):
            rest = values[i:]
            if in_args:
                assert self.position is not None
                yield (*args[: self.position], rest, *args[self.position + 1 :]), kwargs
            else:
                yield args, {**kwargs, self.name: rest}
