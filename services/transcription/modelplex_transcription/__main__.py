"""python -m modelplex_transcription: serve TranscriptionService over the configured engine."""

from __future__ import annotations

from modelplex.v1 import transcription_pb2, transcription_pb2_grpc
from modelplex_kit.grpc_server import run, serve
from modelplex_transcription.adapters import engine_settings, load_engine
from modelplex_transcription.decode import Limits
from modelplex_transcription.servicer import TranscriptionServicer
from modelplex_transcription.settings import TranscriptionSettings


async def main(settings: TranscriptionSettings) -> None:
    engine = load_engine(settings)
    limits = Limits(settings.max_audio_seconds, settings.decode_timeout_seconds)

    def register(server):
        servicer = TranscriptionServicer(engine, limits, settings.max_queue)
        transcription_pb2_grpc.add_TranscriptionServiceServicer_to_server(servicer, server)
        return [transcription_pb2.DESCRIPTOR.services_by_name["TranscriptionService"].full_name]

    await serve("transcription", settings, register, on_shutdown=engine.close, ready=getattr(engine, "ready", None))


if __name__ == "__main__":
    settings = engine_settings(TranscriptionSettings())
    run("transcription", settings, lambda: main(settings))
