"""The edge app in-process (no backends): CORS, limits and error shapes."""

import asyncio
import time

import httpx
from starlette.responses import Response

from modelplex_edge.app import create_app
from modelplex_edge.middleware import EdgeMiddleware
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


async def test_a_body_trickled_within_the_gap_timeout_is_cut_at_the_body_deadline():
    # Regression: only the gap between pieces was timed, so a byte every few seconds was never cut.
    async def app(scope, receive, send) -> None:
        while (await receive()).get("more_body"):
            pass
        await Response("read it all")(scope, receive, send)

    async def trickle() -> dict:
        await asyncio.sleep(0.1)
        return {"type": "http.request", "body": b"x", "more_body": True}

    sent: list[dict] = []

    async def send(message) -> None:
        sent.append(message)

    edge = EdgeMiddleware(app, max_body_bytes=10**6, body_timeout_seconds=30, body_deadline_seconds=1.5)
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    started = time.monotonic()
    await asyncio.wait_for(edge(scope, trickle, send), 60)
    assert 1.4 <= time.monotonic() - started < 30
    assert sent[0]["status"] == 408
    assert b"whole request body was not received within 1.5 seconds" in sent[1]["body"]


async def test_an_upload_endpoint_with_its_own_limit_gets_it():
    """/v1/files takes 200 MB; the other upload endpoints keep max_upload_bytes; the rest max_body_bytes."""

    async def app(scope, receive, send) -> None:
        while (await receive()).get("more_body"):
            pass
        await Response("ok")(scope, receive, send)

    edge = EdgeMiddleware(
        app,
        max_body_bytes=10,
        upload_paths=frozenset({"/up", "/files"}),
        max_upload_bytes=100,
        body_limits={"/files": 1000},
    )

    async def status(path: str, size: int) -> int:
        sent: list[dict] = []

        async def send(message) -> None:
            sent.append(message)

        async def receive() -> dict:
            return {"type": "http.request", "body": b"x" * size, "more_body": False}

        headers = [(b"content-length", str(size).encode())]
        await edge({"type": "http", "method": "POST", "path": path, "headers": headers}, receive, send)
        return sent[0]["status"]

    assert await status("/files", 900) == 200
    assert await status("/files", 1001) == 413
    assert await status("/up", 900) == 413
    assert await status("/up", 90) == 200
    assert await status("/v1/chat/completions", 90) == 413


async def test_the_body_is_read_in_the_requests_own_task_and_a_slow_piece_is_a_408():
    """The body's read timeouts add no task per receive() (wait_for would run each in one of its own)."""
    tasks: set = set()

    async def app(scope, receive, send) -> None:
        tasks.add(asyncio.current_task())
        while (await receive()).get("more_body"):
            pass
        await Response("read it all")(scope, receive, send)

    def pieces(gap: float):
        left = [b"a", b"b", b"c"]

        async def receive() -> dict:
            tasks.add(asyncio.current_task())
            await asyncio.sleep(gap)
            body = left.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(left)}

        return receive

    sent: list[dict] = []

    async def send(message) -> None:
        sent.append(message)

    edge = EdgeMiddleware(app, max_body_bytes=10**6, body_timeout_seconds=0.5, body_deadline_seconds=30)
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    await edge(scope, pieces(0.01), send)
    assert sent[0]["status"] == 200 and len(tasks) == 1
    sent.clear()
    await asyncio.wait_for(edge(scope, pieces(2.0), send), 30)
    assert sent[0]["status"] == 408
