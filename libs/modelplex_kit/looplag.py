"""The event loop's lag, a metric of every asyncio service.

One task keeps a timer pending and measures how much later than asked the loop ran it: the time
the loop spent on something without yielding (a huge body parsed at once, a synchronous loop over a
request's items). Every request on that loop waited as long, so this is the number that shows one
request delaying the others; `modelplex_event_loop_lag_seconds` in Prometheus, and ``worst`` for the
tests and benches that hold the monitor. `modelplex_event_loop_busy_lag_seconds` is the part of it the
loop's thread spent on the CPU: on a crowded host a loop also runs late while it waits for a CPU,
which is no request's doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Histogram

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
EVENT_LOOP_LAG = Histogram(
    "modelplex_event_loop_lag_seconds",
    "How late the event loop ran a timer that was due: time it spent without yielding to other requests",
    buckets=_BUCKETS,
)
EVENT_LOOP_BUSY_LAG = Histogram(
    "modelplex_event_loop_busy_lag_seconds",
    "The part of each event loop lag its thread spent on the CPU: its own work, not a wait for a CPU",
    buckets=_BUCKETS,
)

#: How often the timer is set. A stall is measured whichever tick it falls in (a timer is always
#: pending); ten wake-ups a second cost the loop nothing measurable.
DEFAULT_INTERVAL = 0.1


@dataclass(frozen=True, slots=True)
class Tick:
    """One timer: how late it ran (wall time) and what the loop's thread ran on the CPU meanwhile."""

    asked: float
    slept: float
    cpu: float

    @property
    def lag(self) -> float:
        return max(0.0, self.slept - self.asked)

    @property
    def busy_lag(self) -> float:
        """The lag the loop's own work explains: a loop that waited for a CPU (a busy machine) ran
        nothing while it was late, so this tells code that holds the loop from a crowded host."""
        return min(self.lag, self.cpu)


class LoopLagMonitor:
    """Measures the running loop's lag every ``interval`` seconds until stopped."""

    def __init__(
        self,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self._interval, self._clock, self._cpu_clock = interval, clock, cpu_clock
        self._task: asyncio.Task[None] | None = None
        #: The largest lag, and busy lag, seen since the start.
        self.worst = 0.0
        self.worst_busy = 0.0

    def record(self, tick: Tick) -> None:
        EVENT_LOOP_LAG.observe(tick.lag)
        EVENT_LOOP_BUSY_LAG.observe(tick.busy_lag)
        self.worst = max(self.worst, tick.lag)
        self.worst_busy = max(self.worst_busy, tick.busy_lag)

    async def run(self) -> None:
        while True:
            started, cpu = self._clock(), self._cpu_clock()
            await asyncio.sleep(self._interval)
            self.record(Tick(self._interval, self._clock() - started, self._cpu_clock() - cpu))

    def start(self) -> LoopLagMonitor:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="loop-lag")
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class TimeSlice:
    """For a long piece of work on the loop: ``await slice.pause()`` between its steps gives the loop back
    once the work has held it for ``seconds``, so other requests wait at most about that long."""

    def __init__(self, seconds: float = 0.005, clock: Callable[[], float] = time.perf_counter) -> None:
        self._seconds, self._clock = seconds, clock
        self._since = clock()

    async def pause(self) -> None:
        if self._clock() - self._since >= self._seconds:
            await asyncio.sleep(0)
            self._since = self._clock()


def freeze_startup_heap() -> None:
    """Moves what exists once a service has started (modules, settings, clients) out of the cyclic
    collector's reach: a request that builds many objects (a large body) triggers collections, and
    each full one walked that whole heap too, on the loop (100,000 small arrays parsed in 59 ms with
    the edge's heap, 21 ms without it). What is frozen is never freed, which startup state never is."""
    gc.collect()
    gc.freeze()
