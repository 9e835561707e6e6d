"""opero.core.cache: the key text and its memo (the rest is in test_cache_keys and the contract)."""

from __future__ import annotations

import importlib.util
import textwrap
import threading
from collections.abc import Callable
from hashlib import blake2b
from pathlib import Path
from typing import Any

import pytest

from opero.core.cache import KeyBuilder, function_fingerprint, serialise_for_key
from opero.errors import CacheKeyError


def sample(a: object, b: object = 2, *rest: object, **extra: object) -> None:
    """A function with every kind of parameter."""


def simple(a: object, b: object = 2) -> None:
    """Only positional-or-keyword parameters: canonical calls take the fast path."""


def test_primitive_calls_hash_the_repr_of_their_values() -> None:
    keys = KeyBuilder(simple, "ns", None)
    digest = blake2b(repr((1, "x")).encode(), digest_size=20).hexdigest()
    expected = f"{keys.prefix}{keys.fingerprint}:{digest}"
    assert keys.prefix == f"ns:{__name__}.simple:"
    assert len(keys.fingerprint) == 16
    assert keys((1, "x"), {}) == expected  # fast path
    assert keys((1,), {"b": "x"}) == expected  # bound path
    assert keys((), {"a": 1, "b": "x"}) == expected


def test_other_calls_hash_the_tagged_text_of_each_value() -> None:
    keys = KeyBuilder(sample, "ns", None)
    text = "\x1f".join(serialise_for_key(v) for v in (1, 2, (3,), {"k": 4}))
    assert keys((1, 2, 3), {"k": 4}) == (
        f"{keys.prefix}{keys.fingerprint}:{blake2b(text.encode(), digest_size=20).hexdigest()}"
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


# --- function fingerprints: functions that share a name, and versions of one function ---------


def key_of(func: object, *args: object, **kwargs: object) -> str:
    return KeyBuilder(func, "ns", None)(args, kwargs)  # type: ignore[arg-type]


def test_lambdas_sharing_a_name_get_their_own_keys() -> None:
    inc, scale = (lambda x: x + 1), (lambda x: x * 100)  # one line: the same source text
    assert KeyBuilder(inc, "ns", None).prefix == KeyBuilder(scale, "ns", None).prefix
    assert key_of(inc, 5) != key_of(scale, 5)
    assert key_of(inc, 5) == key_of(inc, 5)


def make_adder(n: object) -> Callable[[int], object]:
    def add(x: int) -> object:
        return (x, n)

    return add


def test_closures_from_one_factory_key_on_the_values_they_close_over() -> None:
    assert key_of(make_adder(1), 5) != key_of(make_adder(1000), 5)
    assert key_of(make_adder(1), 5) == key_of(make_adder(1), 5)
    assert key_of(make_adder({"a": 1, "b": 2}), 5) == key_of(make_adder({"b": 2, "a": 1}), 5)


def load(tmp_path: Path, name: str, source: str) -> Any:
    """The function ``f`` of module ``versioned``, loaded from file ``name`` holding ``source``."""
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location("versioned", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.f


VERSION = """
    def option(**kwargs):
        return lambda func: func

    @option(ttl={ttl})
    def f(x):
        return x + {body}
"""


def test_editing_the_source_changes_the_fingerprint_but_decorator_options_do_not(
    tmp_path: Path,
) -> None:
    first = load(tmp_path, "v1", VERSION.format(ttl=1, body=1))
    edited = load(tmp_path, "v2", VERSION.format(ttl=1, body=2))
    new_options = load(tmp_path, "v3", VERSION.format(ttl=60, body=1))
    assert function_fingerprint(first) != function_fingerprint(edited)
    assert function_fingerprint(first) == function_fingerprint(new_options)


def generated(source: str) -> Any:
    """A function ``f`` whose source Python cannot find, as in a REPL."""
    namespace: dict[str, Any] = {}
    exec(compile(textwrap.dedent(source), "<generated>", "exec"), namespace)
    return namespace["f"]


def test_without_source_the_code_object_is_fingerprinted() -> None:
    one = "def f(x):\n    return [x + 1, {'k': (1, 2)}, ...]\n"
    assert function_fingerprint(generated(one)) == function_fingerprint(generated(one))
    assert function_fingerprint(generated(one)) != function_fingerprint(
        generated(one.replace("1", "2"))
    )
    assert function_fingerprint(generated(one)) != function_fingerprint(
        generated(one.replace("x + 1", "len(x)"))
    )


def make_wrapped(inner: Callable[[int], int]) -> Callable[[int], int]:
    def outer(x: int) -> int:
        return inner(x)

    return outer


def test_functions_in_a_closure_are_fingerprinted_in_turn() -> None:
    assert key_of(make_wrapped(make_adder(1)), 5) != key_of(make_wrapped(make_adder(2)), 5)
    assert key_of(make_wrapped(lambda x: x), 5) != key_of(make_wrapped(lambda x: -x), 5)

    def countdown(n: int) -> int:
        return 0 if n == 0 else countdown(n - 1)  # closes over itself

    assert len(function_fingerprint(countdown)) == 16


def make_locked() -> Callable[[int], int]:
    lock = threading.Lock()

    def locked(x: int) -> int:
        with lock:
            return x

    return locked


def test_a_closure_value_that_cannot_be_keyed_is_refused_when_decorating() -> None:
    with pytest.raises(CacheKeyError, match=r"'lock'.*cache_key=.*module-level") as info:
        KeyBuilder(make_locked(), "ns", None)
    assert "make_locked.<locals>.locked" in str(info.value)
    with pytest.raises(CacheKeyError, match=r"'lock' \(used through 'inner'\)"):
        KeyBuilder(make_wrapped(make_locked()), "ns", None)
    # cache_key= takes the key over: the lock is left out, the other values still count
    chosen = KeyBuilder(make_locked(), "ns", lambda x: x)
    assert chosen((1,), {}) == KeyBuilder(make_locked(), "ns", lambda x: x)((1,), {})


def test_a_store_of_the_functions_own_needs_no_fingerprint() -> None:
    keys = KeyBuilder(make_locked(), "ns", None, fingerprint=False)  # the memory cache
    assert keys.fingerprint is None
    digest = blake2b(repr((1,)).encode(), digest_size=20).hexdigest()
    assert keys((1,), {}) == keys.prefix + digest


def test_builtins_and_bound_methods_have_a_fingerprint() -> None:
    assert KeyBuilder(len, "ns", None).fingerprint == KeyBuilder(len, "ns", None).fingerprint
    assert (
        KeyBuilder(Account("a").balance, "ns", None).fingerprint
        == KeyBuilder(Account("b").balance, "ns", None).fingerprint
        == function_fingerprint(Account.balance)
    )
