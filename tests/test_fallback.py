"""Fallback rules of @opero: candidates, their order and types, and the error when all fail."""

from __future__ import annotations

import traceback

import pytest

from opero import FallbackError, OperoError, opero
from opero.testing import fake_time


class Revoked(Exception):
    pass


def recorder(seen: list[object], good: object = None):
    """A body that records the ``key`` it got and fails unless ``key[0] == good``."""

    def body(x: int, key: object = ("d1", "d2"), *, flag: bool = False) -> str:
        seen.append(key)
        current = key[0] if isinstance(key, list | tuple) else key
        if current != good:
            raise Revoked(f"candidate #{len(seen)} refused")
        return f"{x}:{current}:{flag}"

    return body


@pytest.mark.parametrize("how", ["positional", "keyword"])
@pytest.mark.parametrize("kind", [list, tuple])
def test_attempt_i_gets_values_from_i_of_the_same_type(mode, how, kind):
    seen: list[object] = []
    f = opero(arg_fallback="key")(mode.fn(recorder(seen)))
    keys = kind(["k1", "k2", "k3"])
    args, kwargs = ((1, keys), {}) if how == "positional" else ((1,), {"key": keys})
    with pytest.raises(FallbackError):
        mode.run(f, *args, **kwargs)
    assert seen == [kind(["k1", "k2", "k3"]), kind(["k2", "k3"]), kind(["k3"])]
    assert all(type(s) is kind for s in seen)


def test_candidates_come_from_the_default(mode):
    seen: list[object] = []
    f = opero(arg_fallback="key")(mode.fn(recorder(seen, good="d2")))
    assert mode.run(f, 7, flag=True) == "7:d2:True"
    assert seen == [("d1", "d2"), ("d2",)]


def test_keyword_only_parameter(mode):
    seen: list[object] = []

    def body(*, key: list[str]) -> str:
        seen.append(key)
        if key[0] != "b":
            raise Revoked
        return key[0]

    f = opero(arg_fallback="key")(mode.fn(body))
    assert mode.run(f, key=["a", "b"]) == "b"
    assert seen == [["a", "b"], ["b"]]


def test_other_arguments_pass_through_unchanged(mode):
    seen: list[object] = []
    f = opero(arg_fallback="key")(mode.fn(recorder(seen, good="k2")))
    assert mode.run(f, 5, ["k1", "k2"], flag=True) == "5:k2:True"


def test_caller_list_and_default_are_never_mutated_and_each_call_starts_at_zero(mode):
    seen: list[object] = []
    default = ["d1", "d2", "d3"]

    def body(key: list[str] = default) -> str:
        seen.append(list(key))
        if key[0] != "d3":
            raise Revoked
        return key[0]

    f = opero(arg_fallback="key")(mode.fn(body))
    assert mode.run(f) == "d3"
    assert mode.run(f) == "d3"
    assert default == ["d1", "d2", "d3"]
    assert seen == [["d1", "d2", "d3"], ["d2", "d3"], ["d3"]] * 2

    seen.clear()
    mine = ["d1", "d3"]
    assert mode.run(f, mine) == "d3"
    assert mode.run(f, key=mine) == "d3"
    assert mine == ["d1", "d3"]
    assert seen == [["d1", "d3"], ["d3"]] * 2


@pytest.mark.parametrize("value", ["abc", b"abc", 42, None, {"a": 1}])
def test_str_bytes_and_non_sequences_are_one_candidate_passed_as_is(mode, value):
    seen: list[object] = []

    def body(key: object) -> object:
        seen.append(key)
        raise Revoked("no")

    f = opero(arg_fallback="key", retries=1)(mode.fn(body))
    with fake_time(), pytest.raises(Revoked):  # no alternatives: the original error, no wrapper
        mode.run(f, value)
    assert seen == [value, value]  # retried as usual, never sliced
    assert all(s is value for s in seen)


def test_str_candidate_succeeds_as_is(mode):
    f = opero(arg_fallback="key")(mode.fn(lambda key: key))
    assert mode.run(f, "sk-123") == "sk-123"


@pytest.mark.parametrize("empty", [[], ()])
def test_empty_candidate_list_raises_value_error_without_calling(mode, empty):
    seen: list[object] = []
    f = opero(arg_fallback="key")(mode.fn(recorder(seen)))
    with pytest.raises(ValueError, match="key"):
        mode.run(f, 1, empty)
    assert seen == []


def test_fallback_error_keeps_every_error_in_order(mode):
    seen: list[object] = []
    f = opero(arg_fallback="key")(mode.fn(recorder(seen)))
    with pytest.raises(FallbackError) as info:
        mode.run(f, 1, ["sk-AAA", "sk-BBB", "sk-CCC"])
    err = info.value
    assert isinstance(err, OperoError)
    assert [type(e) for e in err.errors] == [Revoked, Revoked, Revoked]
    assert [str(e) for e in err.errors] == [f"candidate #{i} refused" for i in (1, 2, 3)]
    assert err.__cause__ is err.errors[-1]
    for e in err.errors:
        lines = [frame.line for frame in traceback.extract_tb(e.__traceback__)]
        assert 'raise Revoked(f"candidate #{len(seen)} refused")' in lines
    assert "'key'" in str(err)
    assert "sk-" not in str(err)  # the message never shows a candidate (they are API keys)


def test_fallback_error_holds_each_candidates_last_attempt(mode):
    calls: list[object] = []

    def body(key: list[str]) -> None:
        calls.append(key[0])
        raise Revoked(f"{key[0]}-{calls.count(key[0])}")

    f = opero(arg_fallback="key", retries=2)(mode.fn(body))
    with fake_time() as t, pytest.raises(FallbackError) as info:
        mode.run(f, ["a", "b"])
    assert calls == ["a", "a", "a", "b", "b", "b"]  # retries + 1 attempts per candidate
    assert [str(e) for e in info.value.errors] == ["a-3", "b-3"]
    assert len(t.slept) == 4  # waits between retries only: none after a candidate's last attempt


def test_success_on_a_later_candidate_returns_its_value(mode):
    seen: list[object] = []
    f = opero(arg_fallback="key", retries=1)(mode.fn(recorder(seen, good="c")))
    with fake_time():
        assert mode.run(f, 3, ["a", "b", "c"]) == "3:c:False"
    assert seen == [["a", "b", "c"]] * 2 + [["b", "c"]] * 2 + [["c"]]


def test_fallback_on_narrows_what_falls_back(mode):
    seen: list[object] = []

    def body(key: list[str]) -> str:
        seen.append(key[0])
        if key[0] == "a":
            raise ValueError("a bug, not a revoked key")
        return key[0]

    f = opero(arg_fallback="key", fallback_on=Revoked)(mode.fn(body))
    with pytest.raises(ValueError, match="a bug"):
        mode.run(f, ["a", "b"])
    assert seen == ["a"]

    g = opero(arg_fallback="key", fallback_on=(KeyError, ValueError))(mode.fn(body))
    assert mode.run(g, ["a", "b"]) == "b"


def test_error_not_retried_still_falls_back_at_once(mode):
    seen: list[object] = []
    f = opero(arg_fallback="key", retries=3, retry_on=ConnectionError)(
        mode.fn(recorder(seen, good="b"))
    )
    with fake_time() as t:
        assert mode.run(f, 1, ["a", "b"]) == "1:b:False"
    assert seen == [["a", "b"], ["b"]]
    assert t.slept == []


def test_fallback_on_default_is_exception():
    f = opero(arg_fallback="key")(recorder([]))
    assert f.opero_chain.fallback_on == (Exception,)


@pytest.mark.parametrize("bad", ["nope", 3, (ValueError, 3), ()])
def test_invalid_fallback_on_is_rejected(bad):
    with pytest.raises(ValueError, match="fallback_on"):
        opero(arg_fallback="key", fallback_on=bad)(recorder([]))


def test_single_element_list_failing_raises_fallback_error(mode):
    seen: list[object] = []
    f = opero(arg_fallback="key")(mode.fn(recorder(seen)))
    with pytest.raises(FallbackError) as info:
        mode.run(f, 1, ["only"])
    assert len(info.value.errors) == 1
    assert info.value.__cause__ is info.value.errors[0]


def test_missing_argument_raises_the_calls_own_type_error(mode):
    def body(key: list[str]) -> str:
        return key[0]

    f = opero(arg_fallback="key")(mode.fn(body))
    with pytest.raises(TypeError):
        mode.run(f)
