"""The TranscriptionService: the request check, bounded decoding and transcript assembly around an engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from modelplex.v1 import catalog_pb2, transcription_pb2, transcription_pb2_grpc
from modelplex_kit.errors import unavailable
from modelplex_kit.modalities.transcription import check_transcribe_request
from modelplex_transcription.decode import AudioSource, Limits
from modelplex_transcription.engine import Finished, TranscriptionEngine


class TranscriptionServicer(transcription_pb2_grpc.TranscriptionServiceServicer):
    def __init__(self, engine: TranscriptionEngine, limits: Limits, max_queue: int = 16) -> None:
        self._engine = engine
        self._capabilities = catalog_pb2.Capabilities(transcription=engine.capabilities)
        self._limits = limits
        # Files in flight (decoding or waiting for a decoder) beyond this get a 503 with Retry-After.
        self._slots = asyncio.Semaphore(max_queue)
        self._max_queue = max_queue

    async def Transcribe(self, request, context: grpc.aio.ServicerContext) -> transcription_pb2.TranscribeResponse:
        response = transcription_pb2.TranscribeResponse()
        async for _ in self._events(request, response, incremental=False):
            pass
        return response

    async def TranscribeStream(
        self, request, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[transcription_pb2.TranscribeStreamResponse]:
        response = transcription_pb2.TranscribeResponse()
        async for segment in self._events(request, response, incremental=True):
            yield transcription_pb2.TranscribeStreamResponse(
                delta=segment.text, seconds_so_far=response.duration_seconds
            )
        yield transcription_pb2.TranscribeStreamResponse(done=response)

    async def _events(
        self,
        request: transcription_pb2.TranscribeRequest,
        response: transcription_pb2.TranscribeResponse,
        *,
        incremental: bool,
    ) -> AsyncIterator[transcription_pb2.TranscriptSegment]:
        """Runs the engine, filling ``response`` as it goes and yielding each segment as it is recognised."""
        check_transcribe_request(request, self._capabilities)
        if self._slots.locked():
            raise unavailable(f"The transcription engine has {self._max_queue} files in flight; retry shortly.")
        async with self._slots:
            audio = AudioSource(request.audio, request.filename, self._limits)
            async with aclosing(self._engine.transcribe(request, audio, incremental=incremental)) as events:
                async for event in events:
                    if isinstance(event, transcription_pb2.TranscriptSegment):
                        response.segments.append(event)
                        response.text += event.text
                        # Until Finished sets it: the seconds of audio handled so far (recognised, or
                        # decoded for engines whose streamed segments carry no times), metered if the
                        # stream ends early.
                        response.duration_seconds = max(response.duration_seconds, event.end, audio.seconds)
                        yield event
                    elif isinstance(event, transcription_pb2.TranscriptWord):
                        response.words.append(event)
                    elif isinstance(event, Finished):
                        response.language = event.language
                        response.duration_seconds = event.duration_seconds
