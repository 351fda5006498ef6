"""Operational routes: liveness, readiness and Prometheus metrics (not part of the public API)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

router = APIRouter(include_in_schema=False)


@router.get("/healthz")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    state = request.app.state.edge
    if state.drain.fired:
        return Response(b'{"status":"draining"}', status_code=503, media_type="application/json")
    if state.catalog.ready.is_set():
        return Response(b'{"status":"ready"}', media_type="application/json")
    return Response(b'{"status":"waiting for the catalog"}', status_code=503, media_type="application/json")


@router.get("/metrics")
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
