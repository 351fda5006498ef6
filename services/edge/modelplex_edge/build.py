"""What the edge and the jobs process both run on, built in one place: the catalog copy, the backends'
channels, admission (the gatekeeper), the response store, the background-response and batch queues and the
object store.

``async with build_state(settings) as state`` builds them into an :class:`EdgeState` and closes them, in
reverse, on the way out. The edge app serves HTTP over it; ``python -m modelplex_edge.jobs`` runs the queues'
workers over it (and tests run both over one). Both read the same ``MODELPLEX_EDGE_*`` settings, so both
reach the same stores, catalog, gatekeeper and backends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from modelplex_edge.admission import Admission, DevKeyAdmission
from modelplex_edge.backends import Backends, channel
from modelplex_edge.catalog_client import CatalogWatcher
from modelplex_edge.endpoints.batches import records as batch_records
from modelplex_edge.endpoints.files.store import open_objects
from modelplex_edge.endpoints.responses import background
from modelplex_edge.endpoints.responses.store import build_store
from modelplex_edge.gatekeeper_client import GatekeeperAdmission
from modelplex_edge.settings import EdgeSettings
from modelplex_edge.state import EdgeState


def default_admission(settings: EdgeSettings) -> Admission:
    if settings.gatekeeper_target:
        return GatekeeperAdmission(
            settings.gatekeeper_target,
            settings.gatekeeper_timeout_seconds,
            leases=settings.gatekeeper_leases,
            fail_open=settings.gatekeeper_failure == "open",
            summary_seconds=settings.outage_summary_seconds,
        )
    return DevKeyAdmission(settings.dev_api_key.get_secret_value())


@contextlib.asynccontextmanager
async def build_state(
    settings: EdgeSettings, admission: Admission | None = None, *, runs_jobs: bool = False
) -> AsyncIterator[EdgeState]:
    """The shared parts, following the catalog from the start. ``runs_jobs``: this process runs the queues'
    jobs (the jobs process), so opening a SQLite queue re-queues what it left running when it last stopped;
    the edge only queues and reads, and must not take running jobs from the jobs process when it restarts."""
    catalog_channel = channel(settings.catalog_target)
    watcher = CatalogWatcher(catalog_channel, settings.outage_summary_seconds)
    following = asyncio.create_task(watcher.run())
    backends = Backends(settings.backend_timeout_seconds)
    gate = admission or default_admission(settings)
    responses = build_store(
        settings.responses_store,
        sqlite_path=settings.responses_sqlite_path,
        redis_url=settings.responses_redis_url,
        retention_seconds=settings.responses_retention_seconds,
        memory_max_records=settings.responses_memory_max_records,
    )
    state = EdgeState(settings, watcher, backends, gate, responses)
    try:
        state.background = background.build_queue(settings, requeue=runs_jobs)
        state.objects = open_objects(settings)
        state.batches = batch_records.build_queue(settings, requeue=runs_jobs)
        yield state
    finally:
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
        for part in (state.batches, state.objects, state.background):
            if part is not None:
                await part.close()
        await backends.close()
        await gate.close()
        await responses.close()
        await catalog_channel.close()
