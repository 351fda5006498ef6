"""The shared server bootstrap: error mapping, request ids and health, on a real gRPC server."""

import asyncio
import gc
import json
import logging
import weakref

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from modelplex.v1 import catalog_pb2, catalog_pb2_grpc
from modelplex_kit import grpc_server
from modelplex_kit.errors import ServiceError, invalid
from modelplex_kit.logging import JsonFormatter, request_id_var
from modelplex_kit.settings import GrpcServiceSettings
from tests.support.ports import free_port
from tests.support.until import until

seen_request_ids: list[str] = []
# What refused calls held in their frames, watched through weak references.
held_by_refused_calls: list[weakref.ref] = []


class _Held:
    """Stands for what a refused call held (a request's tokenizer output, decoded audio)."""


class Servicer(catalog_pb2_grpc.CatalogServiceServicer):
    async def ResolveModel(self, request, context):
        seen_request_ids.append(request_id_var.get())
        if request.model == "bad":
            raise invalid("bad model name", "model")
        if request.model == "crash":
            raise RuntimeError("secret internal detail")
        if request.model == "holding":
            held = _Held()
            held_by_refused_calls.append(weakref.ref(held))
            raise invalid("refused while holding something", "model")
        if request.model == "holding-in-a-future":
            # As the transcription engine does: a worker's Future fails, and the frame awaiting it
            # keeps the Future, which keeps the failure, whose traceback keeps the frame.
            held = _Held()
            held_by_refused_calls.append(weakref.ref(held))
            work = asyncio.get_running_loop().create_future()
            work.set_exception(invalid("the worker refused it", "model"))
            await work
        return catalog_pb2.ResolveModelResponse(model=catalog_pb2.Model(id=request.model))

    async def WatchModels(self, request, context):
        yield catalog_pb2.WatchModelsResponse(revision=1)
        raise invalid("stream broke", "x")


@pytest.fixture(scope="module")
async def target():
    address = f"127.0.0.1:{free_port()}"
    settings = GrpcServiceSettings(listen=address, grace_seconds=0.5)

    def register(server):
        catalog_pb2_grpc.add_CatalogServiceServicer_to_server(Servicer(), server)
        return ["modelplex.v1.CatalogService"]

    task = asyncio.create_task(grpc_server.serve("test", settings, register))
    for _ in range(50):
        await asyncio.sleep(0.05)
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                break
        except grpc.aio.AioRpcError:
            continue
    yield address
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_service_error_becomes_status_with_param(target):
    async with grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await catalog_pb2_grpc.CatalogServiceStub(channel).ResolveModel(
                catalog_pb2.ResolveModelRequest(model="bad")
            )
    error = ServiceError.from_rpc_error(err.value)
    assert (error.status, error.param) == (grpc.StatusCode.INVALID_ARGUMENT, "model")


async def test_unexpected_exception_is_internal_without_details(target):
    async with grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await catalog_pb2_grpc.CatalogServiceStub(channel).ResolveModel(
                catalog_pb2.ResolveModelRequest(model="crash")
            )
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in err.value.details() and "Traceback" not in err.value.details()


async def test_streaming_errors_are_mapped_too(target):
    async with grpc.aio.insecure_channel(target) as channel:
        call = catalog_pb2_grpc.CatalogServiceStub(channel).WatchModels(catalog_pb2.WatchModelsRequest())
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_refused_call_releases_what_it_held_without_waiting_for_the_cycle_collector(target):
    # Before: context.abort's AbortError kept the failure (and its frames) in the call's state,
    # a reference cycle that only Python's rare full collection freed; the embeddings backend
    # grew ~200 MB per refused 2048-input request that way. Reference counting alone must do.
    gc.disable()
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ResolveModel(catalog_pb2.ResolveModelRequest(model="holding"))
                assert ServiceError.from_rpc_error(err.value).param == "model"
        await until(lambda: all(ref() is None for ref in held_by_refused_calls), timeout=10)
    finally:
        gc.enable()
    assert len(held_by_refused_calls) == 3


async def test_a_failure_kept_by_a_future_does_not_keep_the_call_either(target):
    held_by_refused_calls.clear()
    gc.disable()
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = catalog_pb2_grpc.CatalogServiceStub(channel)
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.ResolveModel(catalog_pb2.ResolveModelRequest(model="holding-in-a-future"))
        await until(lambda: all(ref() is None for ref in held_by_refused_calls), timeout=10)
    finally:
        gc.enable()
    assert len(held_by_refused_calls) == 3


async def test_request_id_from_metadata_reaches_handlers(target):
    async with grpc.aio.insecure_channel(target) as channel:
        await catalog_pb2_grpc.CatalogServiceStub(channel).ResolveModel(
            catalog_pb2.ResolveModelRequest(model="m"), metadata=(("x-request-id", "req-42"),)
        )
    assert seen_request_ids[-1] == "req-42"


async def test_health_reports_serving_for_the_server_and_each_service(target):
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "modelplex.v1.CatalogService"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_json_logs_carry_the_request_id():
    token = request_id_var.set("abc123")
    try:
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
        line = json.loads(JsonFormatter("edge").format(record))
    finally:
        request_id_var.reset(token)
    assert line["msg"] == "hello world" and line["request_id"] == "abc123" and line["service"] == "edge"


def test_connections_are_aged_out_so_new_backend_pods_are_found():
    from modelplex_kit.grpc_server import server_options
    from modelplex_kit.settings import GrpcServiceSettings

    options = dict(server_options(GrpcServiceSettings(max_connection_age_seconds=120, grace_seconds=30)))
    assert options["grpc.max_connection_age_ms"] == 120_000
    # Calls on an aged-out connection get the longest call's time, not the (short) drain grace.
    assert options["grpc.max_connection_age_grace_ms"] == 600_000
    assert "grpc.max_connection_age_ms" not in dict(server_options(GrpcServiceSettings(max_connection_age_seconds=0)))


async def test_a_service_measures_its_event_loops_lag(target):
    """Every asyncio service exports its loop's lag (modelplex_kit.looplag) from the moment it serves."""

    def ticks() -> float:
        return REGISTRY.get_sample_value("modelplex_event_loop_lag_seconds_count") or 0.0

    before = ticks()
    await until(lambda: ticks() >= before + 2, 10, what="two loop-lag ticks")
