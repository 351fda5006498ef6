"""The catalog marks each model ready or not from its backend's grpc.health, and publishes changes."""

import asyncio
from pathlib import Path

import grpc

from modelplex_catalog.readiness import ReadinessFollower
from modelplex_catalog.store import CatalogStore
from modelplex_kit import grpc_server
from modelplex_kit.settings import GrpcServiceSettings
from tests.support.ports import free_port
from tests.support.until import until

ENTRY = """
  - id: {id}
    modality: text
    backend: {backend}
    engine: {{kind: openai}}
    capabilities: [chat]
"""


async def _until(store: CatalogStore, model: str, ready: bool, seconds: float = 5.0):
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        entry = store.view.resolve(model)
        if entry.HasField("ready") and entry.ready == ready:
            return entry
        assert asyncio.get_running_loop().time() < deadline, f"{model}: {entry.ready=} {entry.ready_reason=}"
        await asyncio.sleep(0.05)


async def test_models_follow_their_backends_health(tmp_path: Path):
    live, dead = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    path = tmp_path / "catalog.yaml"
    path.write_text("models:" + ENTRY.format(id="vllm", backend=live) + ENTRY.format(id="gone", backend=dead))
    store = CatalogStore(path)
    assert not store.view.resolve("vllm").HasField("ready")  # not probed yet: routed as before
    engine_up = False

    async def ready() -> bool:
        return engine_up

    settings = GrpcServiceSettings(listen=live, grace_seconds=0.2, ready_poll_seconds=0.05)
    backend = asyncio.create_task(grpc_server.serve("text", settings, lambda server: [], ready=ready))
    follower = asyncio.create_task(ReadinessFollower(store, retry_seconds=0.2).run())
    try:
        loading = await _until(store, "vllm", False)
        assert loading.ready_reason in ("backend NOT_SERVING", "backend unreachable (UNAVAILABLE)")
        revision = store.view.revision
        engine_up = True
        assert (await _until(store, "vllm", True)).ready_reason == ""
        assert store.view.revision > revision  # watchers (the edge) get a new revision
        gone = await _until(store, "gone", False)
        assert gone.ready_reason == "backend unreachable (UNAVAILABLE)"
        engine_up = False
        assert (await _until(store, "vllm", False)).ready_reason == "backend NOT_SERVING"
        # A catalog edit keeps what is known about the backends it still names.
        path.write_text("models:" + ENTRY.format(id="vllm", backend=live))
        assert store.reload() and not store.view.resolve("vllm").ready and store.view.resolve("gone") is None
    finally:
        follower.cancel()
        backend.cancel()
        await asyncio.gather(follower, backend, return_exceptions=True)


class _Calls(grpc.aio.ServerInterceptor):
    """Records the methods a server was asked for (it answers UNIMPLEMENTED for all: no servicers)."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_service(self, continuation, handler_call_details):
        self.methods.append(handler_call_details.method)
        return await continuation(handler_call_details)


async def test_a_backend_without_grpc_health_stays_routed(tmp_path: Path):
    calls = _Calls()
    bare = grpc.aio.server(interceptors=[calls])  # answers gRPC, but has no grpc.health service
    target = f"127.0.0.1:{free_port()}"
    bare.add_insecure_port(target)
    await bare.start()
    path = tmp_path / "catalog.yaml"
    path.write_text("models:" + ENTRY.format(id="external", backend=target))
    store = CatalogStore(path)
    follower = asyncio.create_task(ReadinessFollower(store, retry_seconds=0.1).run())
    try:
        # Before, a fixed sleep and then the model's initial state: it passed even if the follower
        # never asked. Now: the follower asked, got UNIMPLEMENTED, handled it and asked again.
        await until(lambda: calls.methods.count("/grpc.health.v1.Health/Watch") >= 2, timeout=30)
        assert not store.view.resolve("external").HasField("ready")  # unknown: the edge routes it
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await bare.stop(0)
