"""Connection ageing and keepalive (modelplex_kit.connections), on real gRPC servers and clients."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelplex.v1 import catalog_pb2, catalog_pb2_grpc
from modelplex_kit import grpc_server
from modelplex_kit.connections import KEEPALIVE, Keepalive
from modelplex_kit.settings import GrpcServiceSettings
from tests.support.ports import free_port

AGE_SECONDS = 1.0
HELD_SECONDS = 6.0  # several age-outs


class Slow(catalog_pb2_grpc.CatalogServiceServicer):
    """A stream and a unary call that each run for HELD_SECONDS."""

    async def WatchModels(self, request, context):
        started = time.monotonic()
        revision = 0
        while time.monotonic() - started < HELD_SECONDS:
            revision += 1
            yield catalog_pb2.WatchModelsResponse(revision=revision)
            await asyncio.sleep(0.25)

    async def ResolveModel(self, request, context):
        await asyncio.sleep(HELD_SECONDS)
        return catalog_pb2.ResolveModelResponse(model=catalog_pb2.Model(id=request.model))


class Silent(catalog_pb2_grpc.CatalogServiceServicer):
    """A stream that says nothing for HELD_SECONDS: only keepalive pings cross its connection."""

    async def WatchModels(self, request, context):
        await asyncio.sleep(HELD_SECONDS)
        yield catalog_pb2.WatchModelsResponse(revision=1)


async def _serving(settings: GrpcServiceSettings) -> asyncio.Task:
    def register(server):
        catalog_pb2_grpc.add_CatalogServiceServicer_to_server(Slow(), server)
        return ["modelplex.v1.CatalogService"]

    task = asyncio.create_task(grpc_server.serve("test", settings, register))

    async def healthy() -> bool:
        try:
            async with grpc.aio.insecure_channel(settings.listen) as channel:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
            return True
        except grpc.aio.AioRpcError:
            return False

    deadline = time.monotonic() + 20
    while not await healthy():
        assert time.monotonic() < deadline, "the test server did not start"
        await asyncio.sleep(0.05)
    return task


@pytest.fixture
async def ageing_server():
    """Connections aged out every second, with a drain grace far shorter than the calls."""
    settings = GrpcServiceSettings(
        listen=f"127.0.0.1:{free_port()}", max_connection_age_seconds=AGE_SECONDS, grace_seconds=0.5
    )
    task = await _serving(settings)
    yield settings.listen
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_long_stream_outlives_several_age_outs(ageing_server):
    async with grpc.aio.insecure_channel(ageing_server, options=KEEPALIVE.client_options()) as channel:
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        started = time.monotonic()
        revisions = [update.revision async for update in stub.WatchModels(catalog_pb2.WatchModelsRequest())]
        assert time.monotonic() - started >= HELD_SECONDS
        assert revisions == list(range(1, len(revisions) + 1)) and len(revisions) >= HELD_SECONDS / 0.25 - 2
        # The connection was aged out meanwhile: new calls still work (on a new connection).
        watch = stub.WatchModels(catalog_pb2.WatchModelsRequest())
        assert (await watch.read()).revision == 1
        watch.cancel()


async def test_a_long_unary_call_outlives_several_age_outs(ageing_server):
    async with grpc.aio.insecure_channel(ageing_server, options=KEEPALIVE.client_options()) as channel:
        reply = await catalog_pb2_grpc.CatalogServiceStub(channel).ResolveModel(
            catalog_pb2.ResolveModelRequest(model="m"), timeout=60
        )
    assert reply.model.id == "m"


def test_every_server_and_the_edge_use_the_one_keepalive_policy():
    from modelplex_edge.backends import _CHANNEL_OPTIONS

    server = dict(grpc_server.server_options(GrpcServiceSettings()))
    assert all(server[name] == value for name, value in KEEPALIVE.server_options())
    client = dict(_CHANNEL_OPTIONS)
    assert all(client[name] == value for name, value in KEEPALIVE.client_options())
    # The server accepts pings at least as often as the client sends them, with or without calls.
    assert server["grpc.http2.min_ping_interval_without_data_ms"] <= client["grpc.keepalive_time_ms"]
    assert server["grpc.keepalive_permit_without_calls"] == client["grpc.keepalive_permit_without_calls"] == 1


async def _hold_silent_stream(server_options: list, policy: Keepalive) -> catalog_pb2.WatchModelsResponse:
    server = grpc.aio.server(options=server_options)
    catalog_pb2_grpc.add_CatalogServiceServicer_to_server(Silent(), server)
    target = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(target)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(target, options=policy.client_options()) as channel:
            call = catalog_pb2_grpc.CatalogServiceStub(channel).WatchModels(catalog_pb2.WatchModelsRequest())
            return await call.read()
    finally:
        await server.stop(0)


# The same policy, scaled down so a test sees many pings: one ping every 200 ms over a silent 6 s stream.
FAST = Keepalive(interval_ms=200, timeout_ms=5_000)


async def test_the_servers_accept_the_clients_keepalive_pings():
    reply = await _hold_silent_stream(FAST.server_options(), FAST)
    assert reply.revision == 1


async def test_a_server_with_grpc_defaults_refuses_them():
    # What the servers did before they shared the policy: GOAWAY too_many_pings, and the call dies.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _hold_silent_stream([], FAST)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE

