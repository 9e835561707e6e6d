"""opero.testing.fake_time: the clock seam users and opero's own tests rely on."""

from __future__ import annotations

import asyncio
import time

import pytest

from opero._clock import clock
from opero.testing import fake_time


def test_fake_time_moves_only_when_asked_and_records_waits():
    with fake_time(start=100.0) as t:
        assert clock.monotonic() == 100.0
        clock.sleep(1.5)
        t.advance(2.0)
        asyncio.run(clock.asleep(0.5))
        assert clock.monotonic() == 104.0
        assert t.slept == [1.5, 0.5]  # advance() is not a wait


def test_fake_time_restores_the_real_clock_even_after_an_error():
    with pytest.raises(RuntimeError), fake_time():
        raise RuntimeError
    assert clock.monotonic is time.monotonic
    assert clock.sleep is time.sleep
    assert clock.asleep is asyncio.sleep


async def test_fake_async_sleep_is_still_a_suspension_point():
    ran = []

    async def other() -> None:
        ran.append(True)

    with fake_time():
        task = asyncio.create_task(other())
        await clock.asleep(10)
        assert ran == [True]
        await task
