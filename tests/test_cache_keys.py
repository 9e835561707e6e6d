"""Cache keys: bound to the signature, deterministic, value-based, distinct per type."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import fractions
import functools
import os
import subprocess
import sys
import textwrap
import threading
import zoneinfo

import pytest

from opero.core.cache import KeyBuilder, serialise_for_key
from opero.errors import CacheKeyError, OperoError


def f(a: object, b: object = 2, *rest: object, c: object = None, **extra: object) -> None:
    pass


def g(a: object, b: object = 2) -> None:
    pass


def key(func: object = g, *args: object, **kwargs: object) -> str:
    return KeyBuilder(func, "opero", None)(args, kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("func", [f, g])
def test_defaults_are_applied_so_equivalent_calls_share_a_key(func):
    k = key(func, 1)
    assert key(func, 1, 2) == k
    assert key(func, a=1, b=2) == k
    assert key(func, 1, b=2) == k
    assert key(func, b=2, a=1) == k
    assert key(func, 1, 3) != k


def test_equivalent_calls_share_a_key_for_non_primitive_arguments():
    k = key(g, [1, {"x": 2}])
    assert key(g, [1, {"x": 2}], 2) == k
    assert key(g, a=[1, {"x": 2}], b=2) == k


def test_key_has_namespace_module_and_qualname_prefix():
    k = KeyBuilder(g, "myns", None)((1,), {})
    assert k.startswith(f"myns:{__name__}.g:")
    assert k != KeyBuilder(g, "other", None)((1,), {})


def test_different_functions_never_share_keys():
    assert key(f, 1) != key(g, 1)


@pytest.mark.parametrize(
    "value",
    [
        {"x": 1, "y": [1, 2, {3, 4}]},
        [1, [2, [3, {"a": (4, 5)}]]],
        {1, 2, 3},
        frozenset({"a", "b"}),
        {"nested": {"deeper": {"deepest": [set()]}}},
    ],
    ids=["dict", "nested-list", "set", "frozenset", "deep"],
)
def test_unhashable_arguments_key_by_value(value):
    import copy

    assert key(g, value) == key(g, copy.deepcopy(value))


def test_dict_and_set_order_do_not_matter():
    assert key(g, {"a": 1, "b": 2}) == key(g, {"b": 2, "a": 1})
    assert key(g, {"k": {"a": 1, "b": 2}}) == key(g, {"k": {"b": 2, "a": 1}})
    names = [f"name-{i}" for i in range(60)]
    forward, backward = set(), set()
    for name in names:
        forward.add(name)
    for name in reversed(names):
        backward.add(name)
    assert key(g, forward) == key(g, backward)


def test_equal_but_different_types_are_different_keys():
    values = [1, 1.0, True, "1", b"1", (1,), [1], {1}, frozenset({1}), None, 0, False, "", 0.0]
    keys = {key(g, v) for v in values}
    assert len(keys) == len(values)


def test_nested_equal_but_different_types_are_different_keys():
    assert key(g, [1]) != key(g, [1.0])
    assert key(g, {"a": 1}) != key(g, {"a": True})
    assert key(g, {1: "x"}) != key(g, {"1": "x"})


def test_argument_boundaries_are_unambiguous():
    assert key(g, "a,b", "c") != key(g, "a", "b,c")
    assert key(g, "a\x1fb", "c") != key(g, "a", "b\x1fc")
    assert key(g, ["a", "b"], 2) != key(g, ["a"], ["b", 2])


def test_varargs_and_kwargs_are_part_of_the_key():
    assert key(f, 1, 2, 3) != key(f, 1, 2, 4)
    assert key(f, 1, z=1) != key(f, 1, z=2)
    assert key(f, 1, y=1, z=2) == key(f, 1, z=2, y=1)
    assert key(f, 1, c=5) != key(f, 1)


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Plain:
    def __init__(self, value: object) -> None:
        self.value = value


class Slotted:
    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value


@pytest.mark.parametrize("cls", [Point, Plain, Slotted])
def test_objects_key_on_their_values(cls):
    make = (lambda v: cls(v, 0)) if cls is Point else cls
    assert key(g, make(1)) == key(g, make(1))
    assert key(g, make(1)) != key(g, make(2))


def test_objects_of_different_classes_with_equal_values_differ():
    assert key(g, Plain(1)) != key(g, Slotted(1))


def test_opero_key_hook_is_used():
    class Keyed:
        def __init__(self, ident: int, noise: object) -> None:
            self.ident, self.noise = ident, noise

        def __opero_key__(self) -> object:
            return self.ident

    Keyed.__qualname__ = "Keyed"  # a module-level name, as a real class would have
    assert key(g, Keyed(1, object())) == key(g, Keyed(1, object()))
    assert key(g, Keyed(1, None)) != key(g, Keyed(2, None))


def test_cache_key_callable_chooses_the_key():
    builder = KeyBuilder(g, "opero", lambda a, b=2: a["id"])
    assert builder(({"id": 1, "noise": 1},), {}) == builder(({"id": 1, "noise": 2},), {})
    assert builder(({"id": 1},), {}) != builder(({"id": 2},), {})


@pytest.mark.parametrize(
    "value",
    [object(), lambda: 1, iter([1])],
    ids=["object", "lambda", "iterator"],
)
def test_values_without_a_stable_form_raise_cache_key_error(value):
    with pytest.raises(CacheKeyError, match="'a'") as info:
        key(g, value)
    assert isinstance(info.value, OperoError)
    assert isinstance(info.value, TypeError)


def test_reference_cycle_raises_cache_key_error():
    cyclic: list[object] = []
    cyclic.append(cyclic)
    with pytest.raises(CacheKeyError, match="cycle"):
        key(g, cyclic)


def test_shared_non_cyclic_references_are_fine():
    shared = [1, 2]
    assert key(g, [shared, shared]) == key(g, [[1, 2], [1, 2]])


def test_keys_are_the_same_in_another_process():
    # No hash(), id() or addresses: another interpreter (another hash seed) builds the same key.
    values = "[{'a': 1, 'b': {1, 2, 'x'}}, (1.5, None, True), frozenset({'q', 'r'})]"
    code = textwrap.dedent(
        f"""
        from opero.core.cache import KeyBuilder
        def g(a, b=2): pass
        g.__module__ = "m"
        print(KeyBuilder(g, "opero", None)(({values},), {{}}))
        """
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1
    assert next(iter(outputs)).startswith("opero:m.g:")


class Name(str):
    __slots__ = ()


class UserId(int):
    def __repr__(self) -> str:
        return "UserId(...)"  # a repr that hides the value


class Ratio(float):
    pass


class Blob(bytes):
    pass


@pytest.mark.parametrize(
    ("cls", "a", "b"), [(Name, "a", "b"), (UserId, 1, 2), (Ratio, 0.5, 0.25), (Blob, b"x", b"y")]
)
def test_subclasses_of_primitive_types_key_on_their_value(cls, a, b):
    assert key(g, cls(a)) == key(g, cls(a))
    assert key(g, cls(a)) != key(g, cls(b))
    assert key(g, cls(a)) != key(g, a)  # like 1 and True, another type is another key
    assert key(g, [cls(a)]) != key(g, [cls(b)])


def _h(x: object) -> None:
    pass


class Queue(collections.deque):  # type: ignore[type-arg]
    pass


@pytest.mark.parametrize(
    "value",
    [functools.partial(_h, 1), Queue([1]), ValueError("a")],
    ids=["partial", "deque-subclass", "exception"],
)
def test_objects_with_state_outside_dict_and_slots_are_refused(value):
    # Their __dict__ is empty whatever they hold: keying on it would make partial(h, 1) and
    # partial(h, 2) one key. Refusing points the user to cache_key= or __opero_key__().
    with pytest.raises(CacheKeyError, match="cache_key="):
        key(g, value)


# --- bound methods, subclasses with attributes, cache_key=, big ints, time zones -----------------


class Scaler:
    def __init__(self, k: int) -> None:
        self.k = k

    def scale(self, x: int) -> int:
        return x * self.k

    @classmethod
    def unit(cls, x: int) -> int:
        return x


def test_bound_methods_as_arguments_key_on_their_instance() -> None:
    assert key(g, Scaler(2).scale) != key(g, Scaler(100).scale)
    assert key(g, Scaler(2).scale) == key(g, Scaler(2).scale)
    assert key(g, {"a": 1}.get) != key(g, {"a": 2}.get)
    assert key(g, [1].count) != key(g, [2].count)
    assert key(g, Scaler.unit) == key(g, Scaler.unit)
    assert key(g, _h) == key(g, _h)  # a plain function: by its name, as before
    assert key(g, len) != key(g, _h)


def test_a_bound_method_of_an_unkeyable_instance_names_the_parameter() -> None:
    scaler = Scaler(2)
    scaler.lock = threading.Lock()  # type: ignore[attr-defined]
    with pytest.raises(CacheKeyError, match="'a'"):
        key(g, scaler.scale)


class Money(dict):  # type: ignore[type-arg]
    pass


class Tags(list):  # type: ignore[type-arg]
    pass


class Flags(frozenset):  # type: ignore[type-arg]
    pass


class Label(str):
    pass


@pytest.mark.parametrize(
    ("cls", "value"), [(Money, {"a": 1}), (Tags, [1]), (Flags, {1}), (Label, "x")]
)
def test_subclasses_of_builtin_types_key_on_their_attributes_too(cls: type, value: object) -> None:
    eur, usd, plain = cls(value), cls(value), cls(value)
    eur.currency = "EUR"
    usd.currency = "USD"
    assert key(g, eur) != key(g, usd)
    assert key(g, eur) != key(g, plain)
    assert key(g, plain) == key(g, cls(value))
    twin = cls(value)
    twin.currency = "EUR"
    assert key(g, eur) == key(g, twin)


@dataclasses.dataclass
class Scaled:
    x: int
    factor: dataclasses.InitVar[int] = 1

    def __post_init__(self, factor: int) -> None:
        self.y = self.x * factor


def test_a_dataclass_keys_on_its_non_field_attributes_too() -> None:
    assert key(g, Scaled(3, 1)) != key(g, Scaled(3, 10))
    assert key(g, Scaled(3, 10)) == key(g, Scaled(3, 10))
    assert key(g, Point(1, 2)) == key(g, Point(1, 2))


def with_defaults(q: object, key: object = "k", *rest: object, flag: bool = False) -> None:
    pass


def test_cache_key_receives_the_bound_arguments_with_defaults_applied() -> None:
    seen: list[object] = []

    def chosen(q: object, key: object, *rest: object, flag: bool) -> object:
        seen.append((q, key, rest, flag))
        return q

    builder = KeyBuilder(with_defaults, "ns", chosen)
    assert builder(("a",), {}) == builder(("a", "other"), {"flag": True})
    builder((), {"q": "a"})
    builder(("a", "k", 1, 2), {})
    assert seen == [
        ("a", "k", (), False),
        ("a", "other", (), True),
        ("a", "k", (), False),
        ("a", "k", (1, 2), False),
    ]
    simple = KeyBuilder(g, "ns", lambda a, b: (a, b))  # plain parameters: the fast paths
    assert simple((1,), {}) == simple((1, 2), {}) == simple((), {"a": 1}) != simple((1, 3), {})


def test_integers_of_any_length_are_keyed() -> None:
    big = 10**5000  # repr() refuses ints over 4300 digits
    assert key(g, big) == key(g, 10**5000) != key(g, big + 1)
    assert key(g, [big]) != key(g, [big + 1])
    assert key(g, UserId(big)) != key(g, UserId(big + 1))
    assert key(g, fractions.Fraction(big, 3)) != key(g, fractions.Fraction(big + 1, 3))
    with pytest.raises(CacheKeyError, match="'a'"):
        key(g, range(big))


class Offset(datetime.tzinfo):
    def __init__(self, hours: int) -> None:
        self.hours = hours

    def utcoffset(self, dt: datetime.datetime | None) -> datetime.timedelta:
        return datetime.timedelta(hours=self.hours)


class Opaque(datetime.tzinfo):
    def __reduce__(self) -> str:
        return "Opaque"  # state opero cannot see

    def utcoffset(self, dt: datetime.datetime | None) -> datetime.timedelta:
        return datetime.timedelta(0)


def test_aware_datetimes_key_on_their_time_zone_never_an_address() -> None:
    def at(tz: datetime.tzinfo) -> datetime.datetime:
        return datetime.datetime(2024, 1, 15, 12, tzinfo=tz)

    assert key(g, at(Offset(1))) == key(g, at(Offset(1))) != key(g, at(Offset(2)))
    assert "0x" not in serialise_for_key(at(Offset(1)))
    assert key(g, datetime.time(1, tzinfo=Offset(1))) == key(g, datetime.time(1, tzinfo=Offset(1)))
    paris, lagos = zoneinfo.ZoneInfo("Europe/Paris"), zoneinfo.ZoneInfo("Africa/Lagos")
    assert at(paris).utcoffset() == at(lagos).utcoffset()
    assert key(g, at(paris)) != key(g, at(lagos))
    assert key(g, at(paris)) == key(g, at(zoneinfo.ZoneInfo("Europe/Paris")))
    utc = datetime.timezone.utc
    assert key(g, at(utc)) != key(g, at(datetime.timezone(datetime.timedelta(0), "Z")))
    assert key(g, at(utc)) != key(g, at(utc).replace(tzinfo=None))
    with pytest.raises(CacheKeyError, match="Opaque"):
        key(g, at(Opaque()))
