"""The catalog marks each model ready or not from its backend's grpc.health, and publishes changes."""

import asyncio
from pathlib import Path

import grpc

from modelplex_catalog.readiness import ReadinessFollower, resolve
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


async def test_a_model_is_ready_while_any_of_its_backend_replicas_serves(tmp_path: Path):
    """A target with several replicas (as the edge reaches a headless Service's pods): the model
    follows every replica's grpc.health, not only the first address's."""
    first, second = free_port(), free_port()
    target = f"ipv4:127.0.0.1:{first},127.0.0.1:{second}"
    path = tmp_path / "catalog.yaml"
    path.write_text("models:" + ENTRY.format(id="pooled", backend=f'"{target}"'))
    store = CatalogStore(path)
    up = {first: False, second: False}

    def serve(port: int) -> asyncio.Task:
        async def ready() -> bool:
            return up[port]

        settings = GrpcServiceSettings(listen=f"127.0.0.1:{port}", grace_seconds=0.2, ready_poll_seconds=0.05)
        return asyncio.create_task(grpc_server.serve("text", settings, lambda server: [], ready=ready))

    backends = [serve(first), serve(second)]
    follower = asyncio.create_task(ReadinessFollower(store, retry_seconds=0.2).run())
    try:
        down = await _until(store, "pooled", False)
        assert down.ready_reason.endswith("(none of 2 replicas serving)"), down.ready_reason
        up[second] = True  # only the second address: pick_first on the first would never see it
        await _until(store, "pooled", True)
        up[second] = False
        assert (await _until(store, "pooled", False)).ready_reason == (
            "backend NOT_SERVING (none of 2 replicas serving)"
        )
    finally:
        follower.cancel()
        for task in backends:
            task.cancel()
        await asyncio.gather(follower, *backends, return_exceptions=True)


async def test_a_name_resolves_to_every_address_behind_it():
    assert await resolve("ipv4:10.0.0.1:50051,10.0.0.2:50051") == ["ipv4:10.0.0.1:50051", "ipv4:10.0.0.2:50051"]
    assert await resolve("dns:///127.0.0.1:7000") == ["ipv4:127.0.0.1:7000"]
    assert await resolve("localhost:7000") in (
        ["ipv4:127.0.0.1:7000"],
        ["ipv4:127.0.0.1:7000", "ipv6:[::1]:7000"],
        ["ipv6:[::1]:7000", "ipv4:127.0.0.1:7000"],
    )
    assert await resolve("unix:///run/text.sock") == ["unix:///run/text.sock"]
