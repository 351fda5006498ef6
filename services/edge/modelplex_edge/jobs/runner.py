"""The queues' workers over an :class:`EdgeState`: the batch worker (and its file-expiry sweep) and the
background-response worker, with the jobs process's demand report.

The jobs process runs one over the state it builds (server.py); a test runs one over an in-process edge's
state (its in-memory stores are that process's own). The worker counts and leases are the edge's settings
(``MODELPLEX_EDGE_BATCHES_WORKERS``, ``MODELPLEX_EDGE_RESPONSES_BACKGROUND_WORKERS``, ...): 0 runs none.
Idle workers find work by polling their queue's depth (``modelplex_kit.jobqueue.until_claimable``).
"""

from __future__ import annotations

import logging

from modelplex_edge.endpoints.batches.worker import BatchWorker
from modelplex_edge.endpoints.responses.background import BackgroundWorker
from modelplex_edge.endpoints.responses.router import ENDPOINT as RESPONSES
from modelplex_edge.jobs.demand import JobsDemand
from modelplex_edge.jobs.settings import JobsSettings
from modelplex_edge.state import EdgeState

log = logging.getLogger(__name__)


class JobsRunner:
    def __init__(
        self,
        state: EdgeState,
        settings: JobsSettings | None = None,
        *,
        background: bool = True,
        batches: bool = True,
    ) -> None:
        """``background``/``batches``: whether to run that queue at all (the jobs process runs no queue held
        in its own memory, where no edge could have put anything)."""
        edge = state.settings
        self.settings = settings or JobsSettings()
        self.background = (
            BackgroundWorker(state, RESPONSES) if background and edge.responses_background_workers else None
        )
        self.batches = BatchWorker(state) if batches and edge.batches_workers else None
        self.demand = JobsDemand(
            {"background": state.background, "batches": state.batches},
            self.settings.demand_target,
            self.settings.demand_interval_seconds,
            running=self.running,
            summary_seconds=edge.outage_summary_seconds,
            metrics=True,
        )

    @property
    def workers(self) -> list[BatchWorker | BackgroundWorker]:
        return [worker for worker in (self.background, self.batches) if worker is not None]

    def running(self) -> int:
        """Jobs running in this process now."""
        return sum(worker.running for worker in self.workers)

    def start(self) -> JobsRunner:
        """On the serving event loop; the workers wait for the catalog before their first claim."""
        for worker in self.workers:
            worker.start()
        self.demand.start()
        log.info(
            "jobs runner started",
            extra={
                "background_workers": self.background.count if self.background else 0,
                "batch_workers": self.batches.count if self.batches else 0,
            },
        )
        return self

    async def stop(self) -> None:
        """Running jobs go back to their queue at once (unaccounted: their re-run accounts them)."""
        for worker in self.workers:
            await worker.stop()
        await self.demand.close()
