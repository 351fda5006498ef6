"""Demand for the jobs process, reported to the scaler under the key ``jobs`` (modelplex_kit.demand).

Both processes report it: the edge its queues' depth, poked at each enqueue, so a jobs Deployment scaled to
zero is started at once; the jobs process the same depth and the jobs it runs. The scaler takes the largest
``queued`` of the reports (every reporter sees the same queues) and sums ``in_flight``.

A report reads :meth:`JobsDemand.read`, which must not wait: the queues' depths (``JobStore.depth``, one
indexed count or one Redis round trip each) are sampled every interval by a task of its own, and an enqueue
counts at once, until the next sample. Nothing is sampled when nothing reports (and no metrics are asked for).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from prometheus_client import Gauge

from modelplex_kit import jobqueue
from modelplex_kit.demand import Demand, DemandReporter

log = logging.getLogger(__name__)

#: The scaler's key for the jobs process (its ScaledObject's trigger names it).
JOBS_KEY = "jobs"

QUEUE_DEPTH = Gauge(
    "modelplex_job_queue_depth",
    "Jobs in a durable queue (background responses, batches), by state: queued or running (claimed).",
    ["queue", "state"],
)


class JobsDemand:
    def __init__(
        self,
        queues: Mapping[str, jobqueue.JobStore],
        target: str,
        interval_seconds: float = 2.0,
        *,
        running: Callable[[], int] | None = None,
        summary_seconds: float = 60.0,
        metrics: bool = False,
    ) -> None:
        """``queues`` by name (the metric's label); ``running``: the jobs this process runs now (the jobs
        process; the edge runs none); ``metrics``: sample even when nothing reports, for ``QUEUE_DEPTH``."""
        self._queues = dict(queues)
        self._running = running or (lambda: 0)
        self._interval = interval_seconds
        self._metrics = metrics
        self._reporter = DemandReporter(target, JOBS_KEY, self.read, interval_seconds, summary_seconds)
        self._sampling: asyncio.Task[None] | None = None
        #: Queued jobs over every queue, as last sampled (plus enqueues since).
        self.queued = 0

    @property
    def reporting(self) -> bool:
        return self._reporter.enabled

    def start(self) -> None:
        """On the serving event loop."""
        self._reporter.start()
        if (self.reporting or self._metrics) and self._sampling is None:
            self._sampling = asyncio.create_task(self._sample_forever())

    def enqueued(self) -> None:
        """This process has just queued a job: it counts now, and is reported now (fire-and-forget, coalesced
        with any report due)."""
        if self.reporting:
            self.queued += 1
            self._reporter.poke()

    def read(self) -> Demand:
        return Demand(in_flight=self._running(), queued=self.queued)

    async def sample(self) -> None:
        """Reads every queue's depth; reports now if the demand changed."""
        before = self.read()
        queued = 0
        for name, queue in self._queues.items():
            depth = await queue.depth()
            queued += depth.queued
            QUEUE_DEPTH.labels(name, "queued").set(depth.queued)
            QUEUE_DEPTH.labels(name, "running").set(depth.running)
        self.queued = queued
        if self.read() != before:
            self._reporter.poke()

    async def _sample_forever(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception:  # the queue's outage is logged where work is queued and claimed
                log.debug("queue depth not sampled", exc_info=True)
            await asyncio.sleep(self._interval)

    async def close(self) -> None:
        """Stops sampling and withdraws this process's report."""
        if self._sampling is not None:
            self._sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampling
            self._sampling = None
        await self._reporter.close()
