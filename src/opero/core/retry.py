"""Retry policy: which errors are retried, how many attempts, and how long to wait before each."""

from __future__ import annotations

import math

from tenacity import RetryCallState
from tenacity.wait import wait_base, wait_exponential, wait_random_exponential

ExceptionTypes = type[BaseException] | tuple[type[BaseException], ...]


def _check_retry_on(retry_on: object) -> tuple[type[BaseException], ...]:
    types = retry_on if isinstance(retry_on, tuple) else (retry_on,)
    if not types or not all(isinstance(t, type) and issubclass(t, BaseException) for t in types):
        raise ValueError(
            f"retry_on must be an exception type or a tuple of exception types, got {retry_on!r}"
        )
    for t in types:
        if not issubclass(t, Exception) and t is not BaseException:
            # KeyboardInterrupt, SystemExit, CancelledError and their kin always propagate.
            raise ValueError(
                f"retry_on={t.__name__} can never match: only Exception subclasses are retried "
                "(KeyboardInterrupt, SystemExit and cancellation always propagate)"
            )
    return types


class RetryPolicy:
    """Attempts per candidate and the wait before retry *n*.

    Waits are computed by tenacity's strategies. Without jitter the wait before retry ``n`` is
    ``min(max_delay, min_delay * backoff_factor ** (n - 1))``. With jitter it is drawn uniformly
    from ``[min_delay, min(max_delay, min_delay * backoff_factor ** n)]`` ("full jitter" with a
    floor): spread out from the first retry on, never below ``min_delay``, never above
    ``max_delay``.
    """

    __slots__ = ("attempts", "retry_on", "wait")

    def __init__(
        self,
        *,
        retries: int,
        backoff_factor: float,
        min_delay: float,
        max_delay: float,
        jitter: bool,
        retry_on: object,
    ) -> None:
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
        for name, value in (
            ("backoff_factor", backoff_factor),
            ("min_delay", min_delay),
            ("max_delay", max_delay),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if backoff_factor < 1:
            raise ValueError(f"backoff_factor must be >= 1, got {backoff_factor!r}")
        if min_delay < 0:
            raise ValueError(f"min_delay must be >= 0, got {min_delay!r}")
        if min_delay > max_delay:
            raise ValueError(
                f"min_delay ({min_delay!r}) must not be greater than max_delay ({max_delay!r})"
            )
        if not isinstance(jitter, bool):
            raise ValueError(f"jitter must be True or False, got {jitter!r}")  # noqa: TRY004
        self.attempts = retries + 1
        self.retry_on = _check_retry_on(retry_on)
        self.wait: wait_base
        if jitter:
            self.wait = wait_random_exponential(
                multiplier=min_delay * backoff_factor,
                exp_base=backoff_factor,
                min=min_delay,
                max=max_delay,
            )
        else:
            self.wait = wait_exponential(
                multiplier=min_delay, exp_base=backoff_factor, min=min_delay, max=max_delay
            )

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        """True when ``exc``, raised by attempt number ``attempt`` (1-based), earns another try.

        Only ``Exception`` subclasses are ever retried: KeyboardInterrupt, SystemExit and
        cancellation always propagate, even with ``retry_on=BaseException``.
        """
        return (
            attempt < self.attempts
            and isinstance(exc, Exception)
            and isinstance(exc, self.retry_on)
        )

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        # tenacity's waits read only attempt_number: no Retrying object is needed (or built)
        state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.attempt_number = retry
        return float(self.wait(state))
