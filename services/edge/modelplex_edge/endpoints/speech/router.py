from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from modelplex_edge import pipeline
from modelplex_edge.endpoints.speech import translate
from modelplex_edge.endpoints.speech.protocol import SpeechRequest
from modelplex_kit.modalities import speech

log = logging.getLogger(__name__)
router = APIRouter()
ENDPOINT = pipeline.Endpoint("audio.speech", speech.MODALITY, meter=translate.meter)


@router.post("/v1/audio/speech")
async def create_speech(http: Request) -> Response:
    body = await pipeline.parse(http, ENDPOINT, SpeechRequest)
    async with await pipeline.open_call(http, ENDPOINT, body.model, len(body.input)) as call:
        request = translate.to_proto(body, call.model.id, call.meta())
        call.check(request)
        # Opened before answering: a refusal from the backend still gets its HTTP status.
        stream = await call.stream("Synthesize", request)
        if body.stream_format == "sse":
            return call.respond_stream(translate.sse_events(stream), done=None)
        call.hand_off()
        return AudioResponse(
            _ended_quietly(call.watched(translate.audio_bytes(stream))),
            call.finish,
            media_type=translate.MIME_TYPES[body.response_format],
            headers=call.admitted.headers,
        )


async def _ended_quietly(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    # Raw audio has no way to carry an error once the first byte left: the body ends early and the log says why.
    try:
        async for chunk in chunks:
            yield chunk
    except Exception:
        log.exception("speech stream failed after the response started")


class AudioResponse(StreamingResponse):
    """Streams audio as it is synthesised; ``on_close`` (the call's accounting) runs however it ends."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]], **kw) -> None:
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()
