"""Health follows a readiness probe: NOT_SERVING until the engine answers, and whenever it stops."""

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelplex_kit import grpc_server
from modelplex_kit.settings import GrpcServiceSettings
from tests.support.ports import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _status(address: str) -> int | None:
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
            return reply.status
    except grpc.aio.AioRpcError:
        return None


async def _until(address: str, wanted: int, seconds: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while (status := await _status(address)) != wanted:
        assert asyncio.get_running_loop().time() < deadline, f"health stayed {status}, wanted {wanted}"
        await asyncio.sleep(0.05)


async def test_health_follows_the_engine_probe():
    address = f"127.0.0.1:{free_port()}"
    settings = GrpcServiceSettings(listen=address, grace_seconds=0.2, ready_poll_seconds=0.05)
    engine_up = False
    probes = 0

    async def ready() -> bool:
        nonlocal probes
        probes += 1
        return engine_up

    task = asyncio.create_task(grpc_server.serve("test", settings, lambda server: [], ready=ready))
    try:
        await _until(address, NOT_SERVING)
        engine_up = True
        await _until(address, SERVING)
        engine_up = False  # the engine died: the pod must leave the Service's endpoints
        await _until(address, NOT_SERVING)
        assert probes >= 3
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_without_a_probe_the_server_is_serving_at_once():
    address = f"127.0.0.1:{free_port()}"
    task = asyncio.create_task(grpc_server.serve("test", GrpcServiceSettings(listen=address), lambda server: []))
    try:
        await _until(address, SERVING)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
