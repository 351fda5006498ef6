"""A stand-in Kubernetes API server (aiohttp) that replays recorded list/watch traffic.

One `Replay` per collection (Models by default; EndpointSlices, Pods, InferencePools for the
engine pools' discovery), several served side by side. Each GET without `watch` answers the next
recorded list; each watch request plays the next
recorded stream: JSON lines as the API server writes them, ending in a held-open stream, a
dropped connection or an `ERROR` 410 Gone event. Status PATCHes are recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

PREFIX = "/apis/modelplex.io/v1alpha1/namespaces/{namespace}/models"
ENDPOINT_SLICES = "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
PODS = "/api/v1/namespaces/{namespace}/pods"
INFERENCE_POOLS = "/apis/inference.networking.k8s.io/v1/namespaces/{namespace}/inferencepools"

DROP, HOLD, LIVE = "drop", "hold", "live"


def model(name: str, rv: int, created: str = "2026-01-01T00:00:00Z", generation: int = 1, **spec: Any) -> dict:
    spec = {
        "modality": "text",
        "backend": f"{name}:50061",
        "engine": {"kind": "openai"},
        "capabilities": ["chat"],
    } | spec
    return {
        "apiVersion": "modelplex.io/v1alpha1",
        "kind": "Model",
        "metadata": {
            "name": name,
            "namespace": "ml",
            "uid": f"uid-{name}",
            "resourceVersion": str(rv),
            "generation": generation,
            "creationTimestamp": created,
        },
        "spec": spec,
    }


def event(kind: str, obj: dict) -> dict:
    return {"type": kind, "object": obj}


def gone(rv: int) -> dict:
    status = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f"too old resource version: {rv} (40)",
        "reason": "Expired",
        "code": 410,
    }
    return {"type": "ERROR", "object": status}


@dataclass
class Replay:
    lists: list[tuple[int, list[dict]]]
    streams: list[list[Any]]
    requests: list[dict[str, str]] = field(default_factory=list)
    patches: list[tuple[str, dict]] = field(default_factory=list)
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    live: asyncio.Queue = field(default_factory=asyncio.Queue)
    #: the collection's URL path, with `{namespace}`
    path: str = PREFIX
    list_kind: str = "ModelList"

    def app(self) -> web.Application:
        app = web.Application()
        self.add_routes(app)
        return app

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(self.path, self._get)
        app.router.add_patch(self.path + "/{name}/status", self._patch)

    async def _get(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        self.requests.append(query)
        if query.get("watch", "").lower() not in ("true", "1"):
            rv, items = self.lists.pop(0)
            return web.json_response(
                {
                    "kind": self.list_kind,
                    "metadata": {"resourceVersion": str(rv)},
                    "items": items,
                }
            )
        steps = self.streams.pop(0) if self.streams else [HOLD]
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for step in steps:
            if step == DROP:  # the connection dies mid-stream, as when the API server restarts
                request.transport.abort()
                return response
            if step == LIVE:  # events the test pushes into `live` while the watch is open
                while (pushed := await self.live.get()) is not None:
                    await response.write(json.dumps(pushed).encode() + b"\n")
                continue
            if step == HOLD:  # an idle watch, until the test stops the server
                await self.closing.wait()
                return response
            try:
                await response.write(json.dumps(step).encode() + b"\n")
            except ConnectionResetError:  # the client hung up (after an ERROR event it must)
                return response
            await asyncio.sleep(0.02)
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()  # a watch that timed out server-side
        return response

    async def _patch(self, request: web.Request) -> web.Response:
        # A merge patch: our one condition replaces the list; a JSON patch would need operations.
        assert request.content_type == "application/merge-patch+json", request.content_type
        body = await request.json()
        self.patches.append((request.match_info["name"], body))
        return web.json_response(body)


async def serve(replay: Replay | list[Replay], port: int) -> web.AppRunner:
    """Serves ``replay`` (or several collections); set each one's ``closing`` before ``runner.cleanup()``."""
    app = web.Application()
    for one in replay if isinstance(replay, list) else [replay]:
        one.add_routes(app)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner
