"""The multipart form of /v1/audio/transcriptions and /translations (OpenAI's CreateTranscriptionRequest)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request

from modelplex_edge import pipeline
from modelplex_edge.errors import BodyTimeout, BodyTooLarge, validation_error
from modelplex_edge.wire import Strict
from modelplex_kit.errors import ServiceError, invalid
from modelplex_kit.modalities.transcription import MAX_FILE_BYTES

ResponseFormat = Literal["json", "text", "srt", "verbose_json", "vtt"]
# Form fields that repeat (`timestamp_granularities[]=word&timestamp_granularities[]=segment`).
_LISTS = ("timestamp_granularities", "include")


class TranscriptionForm(Strict):
    model: str
    language: str | None = None
    prompt: str | None = None
    response_format: ResponseFormat = "json"
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    timestamp_granularities: list[Literal["word", "segment"]] = []
    include: list[Literal["logprobs"]] = []
    stream: bool = False
    chunking_strategy: str | None = None


class TranslationForm(Strict):
    model: str
    prompt: str | None = None
    response_format: ResponseFormat = "json"
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0


def not_multipart(content_type: str) -> ServiceError:
    sent = content_type.split(";")[0].strip() or "none"
    return invalid(
        "This endpoint takes a multipart/form-data body (the audio as 'file', the other parameters as form "
        f"fields), as OpenAI's does; this request's Content-Type is {sent}.",
        "file",
    )


async def read_form(http: Request, endpoint: pipeline.Endpoint, model: type[Strict]) -> tuple[Strict, UploadFile]:
    """Parses the form (files over 1 MB spill to disk) and validates it; refusals check the key first."""
    content_type = http.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        await pipeline.refuse(http, endpoint.name, not_multipart(content_type))
    try:
        form = await http.form(max_files=1, max_fields=32)
    except (BodyTimeout, BodyTooLarge, ClientDisconnect):
        raise  # the middleware answers these (408, 413, nothing)
    except Exception:  # starlette's MultiPartException, a missing boundary, a broken body
        await pipeline.refuse(http, endpoint.name, invalid("The request must be a valid multipart/form-data body."))
    fields: dict[str, object] = {}
    for key, value in form.multi_items():
        name = key.removesuffix("[]")
        if isinstance(value, UploadFile):
            continue
        if name in _LISTS:
            fields.setdefault(name, []).append(value)  # type: ignore[union-attr]
        else:
            fields[name] = value
    upload = form.get("file")
    try:
        parsed = model.model_validate(fields)
    except ValidationError as exc:
        await pipeline.refuse(http, endpoint.name, validation_error(exc))
    if not isinstance(upload, UploadFile):
        await pipeline.refuse(http, endpoint.name, invalid("Missing required parameter: 'file'.", "file"))
    if (upload.size or 0) > MAX_FILE_BYTES:
        await pipeline.refuse(http, endpoint.name, BodyTooLarge(MAX_FILE_BYTES, "Uploaded 'file'"))  # type: ignore[arg-type]
    return parsed, upload
