"""The hot endpoints are dispatched by exact path, ahead of the router, and answer as before."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest
from fastapi import APIRouter, Depends, Request
from fastapi.routing import APIRoute
from prometheus_client import REGISTRY

from modelplex_edge.admission import DevKeyAdmission
from modelplex_edge.app import create_app
from modelplex_edge.endpoints import ROUTERS
from modelplex_edge.hot_routes import HOT_PATHS, hot_routes
from modelplex_edge.settings import EdgeSettings

KEY = "sk-hot-routes"


def client() -> httpx.AsyncClient:
    app = create_app(EdgeSettings())
    app.state.edge = SimpleNamespace(admission=DevKeyAdmission(KEY), settings=EdgeSettings())  # enough for refusals
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge")


def handled(route: str, status: str) -> float:
    labels = {"route": route, "status": status}
    return REGISTRY.get_sample_value("modelplex_http_requests_total", labels) or 0.0


@pytest.fixture
def route_matches(monkeypatch) -> list[str]:
    """The paths the router's route matching looked at."""
    seen: list[str] = []
    original = APIRoute.matches

    def counted(self, scope):
        seen.append(self.path)
        return original(self, scope)

    monkeypatch.setattr(APIRoute, "matches", counted)
    return seen


@pytest.mark.parametrize("path", sorted(HOT_PATHS))
async def test_a_hot_post_skips_route_matching_and_keeps_its_errors_and_metrics(path, route_matches):
    before = handled(path, "400")
    async with client() as edge:
        bad = await edge.post(path, content=b"{}", headers={"Authorization": f"Bearer {KEY}", "x-request-id": "hot"})
        wrong_key = await edge.post(path, content=b"{}", headers={"Authorization": "Bearer nope"})
    assert route_matches == []
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "model"
    assert bad.headers["x-request-id"] == "hot"
    assert wrong_key.status_code == 401 and wrong_key.json()["error"]["code"] == "invalid_api_key"
    assert handled(path, "400") == before + 1  # labelled by its route, as the router labels it


async def test_other_methods_and_paths_still_go_through_the_router(route_matches):
    async with client() as edge:
        wrong_method = await edge.get("/v1/chat/completions")
        slash = await edge.post("/v1/chat/completions/", content=b"{}")
        health = await edge.get("/healthz")
    assert route_matches  # the router did the matching
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    assert slash.status_code == 307  # the router's trailing-slash redirect, as before
    assert health.status_code == 200


def test_every_hot_path_is_found_and_an_endpoint_with_a_dependency_is_refused():
    assert set(hot_routes(ROUTERS)) == HOT_PATHS
    router = APIRouter()

    @router.post("/v1/embeddings")
    async def with_dependency(http: Request, user: str = Depends(lambda: "x")) -> None: ...

    with pytest.raises(TypeError, match="/v1/embeddings"):
        hot_routes([router])
