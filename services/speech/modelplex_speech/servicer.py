"""The SpeechService: the request check, sentence splitting and encoding around an engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from modelplex.v1 import catalog_pb2, speech_pb2, speech_pb2_grpc
from modelplex_kit.errors import unavailable
from modelplex_kit.modalities.speech import check_speech_request
from modelplex_speech.audio import Encoder
from modelplex_speech.engine import SpeechEngine
from modelplex_speech.sentences import sentences

DEFAULT_FORMAT = "mp3"  # OpenAI's default


class SpeechServicer(speech_pb2_grpc.SpeechServiceServicer):
    def __init__(self, engine: SpeechEngine, max_queue: int = 64) -> None:
        self._engine = engine
        self._capabilities = catalog_pb2.Capabilities(speech=engine.capabilities)
        # Requests in flight beyond this get a 503 (with Retry-After) instead of waiting without end.
        self._slots = asyncio.Semaphore(max_queue)
        self._max_queue = max_queue

    async def Synthesize(
        self, request, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[speech_pb2.SynthesizeResponse]:
        check_speech_request(request, self._capabilities)
        if self._slots.locked():
            raise unavailable(f"The speech engine has {self._max_queue} requests in flight; retry shortly.")
        async with self._slots:
            encoder = Encoder(request.response_format or DEFAULT_FORMAT, self._engine.sample_rate)
            mime_type = encoder.format.mime_type
            samples = 0
            begun = 0  # input characters whose synthesis has begun: metered if the stream ends early
            for sentence in sentences(request.input):
                begun = min(len(request.input), begun + len(sentence) + 1)  # its separator with it
                async with aclosing(self._speak(request, sentence)) as chunks:
                    async for pcm in chunks:
                        samples += len(pcm)
                        if data := encoder.encode(pcm):
                            yield speech_pb2.SynthesizeResponse(
                                audio=data, mime_type=mime_type, characters_so_far=begun
                            )
                            mime_type = ""
            yield speech_pb2.SynthesizeResponse(
                audio=encoder.finish(),
                mime_type=mime_type,
                characters=len(request.input),
                characters_so_far=len(request.input),
                audio_seconds=samples / self._engine.sample_rate,
            )

    def _speak(self, request: speech_pb2.SynthesizeRequest, sentence: str) -> AsyncIterator:
        return self._engine.synthesize(
            sentence, voice=request.voice, speed=request.speed or 1.0, instructions=request.instructions
        )
