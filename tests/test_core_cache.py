"""opero.core.cache: the key text and its memo (the rest is in test_cache_keys and the contract)."""

from __future__ import annotations

import threading
from hashlib import blake2b

import pytest

from opero.core.cache import KeyBuilder, serialise_for_key
from opero.errors import CacheKeyError


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


class Account:
    def __init__(self, owner: str) -> None:
        self.owner = owner

    def balance(self, currency: str) -> str:
        return f"{self.owner}:{currency}"

    @classmethod
    def kind(cls, x: int) -> int:
        return x


def test_bound_methods_key_on_their_instance() -> None:
    alice, bob = Account("alice"), Account("bob")
    a_keys, b_keys = KeyBuilder(alice.balance, "ns", None), KeyBuilder(bob.balance, "ns", None)
    assert a_keys.prefix == b_keys.prefix == f"ns:{__name__}.Account.balance:"
    assert a_keys(("EUR",), {}) != b_keys(("EUR",), {})
    assert a_keys(("EUR",), {}) == KeyBuilder(Account("alice").balance, "ns", None)(("EUR",), {})
    before = a_keys(("EUR",), {})
    alice.owner = "carol"  # read per call: the key follows the instance's state
    assert a_keys(("EUR",), {}) != before


def test_bound_method_on_an_unkeyable_instance_names_self() -> None:
    account = Account("x")
    account.lock = threading.Lock()  # type: ignore[attr-defined]
    with pytest.raises(CacheKeyError, match="'self'"):
        KeyBuilder(account.balance, "ns", None)(("EUR",), {})


def test_classmethods_and_builtin_methods_key_on_their_owner() -> None:
    assert KeyBuilder(Account.kind, "ns", None)((1,), {}) == KeyBuilder(Account.kind, "ns", None)(
        (1,), {}
    )
    assert KeyBuilder([1].count, "ns", None)((1,), {}) != KeyBuilder([2].count, "ns", None)(
        (1,), {}
    )
    assert KeyBuilder(len, "ns", None)(([1],), {}) == KeyBuilder(len, "ns", None)(([1],), {})
