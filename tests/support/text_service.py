"""The text backend's real gRPC service (its servicer and the production interceptor that maps errors) over
an engine, in process on a free loopback port: what the adapter and engine tests call through."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from modelplex.v1 import text_pb2_grpc
from modelplex_kit.grpc_server import ObservingInterceptor
from modelplex_text.engine import TextEngine
from modelplex_text.servicer import TextGenerationServicer


@asynccontextmanager
async def text_service(engine: TextEngine) -> AsyncIterator[text_pb2_grpc.TextGenerationServiceStub]:
    server = grpc.aio.server(interceptors=[ObservingInterceptor()])
    text_pb2_grpc.add_TextGenerationServiceServicer_to_server(TextGenerationServicer(engine), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield text_pb2_grpc.TextGenerationServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(None)
