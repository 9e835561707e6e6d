"""The drivers: the only code that sleeps, awaits, or calls the user's function.

Each driver carries out the layer order of :mod:`opero._chain` (cache -> fallback -> retry -> rate
limit -> call) by asking the policies what to do and doing it. ``run_sync`` and ``run_async`` are
the same algorithm; only the waiting differs.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

from opero._chain import Chain, Limiter
from opero._clock import clock
from opero._log import logger
from opero.core.cache import MISSING, CacheLayer, LeaderGone
from opero.errors import FallbackError

# ---------------------------------------------------------------------------------------------
# sync


def run_sync(chain: Chain, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """One call of a sync chain."""
    cache = chain.cache
    if cache is None:
        return _fallback_sync(chain, args, kwargs)
    key = cache.key(args, kwargs)
    value = cache.lookup(key)
    if value is not MISSING:
        return value
    return _lead_sync(chain, cache, key, args, kwargs)


def _lead_sync(
    chain: Chain, cache: CacheLayer, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    while True:
        leader, flight = cache.flights.join(key, threading.get_ident())
        if leader:
            break
        assert flight is not None
        try:
            return flight.result()
        except LeaderGone:
            value = cache.lookup(key)
            if value is not MISSING:
                return value
    if flight is None:  # this thread already computes this key further up its stack
        return _fallback_sync(chain, args, kwargs)
    try:
        value = _fallback_sync(chain, args, kwargs)
    except Exception as exc:
        cache.flights.finish(key, flight, None, exc)
        raise
    except BaseException:
        cache.flights.finish(key, flight, None, LeaderGone())
        raise
    try:
        cache.store(key, value)
    finally:
        # Even when storing is interrupted the followers get the computed value, and the
        # flight always ends: a flight left open would make every later call wait forever.
        cache.flights.finish(key, flight, value, None)
    return value


def _fallback_sync(chain: Chain, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    fallback = chain.fallback
    values = None if fallback is None else fallback.values(args, kwargs)
    if values is None:
        return _retry_sync(chain, args, kwargs)
    assert fallback is not None
    errors: list[BaseException] = []
    for index, (cargs, ckwargs) in enumerate(fallback.candidates(values, args, kwargs)):
        try:
            return _retry_sync(chain, cargs, ckwargs)
        except Exception as exc:  # noqa: PERF203 - runs only when a candidate failed
            if not isinstance(exc, chain.fallback_on):
                raise
            errors.append(exc)
            _log_fallback(chain, index, len(values), exc)
    raise _fallback_error(chain, values, errors) from errors[-1]


def continue_after_failure_sync(
    chain: Chain, exc: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Go on after a first attempt that the caller made inline (a chain with retries only)."""
    if not chain.retry.should_retry(exc, 1):
        raise exc
    delay = chain.retry.delay(1)
    _log_retry(chain, 1, exc, delay)
    clock.sleep(delay)
    return _retry_sync(chain, args, kwargs, attempt=2)


def _retry_sync(
    chain: Chain, args: tuple[Any, ...], kwargs: dict[str, Any], attempt: int = 1
) -> Any:
    retry = chain.retry
    limiter = chain.limiter
    while True:
        if limiter is not None:
            wait = limiter.reserve(clock.monotonic())
            if wait > 0:
                _wait_for_start_sync(limiter, wait)
        try:
            return chain.call(*args, **kwargs)
        except Exception as exc:
            if not retry.should_retry(exc, attempt):
                raise
            delay = retry.delay(attempt)
            _log_retry(chain, attempt, exc, delay)
        clock.sleep(delay)
        attempt += 1


def _wait_for_start_sync(limiter: Limiter, wait: float) -> None:
    try:
        while wait > 0:
            clock.sleep(wait)
            wait = limiter.settle(clock.monotonic())
    except BaseException:
        limiter.abandon()  # an interrupted waiter must not hold a place in the queue
        raise


# ---------------------------------------------------------------------------------------------
# async


async def run_async(chain: Chain, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """One call of an async chain."""
    cache = chain.cache
    if cache is None:
        return await _fallback_async(chain, args, kwargs)
    key = cache.key(args, kwargs)
    value = await cache.alookup(key)
    if value is not MISSING:
        return value
    return await _lead_async(chain, cache, key, args, kwargs)


async def _lead_async(
    chain: Chain, cache: CacheLayer, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    while True:
        leader, flight = cache.flights.join(key, asyncio.current_task())
        if leader:
            break
        assert flight is not None
        waiter = asyncio.wrap_future(flight)
        try:
            # shield: a cancelled follower must not cancel the flight the others wait on
            return await asyncio.shield(waiter)
        except asyncio.CancelledError:
            # Nobody awaits the waiter now: take its outcome so that asyncio does not report a
            # failed flight as "exception was never retrieved" when it is collected.
            waiter.add_done_callback(_retrieve)
            raise
        except LeaderGone:
            value = await cache.alookup(key)
            if value is not MISSING:
                return value
    if flight is None:  # this task already computes this key further up its stack
        return await _fallback_async(chain, args, kwargs)
    try:
        value = await _fallback_async(chain, args, kwargs)
    except Exception as exc:
        cache.flights.finish(key, flight, None, exc)
        raise
    except BaseException:
        cache.flights.finish(key, flight, None, LeaderGone())
        raise
    try:
        await cache.astore(key, value)
    finally:
        # Even when storing is interrupted the followers get the computed value, and the
        # flight always ends: a flight left open would make every later call wait forever.
        cache.flights.finish(key, flight, value, None)
    return value


async def _fallback_async(chain: Chain, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    fallback = chain.fallback
    values = None if fallback is None else fallback.values(args, kwargs)
    if values is None:
        return await _retry_async(chain, args, kwargs)
    assert fallback is not None
    errors: list[BaseException] = []
    for index, (cargs, ckwargs) in enumerate(fallback.candidates(values, args, kwargs)):
        try:
            return await _retry_async(chain, cargs, ckwargs)
        except Exception as exc:  # noqa: PERF203 - runs only when a candidate failed
            if not isinstance(exc, chain.fallback_on):
                raise
            errors.append(exc)
            _log_fallback(chain, index, len(values), exc)
    raise _fallback_error(chain, values, errors) from errors[-1]


async def _retry_async(chain: Chain, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    retry = chain.retry
    limiter = chain.limiter
    attempt = 1
    while True:
        if limiter is not None:
            wait = await limiter.areserve(clock.monotonic())
            if wait > 0:
                await _wait_for_start_async(limiter, wait)
        try:
            return await chain.call(*args, **kwargs)
        except Exception as exc:
            if not retry.should_retry(exc, attempt):
                raise
            delay = retry.delay(attempt)
            _log_retry(chain, attempt, exc, delay)
        await clock.asleep(delay)
        attempt += 1


async def _wait_for_start_async(limiter: Limiter, wait: float) -> None:
    try:
        while wait > 0:
            await clock.asleep(wait)
            wait = limiter.settle(clock.monotonic())
    except BaseException:
        limiter.abandon()  # a cancelled waiter must not hold a place in the queue
        raise


# ---------------------------------------------------------------------------------------------
# shared


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _log_retry(chain: Chain, attempt: int, exc: BaseException, delay: float) -> None:
    logger.warning(
        "%s: attempt %d of %d failed with %s: %s; retrying in %.3fs",
        chain.name,
        attempt,
        chain.retry.attempts,
        type(exc).__name__,
        exc,
        delay,
    )


def _log_fallback(chain: Chain, index: int, count: int, exc: BaseException) -> None:
    # Never log the candidate's value: fallback values are typically API keys.
    assert chain.fallback is not None
    if index + 1 < count:
        logger.warning(
            "%s: %s candidate %d of %d failed with %s; falling back to candidate %d",
            chain.name,
            chain.fallback.name,
            index + 1,
            count,
            type(exc).__name__,
            index + 2,
        )
    else:
        logger.warning(
            "%s: %s candidate %d of %d failed with %s; no candidates left",
            chain.name,
            chain.fallback.name,
            index + 1,
            count,
            type(exc).__name__,
        )


def _fallback_error(
    chain: Chain, values: Sequence[object], errors: list[BaseException]
) -> FallbackError:
    assert chain.fallback is not None
    summary = "; ".join(f"#{i + 1}: {type(e).__name__}: {e}" for i, e in enumerate(errors))
    return FallbackError(
        f"{chain.name}: all {len(values)} candidates of {chain.fallback.name!r} failed ({summary})",
        errors,
    )
