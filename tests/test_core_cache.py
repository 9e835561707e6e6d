"""opero.core.cache: the key text and its memo (the rest is in test_cache_keys and the contract)."""

from __future__ import annotations

from hashlib import blake2b

import pytest

from opero.core.cache import KeyBuilder, serialise_for_key


def sample(a: object, b: object = 2, *rest: object, **extra: object) -> None:
    """A function with every kind of parameter."""


def simple(a: object, b: object = 2) -> None:
    """Only positional-or-keyword parameters: canonical calls take the fast path."""


def test_primitive_calls_hash_the_repr_of_their_values() -> None:
    keys = KeyBuilder(simple, "ns", None)
    expected = keys.prefix + blake2b(repr((1, "x")).encode(), digest_size=20).hexdigest()
    assert keys.prefix == f"ns:{__name__}.simple:"
    assert keys((1, "x"), {}) == expected  # fast path
    assert keys((1,), {"b": "x"}) == expected  # bound path
    assert keys((), {"a": 1, "b": "x"}) == expected


def test_other_calls_hash_the_tagged_text_of_each_value() -> None:
    keys = KeyBuilder(sample, "ns", None)
    text = "\x1f".join(serialise_for_key(v) for v in (1, 2, (3,), {"k": 4}))
    assert keys((1, 2, 3), {"k": 4}) == (
        keys.prefix + blake2b(text.encode(), digest_size=20).hexdigest()
    )


def test_the_memo_never_changes_a_key() -> None:
    warm = KeyBuilder(simple, "ns", None)
    calls = [((i, f"v{i}"), {}) for i in range(1000)] + [((i,), {"b": 2}) for i in range(300)]
    first = [warm(a, k) for a, k in calls]
    again = [warm(a, k) for a, k in calls]  # mostly from the memo, which was cleared on the way
    fresh = [KeyBuilder(simple, "ns", None)(a, k) for a, k in calls]
    assert first == again == fresh
    assert len(set(first)) == 1300
    assert len(warm._memo) <= 256


def test_long_texts_are_not_memoised() -> None:
    keys = KeyBuilder(simple, "ns", None)
    keys(("x" * 10_000, 1), {})
    assert keys._memo == {}


def test_every_way_to_pass_the_same_arguments_gives_one_key() -> None:
    keys = KeyBuilder(simple, "ns", None)
    same = {keys((1,), {}), keys((1, 2), {}), keys((1,), {"b": 2}), keys((), {"b": 2, "a": 1})}
    assert len(same) == 1
    other = KeyBuilder(sample, "ns", None)
    assert other((1,), {}) == other((1, 2), {}) != other((1, 2, 3), {})


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {}, "missing a required argument: 'a'"),
        ((1,), {"c": 2}, "unexpected keyword argument 'c'"),
        ((1,), {"a": 2}, "multiple values for argument 'a'"),
        ((1, 2, 3), {}, "too many positional arguments"),
    ],
)
def test_binding_errors_are_the_usual_type_errors(
    args: tuple[object, ...], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        KeyBuilder(simple, "ns", None)(args, kwargs)
