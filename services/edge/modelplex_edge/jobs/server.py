"""The jobs process's HTTP side: ``/healthz``, ``/readyz`` (ready once the catalog is known, 503 while
stopping) and ``/metrics`` (Prometheus: the job queues' depth, the pipeline's per-model metrics of the work it
runs, the event loop's lag). Its lifespan builds the edge's parts (modelplex_edge.build) and runs the workers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from modelplex_edge.build import build_state
from modelplex_edge.jobs.runner import JobsRunner
from modelplex_edge.jobs.settings import JobsSettings
from modelplex_edge.settings import EdgeSettings
from modelplex_kit.looplag import LoopLagMonitor

log = logging.getLogger(__name__)

_JSON = "application/json"


def _shared(settings: EdgeSettings) -> dict[str, bool]:
    """Which queues this process can run: a memory store is each process's own, so no edge queued anything
    in this one's (the tests run JobsRunner in the edge's process for that)."""
    shared = {
        "background": settings.responses_store != "memory",
        "batches": settings.batches_store != "memory",
    }
    names = {"background": "MODELPLEX_EDGE_RESPONSES_STORE", "batches": "MODELPLEX_EDGE_BATCHES_STORE"}
    for queue, runs in shared.items():
        if not runs:
            log.warning(
                "%s is memory: that queue is the edge process's own, so this process does not run it; set sqlite "
                "or redis (as `make run` does) to run %s here",
                names[queue],
                queue,
            )
    return shared


def create_app(settings: EdgeSettings, jobs: JobsSettings) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        lag = LoopLagMonitor().start()
        async with build_state(settings, runs_jobs=True) as state:
            runner = JobsRunner(state, jobs, **_shared(settings)).start()
            app.state.edge, app.state.runner, app.state.stopping = state, runner, False
            try:
                yield
            finally:
                app.state.stopping = True
                await runner.stop()
        await lag.stop()

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type=_JSON)

    async def readyz(request: Request) -> Response:
        if request.app.state.stopping:
            return Response(b'{"status":"stopping"}', status_code=503, media_type=_JSON)
        if request.app.state.edge.catalog.ready.is_set():
            return Response(b'{"status":"ready"}', media_type=_JSON)
        return Response(b'{"status":"waiting for the catalog"}', status_code=503, media_type=_JSON)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    routes = [Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics)]
    return Starlette(routes=routes, lifespan=lifespan)
