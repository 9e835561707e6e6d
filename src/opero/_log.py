"""The ``opero`` logger. The library never configures logging unless asked to."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

logger = logging.getLogger("opero")
logger.addHandler(logging.NullHandler())

_DEFAULT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_handler: logging.Handler | None = None


def configure_logging(
    level: int | str = logging.INFO, stream: TextIO | None = None, fmt: str | None = None
) -> logging.Logger:
    """Send opero's log records to ``stream`` (default ``sys.stderr``) at ``level``.

    Calling it again replaces the handler it installed before, so lines are never duplicated.
    Returns the ``opero`` logger.
    """
    global _handler  # noqa: PLW0603 - one handler owned by this function, replaced on each call
    if _handler is not None:
        logger.removeHandler(_handler)
    _handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    _handler.setFormatter(logging.Formatter(fmt or _DEFAULT_FORMAT))
    logger.addHandler(_handler)
    logger.setLevel(level.upper() if isinstance(level, str) else level)  # "info" works too
    # The handler installed here prints opero's records; passing them on to the root logger's
    # handlers as well would print every line twice.
    logger.propagate = False
    return logger
