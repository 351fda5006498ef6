"""Trace context crosses the gRPC hop: the backend's span is a child of the caller's."""

import asyncio

import grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from modelplex.v1 import catalog_pb2, catalog_pb2_grpc
from modelplex_kit import grpc_server
from modelplex_kit.settings import GrpcServiceSettings
from modelplex_kit.telemetry import outgoing_metadata
from tests.support.ports import free_port


class Servicer(catalog_pb2_grpc.CatalogServiceServicer):
    async def ListModels(self, request, context):
        return catalog_pb2.ListModelsResponse()


async def test_backend_span_joins_the_callers_trace():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    grpc_server._tracer = provider.get_tracer("modelplex.grpc")  # the server's spans go to this provider too

    address = f"127.0.0.1:{free_port()}"

    def register(server):
        catalog_pb2_grpc.add_CatalogServiceServicer_to_server(Servicer(), server)
        return ["modelplex.v1.CatalogService"]

    serving = asyncio.create_task(
        grpc_server.serve("t", GrpcServiceSettings(listen=address, grace_seconds=0), register)
    )
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            await channel.channel_ready()
            with tracer.start_as_current_span("edge request") as edge_span:
                metadata = outgoing_metadata("req-7")
                await catalog_pb2_grpc.CatalogServiceStub(channel).ListModels(
                    catalog_pb2.ListModelsRequest(), metadata=metadata
                )
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        grpc_server._tracer = trace.get_tracer("modelplex.grpc")
    server_span = next(s for s in exporter.get_finished_spans() if s.name.endswith("/ListModels"))
    assert server_span.context.trace_id == edge_span.get_span_context().trace_id
    assert server_span.parent.span_id == edge_span.get_span_context().span_id
    assert dict(metadata)["x-request-id"] == "req-7" and "traceparent" in dict(metadata)
