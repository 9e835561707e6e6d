"""Logging: silent unless configured, one line per decision, never a fallback value."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import textwrap

import pytest

from opero import FallbackError, _log, configure_logging, opero
from opero.testing import fake_time

SECRET = "sk-live-SECRET-0123456789"


@pytest.fixture
def restore_logger(monkeypatch):
    """Undo configure_logging: its handler, the level, the module's record of the handler."""
    logger = logging.getLogger("opero")
    handlers, level = list(logger.handlers), logger.level
    monkeypatch.setattr(_log, "_handler", None)
    monkeypatch.setattr(logger, "propagate", logger.propagate)  # configure_logging turns it off
    yield logger
    logger.handlers[:] = handlers
    logger.setLevel(level)


def test_importing_opero_configures_nothing():
    code = textwrap.dedent(
        """
        import logging
        import opero
        log = logging.getLogger("opero")
        print(
            [type(h).__name__ for h in log.handlers],
            log.level,
            logging.getLogger().handlers,
            logging.getLogger().level == logging.WARNING,
        )
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "['NullHandler'] 0 [] True"


def test_configure_logging_returns_the_logger_and_writes_to_the_stream(restore_logger):
    stream = io.StringIO()
    logger = configure_logging(level=logging.DEBUG, stream=stream, fmt="%(levelname)s|%(message)s")
    assert logger is logging.getLogger("opero")
    assert logger.level == logging.DEBUG
    logger.debug("hello")
    assert stream.getvalue() == "DEBUG|hello\n"


def test_configure_logging_again_replaces_its_handler(restore_logger):
    first, second = io.StringIO(), io.StringIO()
    configure_logging(stream=first, fmt="%(message)s")
    logger = configure_logging(stream=second, fmt="%(message)s")
    configure_logging(stream=second, fmt="%(message)s")
    logger.warning("once")
    assert second.getvalue() == "once\n"
    assert first.getvalue() == ""
    non_null = [h for h in logger.handlers if not isinstance(h, logging.NullHandler)]
    assert len(non_null) == 1


@pytest.mark.parametrize("level", ["warning", "WARNING", logging.WARNING])
def test_configure_logging_accepts_level_names(restore_logger, level):
    stream = io.StringIO()
    logger = configure_logging(level=level, stream=stream, fmt="%(message)s")
    logger.info("hidden")
    logger.warning("shown")
    assert stream.getvalue() == "shown\n"


def test_configure_logging_defaults_to_stderr(restore_logger, capsys):
    configure_logging(fmt="%(message)s").warning("to stderr")
    assert capsys.readouterr().err == "to stderr\n"


def test_each_retry_logs_one_warning(mode, caplog):
    calls: list[object] = []

    def flaky(x: int) -> int:
        calls.append(x)
        if len(calls) < 3:
            raise ConnectionError(f"refused #{len(calls)}")
        return x

    f = opero(retries=4, min_delay=0.5, backoff_factor=2, jitter=False)(mode.fn(flaky))
    with fake_time(), caplog.at_level(logging.DEBUG, logger="opero"):
        assert mode.run(f, 1) == 1
    records = [r for r in caplog.records if r.name == "opero"]
    assert [r.levelno for r in records] == [logging.WARNING, logging.WARNING]
    name = f"{__name__}.test_each_retry_logs_one_warning.<locals>.flaky"
    for k, (record, wait) in enumerate(zip(records, ("0.500s", "1.000s"), strict=True), start=1):
        message = record.getMessage()
        assert name in message
        assert f"attempt {k} of 5" in message
        assert "ConnectionError" in message
        assert f"refused #{k}" in message
        assert wait in message


def test_no_retry_log_when_attempts_run_out_or_error_is_not_retried(mode, caplog):
    def broken() -> None:
        raise ValueError("bug")

    f = opero(retries=2, retry_on=ConnectionError)(mode.fn(broken))
    with fake_time(), caplog.at_level(logging.DEBUG, logger="opero"), pytest.raises(ValueError):
        mode.run(f)
    assert [r for r in caplog.records if r.name == "opero"] == []


def test_fallback_logs_parameter_and_index_never_the_value(mode, restore_logger):
    stream = io.StringIO()
    configure_logging(level=logging.DEBUG, stream=stream, fmt="%(message)s %(args)s")

    def call(api_key: list[str], x: int = 0) -> str:
        if api_key[0] == SECRET:
            raise PermissionError("revoked")
        return "ok"

    f = opero(arg_fallback="api_key", retries=1, min_delay=0)(mode.fn(call))
    with fake_time():
        assert mode.run(f, [SECRET, "backup-key"]) == "ok"
    fallback_lines = [line for line in stream.getvalue().splitlines() if "candidate" in line]
    assert len(fallback_lines) == 1
    assert "api_key" in fallback_lines[0]
    assert "candidate 1 of 2" in fallback_lines[0]
    assert "candidate 2" in fallback_lines[0]
    everything = stream.getvalue()  # every record's message and its raw arguments
    assert SECRET not in everything
    assert "backup-key" not in everything


def test_last_candidate_failing_logs_no_candidates_left(mode, caplog):
    def call(api_key: list[str]) -> str:
        raise PermissionError("revoked")

    f = opero(arg_fallback="api_key")(mode.fn(call))
    with caplog.at_level(logging.DEBUG, logger="opero"), pytest.raises(FallbackError):
        mode.run(f, [SECRET, SECRET + "2"])
    messages = [r.getMessage() for r in caplog.records if r.name == "opero"]
    assert len(messages) == 2
    assert "candidate 2 of 2" in messages[1]
    assert SECRET not in caplog.text
