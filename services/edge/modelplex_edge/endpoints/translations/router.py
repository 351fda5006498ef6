from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from modelplex_edge import pipeline
from modelplex_edge.endpoints.transcriptions import translate as transcript
from modelplex_edge.endpoints.transcriptions.protocol import TranslationForm, read_form
from modelplex_edge.endpoints.translations import translate
from modelplex_kit.errors import unavailable
from modelplex_kit.modalities import text, transcription

router = APIRouter()
UPLOAD_PATH = "/v1/audio/translations"
ENDPOINT = pipeline.Endpoint("audio.translations", transcription.MODALITY, meter=transcript.meter)


@router.post(UPLOAD_PATH)
async def create_translation(http: Request) -> Response:
    form, upload = await read_form(http, ENDPOINT, TranslationForm)
    async with await pipeline.open_call(http, ENDPOINT, form.model) as call:
        caps = call.model.capabilities.transcription
        if not caps.translate and not caps.translation_model:
            raise unavailable(f"The model `{call.model.id}` cannot translate and names no translation_model.")
        request = transcript.to_proto(
            form, await upload.read(), upload.filename or "", call.model.id, call.meta(), translate=caps.translate
        )
        call.check(request)
        response = await call.unary("Transcribe", request)
        if not caps.translate and response.text.strip() and translate.needs_translation(response.language):
            answer = await call.delegate(
                text.MODALITY, caps.translation_model, "Generate", translate.chat_request(response.text)
            )
            english = answer.choices[0].text.strip() if answer.choices else ""
            # The timings stay the audio's; the text is now English throughout.
            del response.segments[:]
            del response.words[:]
            response.text, response.language = english, "english"
        return transcript.render(
            response,
            form.response_format,
            task="translate",
            temperature=form.temperature,
            words=False,
            headers=call.admitted.headers,
        )
