"""The edge application: endpoint routers, the one middleware, error handlers, lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from modelplex_edge import hot_routes, ops
from modelplex_edge.admission import Admission, DevKeyAdmission
from modelplex_edge.backends import Backends, channel
from modelplex_edge.catalog_client import CatalogWatcher
from modelplex_edge.endpoints import BODY_LIMITS, ROUTERS, UPLOAD_PATHS
from modelplex_edge.endpoints.batches import records as batch_records
from modelplex_edge.endpoints.batches.worker import BatchWorker
from modelplex_edge.endpoints.files.store import open_objects
from modelplex_edge.endpoints.responses import background
from modelplex_edge.endpoints.responses.router import ENDPOINT as RESPONSES
from modelplex_edge.endpoints.responses.store import build_store
from modelplex_edge.errors import install_error_handlers
from modelplex_edge.gatekeeper_client import GatekeeperAdmission
from modelplex_edge.middleware import EdgeMiddleware
from modelplex_edge.settings import EdgeSettings
from modelplex_edge.state import EdgeState
from modelplex_kit.looplag import LoopLagMonitor, freeze_startup_heap

log = logging.getLogger(__name__)


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


def create_app(settings: EdgeSettings, admission: Admission | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        lag = app.state.loop_lag = LoopLagMonitor().start()
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
        state = app.state.edge = EdgeState(settings, watcher, backends, gate, responses)
        state.background = background.build_queue(settings)
        if settings.responses_background_workers:
            state.worker = background.BackgroundWorker(state, RESPONSES)
            state.worker.start()
        state.objects = open_objects(settings)
        state.batches = batch_records.build_queue(settings)
        if settings.batches_workers:
            state.batch_worker = BatchWorker(state)
            state.batch_worker.start()
        try:
            await asyncio.wait_for(watcher.ready.wait(), settings.catalog_wait_seconds)
        except TimeoutError:
            log.warning("no catalog yet; model requests get 503 until it answers")
        freeze_startup_heap()
        yield
        following.cancel()
        if state.worker is not None:
            await state.worker.stop()
        if state.batch_worker is not None:
            await state.batch_worker.stop()
        await state.batches.close()
        await state.objects.close()
        await state.background.close()
        await backends.close()
        await gate.close()
        await responses.close()
        await catalog_channel.close()
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
