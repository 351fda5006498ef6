from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from modelplex_edge import pipeline
from modelplex_edge.endpoints.transcriptions import translate
from modelplex_edge.endpoints.transcriptions.protocol import TranscriptionForm, read_form
from modelplex_kit.errors import invalid
from modelplex_kit.modalities import transcription

router = APIRouter()
UPLOAD_PATH = "/v1/audio/transcriptions"
ENDPOINT = pipeline.Endpoint("audio.transcriptions", transcription.MODALITY, meter=translate.meter)


@router.post(UPLOAD_PATH)
async def create_transcription(http: Request) -> Response:
    form, upload = await read_form(http, ENDPOINT, TranscriptionForm)
    if form.stream and form.response_format not in ("json", "text"):
        await pipeline.refuse(
            http, ENDPOINT.name, invalid("Streaming supports response_format 'json' or 'text'.", "response_format")
        )
    async with await pipeline.open_call(http, ENDPOINT, form.model) as call:
        request = translate.to_proto(form, await upload.read(), upload.filename or "", call.model.id, call.meta())
        call.check(request)
        if form.stream:
            return call.respond_stream(translate.stream_events(await call.stream("TranscribeStream", request)))
        response = await call.unary("Transcribe", request)
        return translate.render(
            response,
            form.response_format,
            task="transcribe",
            temperature=form.temperature,
            words="word" in form.timestamp_granularities,
            headers=call.admitted.headers,
        )
