"""The error hierarchy: one base class, wrappers keep the originals, everything pickles."""

from __future__ import annotations

import pickle

import pytest

import opero.errors as errors_module
from opero.errors import (
    CacheKeyError,
    FallbackError,
    MissingExtraError,
    OperoError,
    OpmapError,
    RemoteError,
    WorkerCrashedError,
)


def test_every_public_error_derives_from_opero_error():
    for name in errors_module.__all__:
        cls = getattr(errors_module, name)
        assert issubclass(cls, OperoError), name
    assert issubclass(OperoError, Exception)
    assert errors_module.__all__ == sorted(errors_module.__all__)


def test_compatible_builtin_bases():
    assert issubclass(CacheKeyError, TypeError)
    assert issubclass(MissingExtraError, ImportError)


def test_fallback_error_keeps_the_originals():
    originals = (ValueError("a"), KeyError("b"))
    err = FallbackError("all failed", originals)
    assert err.errors == list(originals)
    assert err.errors[0] is originals[0]
    assert str(err) == "all failed"


def test_opmap_error_keeps_results_and_errors():
    boom = ValueError("x")
    err = OpmapError("1 of 3 failed", [1, boom, 3], {1: boom})
    assert err.results == [1, boom, 3]
    assert err.errors == {1: boom}


def test_missing_extra_error_names_the_extra():
    err = MissingExtraError("cache_backend='redis'", "redis", "redis")
    assert "pip install 'opero[redis]'" in str(err)
    assert err.extra == "redis"
    assert err.name == "redis"


def test_remote_error_fields():
    err = RemoteError("mod.Custom", "went wrong", "Traceback ...")
    assert str(err) == "mod.Custom: went wrong"
    assert (err.type_name, err.message, err.remote_traceback) == (
        "mod.Custom",
        "went wrong",
        "Traceback ...",
    )


@pytest.mark.parametrize(
    "err",
    [
        OperoError("plain"),
        FallbackError("all failed", [ValueError("a"), ConnectionError("b")]),
        OpmapError("failed", [1, ValueError("x")], {1: ValueError("x")}),
        WorkerCrashedError("worker 3 died"),
        RemoteError("mod.Custom", "went wrong", "Traceback ..."),
        CacheKeyError("no key"),
        MissingExtraError("cache_backend='disk'", "disk", "diskcache"),
        *(
            [errors_module.RateLimitUnavailableError("store down")]
            if hasattr(errors_module, "RateLimitUnavailableError")
            else []
        ),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_survive_pickling(err):
    # Errors cross process boundaries (workers, stores): they must come back as themselves.
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is type(err)
    assert str(copy) == str(err)
    assert copy.args == err.args
    for attr in ("errors", "results", "type_name", "message", "remote_traceback", "extra", "name"):
        if hasattr(err, attr):
            assert repr(getattr(copy, attr)) == repr(getattr(err, attr)), attr
