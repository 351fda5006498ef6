"""The edge application: endpoint routers, the one middleware, error handlers, lifespan (which starts no
worker loops: the jobs process runs the queued work, see modelplex_edge.jobs)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from modelplex_edge import hot_routes, ops
from modelplex_edge.admission import Admission
from modelplex_edge.build import build_state
from modelplex_edge.endpoints import BODY_LIMITS, ROUTERS, UPLOAD_PATHS
from modelplex_edge.errors import install_error_handlers
from modelplex_edge.jobs.demand import JobsDemand
from modelplex_edge.middleware import EdgeMiddleware
from modelplex_edge.settings import EdgeSettings
from modelplex_kit.looplag import LoopLagMonitor, freeze_startup_heap

log = logging.getLogger(__name__)


def create_app(settings: EdgeSettings, admission: Admission | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        """The shared parts (modelplex_edge.build); no worker loops: batches and background responses are
        queued here and run by the jobs process (``python -m modelplex_edge.jobs``)."""
        lag = app.state.loop_lag = LoopLagMonitor().start()
        async with build_state(settings, admission) as state:
            app.state.edge = state
            # Queued work reported to the scaler (key "jobs"), poked at each enqueue: a jobs Deployment at
            # zero replicas starts at once. No target: nothing is reported or sampled.
            state.jobs_demand = JobsDemand(
                {"background": state.background, "batches": state.batches},
                settings.demand_target,
                summary_seconds=settings.outage_summary_seconds,
            )
            state.jobs_demand.start()
            try:
                await asyncio.wait_for(state.catalog.ready.wait(), settings.catalog_wait_seconds)
            except TimeoutError:
                log.warning("no catalog yet; model requests get 503 until it answers")
            freeze_startup_heap()
            try:
                yield
            finally:
                await state.jobs_demand.close()
        await lag.stop()

    app = FastAPI(
        title="Modelplex",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        # EdgeMiddleware owns the request span and metrics; FastAPI's own would double them.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    for router in (*ROUTERS, ops.router):
        app.include_router(router)
    hot_routes.install(app, ROUTERS)
    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["x-request-id", "retry-after", "retry-after-ms", "x-ratelimit-*"],
            max_age=600,
        )
    app.add_middleware(
        EdgeMiddleware,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_seconds=settings.body_timeout_seconds,
        body_deadline_seconds=settings.body_deadline_seconds,
        upload_paths=UPLOAD_PATHS,
        max_upload_bytes=settings.max_upload_bytes,
        body_limits={path: limit(settings) for path, limit in BODY_LIMITS.items()},
    )
    return app
