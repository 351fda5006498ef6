"""python -m modelplex_speech: serve SpeechService over the configured engine."""

from __future__ import annotations

from modelplex.v1 import speech_pb2, speech_pb2_grpc
from modelplex_kit.grpc_server import run, serve
from modelplex_speech.adapters import engine_settings, load_engine
from modelplex_speech.servicer import SpeechServicer
from modelplex_speech.settings import SpeechSettings


async def main(settings: SpeechSettings) -> None:
    engine = load_engine(settings)

    def register(server):
        speech_pb2_grpc.add_SpeechServiceServicer_to_server(SpeechServicer(engine, settings.max_queue), server)
        return [speech_pb2.DESCRIPTOR.services_by_name["SpeechService"].full_name]

    await serve("speech", settings, register, on_shutdown=engine.close, ready=getattr(engine, "ready", None))


if __name__ == "__main__":
    settings = engine_settings(SpeechSettings())
    run("speech", settings, lambda: main(settings))
