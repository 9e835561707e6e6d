"""How results become bytes for stores outside the process: pickle (default) or JSON."""

from __future__ import annotations

import json
import pickle

__all__ = ["SERIALIZERS", "JsonSerializer", "PickleSerializer", "get_serializer"]


class PickleSerializer:
    """Any picklable result. Reading a pickle runs code chosen by whoever wrote it: use it only
    with a store that no one else can write to (see docs/caching.md)."""

    name = "pickle"

    def dumps(self, value: object) -> bytes:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    def loads(self, data: bytes) -> object:
        return pickle.loads(data)


class JsonSerializer:
    """Plain JSON values only (dict with str keys, list, str, int, float, bool, None).

    A result that would come back different (a tuple as a list, an int key as a str, a set) is
    not cached, so a hit always returns what the call returned. Reading JSON runs no code, so this
    is the serializer for a store that others can write to.
    """

    name = "json"

    def dumps(self, value: object) -> bytes:
        if not _plain(value):
            raise TypeError(
                f"a {type(value).__name__} result would not survive a JSON round trip unchanged"
            )
        return json.dumps(
            value, ensure_ascii=False, separators=(",", ":"), allow_nan=False
        ).encode()

    def loads(self, data: bytes) -> object:
        return json.loads(data)


def _plain(value: object) -> bool:
    """True when every container in ``value`` is exactly a dict or a list (no tuples, no
    subclasses), which equality alone cannot tell apart."""
    cls = type(value)
    if cls is dict:
        return all(type(k) is str and _plain(v) for k, v in value.items())  # type: ignore[attr-defined]
    if cls is list:
        return all(_plain(v) for v in value)  # type: ignore[attr-defined]
    return cls in (str, int, float, bool, type(None))


SERIALIZERS: dict[str, type[PickleSerializer | JsonSerializer]] = {
    "pickle": PickleSerializer,
    "json": JsonSerializer,
}


def get_serializer(name: str) -> PickleSerializer | JsonSerializer:
    """The serializer called ``name`` (``ValueError`` naming the option for anything else)."""
    try:
        return SERIALIZERS[name]()
    except (KeyError, TypeError):
        raise ValueError(
            f"cache_serializer must be one of {', '.join(map(repr, SERIALIZERS))}, got {name!r}"
        ) from None
