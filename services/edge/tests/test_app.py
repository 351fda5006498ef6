"""The edge app in-process (no backends): CORS, limits and error shapes."""

import httpx

from modelplex_edge.app import create_app
from modelplex_edge.settings import EdgeSettings


def client(**settings) -> httpx.AsyncClient:
    app = create_app(EdgeSettings(**settings))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge")


PREFLIGHT = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}


async def test_cors_allows_only_configured_origins():
    async with client(cors_origins=["https://app.example"]) as open_edge:
        response = await open_edge.options("/v1/chat/completions", headers=PREFLIGHT)
        assert response.headers["access-control-allow-origin"] == "https://app.example"
    async with client() as closed_edge:
        response = await closed_edge.options("/v1/chat/completions", headers=PREFLIGHT)
        assert "access-control-allow-origin" not in response.headers


async def test_declared_oversized_body_is_413_before_anything_else():
    async with client(max_body_bytes=10) as edge:
        response = await edge.post("/v1/chat/completions", content=b"x" * 11)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert response.headers["x-request-id"]


async def test_health_needs_no_key():
    async with client() as edge:
        assert (await edge.get("/healthz")).status_code == 200


async def test_an_unexpected_failure_is_a_500_envelope_that_keeps_the_request_id():
    # Without its lifespan the app has no state, so the route fails unexpectedly.
    async with client() as edge:
        response = await edge.get("/v1/models", headers={"Authorization": "Bearer k", "x-request-id": "req-500"})
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error" and "Traceback" not in response.text
    assert response.headers["x-request-id"] == "req-500"
