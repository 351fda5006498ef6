"""python -m modelplex_text: serve TextGenerationService over the configured engine."""

from __future__ import annotations

from modelplex.v1 import text_pb2, text_pb2_grpc
from modelplex_kit.grpc_server import run, serve
from modelplex_text.adapters import engine_entry, load_engine
from modelplex_text.servicer import TextGenerationServicer
from modelplex_text.settings import TextSettings


async def main(settings: TextSettings) -> None:
    engine = load_engine(settings)

    def register(server):
        text_pb2_grpc.add_TextGenerationServiceServicer_to_server(TextGenerationServicer(engine), server)
        return [text_pb2.DESCRIPTOR.services_by_name["TextGenerationService"].full_name]

    await serve("text", settings, register, on_shutdown=engine.close, ready=getattr(engine, "ready", None))


if __name__ == "__main__":
    # The chosen engine's own model: it reads the common settings and that engine's knobs.
    settings = engine_entry(TextSettings().engine).settings()
    run("text", settings, lambda: main(settings))
