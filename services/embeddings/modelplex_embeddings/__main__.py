"""python -m modelplex_embeddings: serve EmbeddingsService over the configured engine."""

from __future__ import annotations

from modelplex.v1 import embeddings_pb2, embeddings_pb2_grpc
from modelplex_embeddings.adapters import engine_settings, load_engine
from modelplex_embeddings.servicer import EmbeddingsServicer
from modelplex_embeddings.settings import EmbeddingsSettings
from modelplex_kit.grpc_server import run, serve


async def main(settings: EmbeddingsSettings) -> None:
    engine = load_engine(settings)
    servicer = EmbeddingsServicer(engine, settings.batching)

    def register(server):
        embeddings_pb2_grpc.add_EmbeddingsServiceServicer_to_server(servicer, server)
        return [embeddings_pb2.DESCRIPTOR.services_by_name["EmbeddingsService"].full_name]

    await serve("embeddings", settings, register, on_shutdown=servicer.close, ready=getattr(engine, "ready", None))


if __name__ == "__main__":
    settings = engine_settings(EmbeddingsSettings())
    run("embeddings", settings, lambda: main(settings))
