"""The event-loop lag monitor: a stall is measured as lag, and as busy lag only when the loop did the work."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import REGISTRY

from modelplex_kit.looplag import LoopLagMonitor, Tick, TimeSlice

INTERVAL = 0.05


async def _stalled(stall) -> LoopLagMonitor:
    """A monitor that has measured at least one tick around ``stall()`` run on the loop."""
    monitor = LoopLagMonitor(interval=INTERVAL).start()
    await asyncio.sleep(0)  # its first timer is set
    stall()
    await asyncio.sleep(INTERVAL * 3)  # the late tick is recorded, and one more
    await monitor.stop()
    return monitor


def _burn_cpu(seconds: float) -> None:
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass


async def test_work_that_holds_the_loop_is_lag_and_busy_lag():
    before = REGISTRY.get_sample_value("modelplex_event_loop_busy_lag_seconds_count") or 0
    monitor = await _stalled(lambda: _burn_cpu(4 * INTERVAL))  # 4 intervals of CPU: 3 of them past the timer
    assert monitor.worst >= 2 * INTERVAL and monitor.worst_busy >= 2 * INTERVAL
    assert REGISTRY.get_sample_value("modelplex_event_loop_busy_lag_seconds_count") > before


async def test_a_loop_that_waits_without_working_is_lag_but_not_busy_lag():
    monitor = await _stalled(lambda: time.sleep(4 * INTERVAL))  # blocked, but on no CPU (as when descheduled)
    assert monitor.worst >= 2 * INTERVAL
    assert monitor.worst_busy < INTERVAL


def test_a_tick_is_late_by_what_it_overslept_and_busy_by_no_more_than_its_cpu():
    assert Tick(asked=0.1, slept=0.35, cpu=0.5).lag == pytest.approx(0.25)
    assert Tick(asked=0.1, slept=0.35, cpu=0.5).busy_lag == pytest.approx(0.25)
    assert Tick(asked=0.1, slept=0.35, cpu=0.02).busy_lag == 0.02
    assert Tick(asked=0.1, slept=0.09, cpu=0.09).lag == 0.0


async def test_a_time_slice_gives_the_loop_back_once_its_time_is_spent():
    now = [0.0]
    step = TimeSlice(0.005, clock=lambda: now[0])
    ran = []

    async def other() -> None:
        ran.append(True)

    task = asyncio.create_task(other())
    await step.pause()  # no time spent: no yield
    assert not ran
    now[0] = 0.006
    await step.pause()
    assert ran and task.done()
