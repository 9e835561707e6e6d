"""@opero as a decorator: validation when decorating, what the wrapper keeps, the layer order."""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import sys
from typing import Any

import pytest

import opero as opero_pkg
from opero import FallbackError, opero, opmap
from opero.errors import MissingExtraError
from opero.testing import fake_time


def plain(a: int, b: str = "x", *, c: float = 1.0) -> str:
    """Plain docstring."""
    return f"{a}{b}{c}"


async def aplain(a: int, b: str = "x", *, c: float = 1.0) -> str:
    """Async docstring."""
    return f"{a}{b}{c}"


# --------------------------------------------------------------------------------------------
# validation when decorating


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="retrys"):
        opero(retrys=3)  # type: ignore[call-arg]


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        opero(3)  # type: ignore[misc]


@pytest.mark.parametrize("decorator", [opero, opmap])
def test_a_bare_decorator_says_to_add_parentheses(decorator: Any) -> None:
    def f(x: int) -> int:
        return x

    with pytest.raises(TypeError, match=rf"write @{decorator.__name__}\(\.\.\.\) with parentheses"):
        decorator(f)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"retries": -1}, "retries"),
        ({"retries": 1.5}, "retries"),
        ({"retries": True}, "retries"),
        ({"retries": "3"}, "retries"),
        ({"backoff_factor": 0.5}, "backoff_factor"),
        ({"backoff_factor": math.nan}, "backoff_factor"),
        ({"min_delay": -0.1}, "min_delay"),
        ({"min_delay": 5.0, "max_delay": 1.0}, "min_delay"),
        ({"max_delay": math.inf}, "max_delay"),
        ({"max_delay": -1.0}, "max_delay"),
        ({"jitter": "yes"}, "jitter"),
        ({"retry_on": "ValueError"}, "retry_on"),
        ({"retry_on": ValueError("x")}, "retry_on"),
        ({"retry_on": int}, "retry_on"),
        ({"retry_on": ()}, "retry_on"),
        ({"retry_on": (ValueError, 3)}, "retry_on"),
        ({"fallback_on": str}, "fallback_on"),
        ({"rate_limit": 0}, "rate_limit"),
        ({"rate_limit": -5}, "rate_limit"),
        ({"rate_limit": math.nan}, "rate_limit"),
        ({"rate_limit": "10"}, "rate_limit"),
        ({"arg_fallback": "nope"}, "arg_fallback"),
        ({"arg_fallback": ""}, "arg_fallback"),
        ({"arg_fallback": 3}, "arg_fallback"),
        ({"cache": "yes"}, "cache"),
        ({"cache": True, "cache_ttl": 0}, "cache_ttl"),
        ({"cache": True, "cache_ttl": -1}, "cache_ttl"),
        ({"cache": True, "cache_ttl": math.nan}, "cache_ttl"),
        ({"cache": True, "cache_maxsize": 0}, "cache_maxsize"),
        ({"cache": True, "cache_namespace": ""}, "cache_namespace"),
        ({"cache": True, "cache_key": 5}, "cache_key"),
        ({"cache": True, "cache_backend": "nonsense"}, "cache_backend"),
        ({"cache": True, "cache_backend": 42}, "cache_backend"),
        ({"cache_ttl": 10}, "cache_ttl"),  # no effect without cache=True
        ({"cache_backend": "memory", "cache_key": str}, "cache_key"),
        ({"cache_serializer": "json"}, "cache_serializer"),
        ({"cache_maxsize": 10}, "cache_maxsize"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else v,
)
@pytest.mark.parametrize("func", [plain, aplain], ids=["sync", "async"])
def test_impossible_values_are_value_errors_naming_the_option(options, named, func):
    with pytest.raises(ValueError, match=named):
        opero(**options)(func)


def test_arg_fallback_cannot_name_var_args():
    def f(*keys: str) -> None: ...

    with pytest.raises(ValueError, match="arg_fallback"):
        opero(arg_fallback="keys")(f)


def test_generator_functions_are_refused():
    def gen() -> object:
        yield 1

    async def agen() -> object:
        yield 1

    for func in (gen, agen):
        with pytest.raises(TypeError, match="generator"):
            opero()(func)
        with pytest.raises(TypeError, match="generator"):
            opero(retries=2, cache=True)(func)


def test_non_callables_are_refused():
    with pytest.raises(TypeError):
        opero()(42)  # type: ignore[arg-type]


def test_valid_edge_values_are_accepted():
    opero(retries=0, backoff_factor=1, min_delay=0, max_delay=0, rate_limit=0.001)(plain)
    opero(min_delay=2, max_delay=2, retry_on=(ValueError, KeyError))(plain)
    opero(cache=True, cache_ttl=0.5, cache_maxsize=1, cache_key=lambda *a, **k: a)(plain)


# --------------------------------------------------------------------------------------------
# what the wrapper keeps


@pytest.mark.parametrize(
    "options",
    [{}, {"retries": 2}, {"cache": True}, {"rate_limit": 5, "arg_fallback": "b"}],
    ids=["bare", "retries", "cache", "limit+fallback"],
)
@pytest.mark.parametrize("func", [plain, aplain], ids=["sync", "async"])
def test_wrapper_keeps_name_doc_signature_and_kind(options, func):
    wrapped = opero(**options)(func)
    assert wrapped.__name__ == func.__name__
    assert wrapped.__qualname__ == func.__qualname__
    assert wrapped.__module__ == func.__module__
    assert wrapped.__doc__ == func.__doc__
    assert wrapped.__wrapped__ is func
    assert inspect.signature(wrapped) == inspect.signature(func)
    assert inspect.iscoroutinefunction(wrapped) is (func is aplain)
    assert asyncio.iscoroutinefunction(wrapped) is (func is aplain)


def test_results_and_arguments_pass_through(mode):
    f = opero()(mode.fn(plain))
    assert mode.run(f, 1) == "1x1.0"
    assert mode.run(f, 2, "y", c=3.0) == "2y3.0"
    with pytest.raises(TypeError):
        mode.run(f)


def test_public_api():
    assert opero_pkg.__all__ == sorted(opero_pkg.__all__)
    for name in (
        "opero",
        "OperoError",
        "FallbackError",
        "configure_logging",
        "clear_cache",
        "__version__",
    ):
        assert name in opero_pkg.__all__
        assert hasattr(opero_pkg, name)
    assert isinstance(opero_pkg.__version__, str)
    assert issubclass(opero_pkg.FallbackError, opero_pkg.OperoError)


# --------------------------------------------------------------------------------------------
# the layer order: cache -> fallback -> retry -> rate limit -> call


def test_cache_hit_costs_no_token_and_no_attempt(mode):
    calls: list[object] = []
    with fake_time(0.0) as t:

        def body(a: int) -> int:
            calls.append((a, t.now))
            return a

        f = opero(cache=True, rate_limit=1, retries=2)(mode.fn(body))
        assert mode.run(f, 1) == 1
        for _ in range(5):
            assert mode.run(f, 1) == 1  # hits: no waiting, no call
        assert t.slept == []
        assert mode.run(f, 2) == 2  # a miss takes the next token
        assert t.slept == [1.0]
    assert calls == [(1, 0.0), (2, 1.0)]


def test_cache_wraps_fallback_and_retries(mode):
    calls: list[object] = []

    def body(key: list[str]) -> str:
        calls.append(key[0])
        if key[0] != "good" or calls.count("good") < 2:
            raise ConnectionError(key[0])
        return key[0]

    f = opero(cache=True, arg_fallback="key", retries=1, min_delay=0)(mode.fn(body))
    with fake_time():
        assert mode.run(f, ["bad", "good"]) == "good"
        assert calls == ["bad", "bad", "good", "good"]
        assert mode.run(f, ["bad", "good"]) == "good"  # the whole fallback result is cached
    assert len(calls) == 4


def test_fallback_error_is_not_cached(mode):
    calls: list[object] = []

    def body(key: list[str]) -> str:
        calls.append(key[0])
        raise ConnectionError(key[0])

    f = opero(cache=True, arg_fallback="key")(mode.fn(body))
    for _ in range(2):
        with pytest.raises(FallbackError):
            mode.run(f, ["a", "b"])
    assert calls == ["a", "b", "a", "b"]


def test_wrapper_without_cache_clears_nothing():
    assert opero()(plain).cache_clear() == 0


class Flaky:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: int) -> int:
        self.calls += 1
        if self.calls < 2:
            raise ConnectionError("once")
        return x


@pytest.mark.parametrize("options", [{"retries": 1}, {"retries": 1, "rate_limit": 100}])
def test_partials_and_callable_objects_can_be_decorated(mode, options):
    flaky = Flaky()
    f = opero(min_delay=0, **options)(mode.fn(functools.partial(flaky, 7)))
    with fake_time():
        assert mode.run(f) == 7
    assert flaky.calls == 2
    if not mode.is_async:
        assert f.opero_chain.name == f"{__name__}.Flaky"

    g = opero(min_delay=0, **options)(Flaky())
    with fake_time():
        assert g(3) == 3


@pytest.mark.parametrize(
    ("backend", "module"),
    [("disk", "diskcache"), ("redis", "redis"), ("redis://127.0.0.1:6379/9", "redis")],
)
def test_persistent_backend_without_its_extra_fails_when_decorating(monkeypatch, backend, module):
    # Never a silent memory cache: the missing extra is named when decorating.
    monkeypatch.setitem(sys.modules, module, None)
    for name in list(sys.modules):
        if name.startswith(("opero.cache.disk", "opero.cache.redis")):
            monkeypatch.delitem(sys.modules, name)
    extra = "disk" if backend == "disk" else "redis"
    with pytest.raises(MissingExtraError, match=rf"opero\[{extra}\]"):
        opero(cache=True, cache_backend=backend)(plain)


@pytest.mark.parametrize("backend", ["Memory", "sqlite", "disk ", "rediss"])
def test_unknown_backend_names_are_value_errors(backend):
    with pytest.raises(ValueError, match="cache_backend"):
        opero(cache=True, cache_backend=backend)(plain)


@pytest.mark.parametrize("func", [functools.partial(plain, 1), Flaky()], ids=["partial", "object"])
def test_cache_refuses_callables_without_a_name(func):
    with pytest.raises(TypeError, match="__qualname__"):
        opero(cache=True)(func)
