"""OpenAI's video API. Jobs are durable and scoped to the calling key by the videos backend.

Calls that name no model (retrieve, list, delete, content, remix) go to the
backend of the catalog's first video model: every video model of a deployment
is served by one videos service (replicas of it share the job store).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.responses import Response, StreamingResponse

from modelplex.v1 import catalog_pb2, videos_pb2
from modelplex_edge import json_budget, pipeline
from modelplex_edge.endpoints.videos import translate
from modelplex_edge.endpoints.videos.protocol import (
    ContentQuery,
    ImageRef,
    ListQuery,
    VideoCreateRequest,
    VideoRemixRequest,
)
from modelplex_edge.errors import http_only_error, parse_body, validation_error
from modelplex_kit.errors import ServiceError, invalid
from modelplex_kit.modalities import videos

router = APIRouter()


def _endpoint(name: str, meter: pipeline.Meter = translate.meter_nothing) -> pipeline.Endpoint:
    return pipeline.Endpoint(f"videos.{name}", videos.MODALITY, meter=meter)


CREATE, REMIX = _endpoint("create", translate.meter_new_job), _endpoint("remix", translate.meter_new_job)
RETRIEVE, LIST, DELETE, CONTENT = (_endpoint(n) for n in ("retrieve", "list", "delete", "content"))
_MAX_FORM_FIELDS = 16


def _default_model(http: Request) -> str:
    models = [m for m in http.app.state.edge.catalog.view.models if m.modality == catalog_pb2.MODALITY_VIDEOS]
    # No video model: "" resolves to the catalog's own 404 (or 503 while the catalog is not loaded yet).
    return min(models, key=lambda m: m.id).id if models else ""


async def _form_body(http: Request) -> tuple[VideoCreateRequest, tuple[bytes, str] | None]:
    form = await http.form(max_files=1, max_fields=_MAX_FORM_FIELDS)
    fields: dict[str, Any] = {key: value for key, value in form.items() if key != "input_reference"}
    reference = form.get("input_reference")
    upload = None
    if isinstance(reference, UploadFile):
        upload = (await reference.read(), reference.content_type or "application/octet-stream")
    elif isinstance(reference, str) and reference:
        try:
            fields["input_reference"] = ImageRef.model_validate(json.loads(reference))
        except (ValueError, ValidationError):
            raise invalid("input_reference must be an image file or a JSON object.", "input_reference") from None
    try:
        return VideoCreateRequest.model_validate(fields), upload
    except ValidationError as exc:
        raise validation_error(exc) from None


async def _create_body(http: Request) -> tuple[VideoCreateRequest, tuple[bytes, str] | None]:
    """JSON or multipart (the official SDK sends multipart); refused with the key checked first."""
    try:
        if http.headers.get("content-type", "").startswith("multipart/form-data"):
            return await _form_body(http)
        body = await http.body()
        await json_budget.check(body, http.app.state.edge.settings.max_json_weight)
        return parse_body(VideoCreateRequest, body), None
    except ServiceError as exc:
        await pipeline.refuse(http, CREATE.name, exc)


def _idempotency_key(http: Request) -> str:
    key = http.headers.get("idempotency-key", "")
    if len(key) > 255:
        raise invalid("The Idempotency-Key header must be at most 255 characters.", "Idempotency-Key")
    return key


def _job_response(call: pipeline.Call, job: videos_pb2.VideoJob) -> Response:
    response = call.respond(translate.resource(job))
    if job.status in (videos_pb2.VIDEO_STATUS_QUEUED, videos_pb2.VIDEO_STATUS_IN_PROGRESS):
        response.headers["openai-poll-after-ms"] = translate.POLL_AFTER_MS
    return response


@router.post("/v1/videos")
@router.post("/v1/videos/generations")
async def create_video(http: Request) -> Response:
    body, upload = await _create_body(http)
    async with await pipeline.open_call(http, CREATE, body.model, lambda model: translate.seconds(body, model)) as call:
        request = translate.to_proto(body, call.model, call.meta(body.user), _idempotency_key(http), upload)
        call.check(request)
        return _job_response(call, await call.unary("CreateVideo", request))


@router.post("/v1/videos/{video_id}/remix")
async def remix_video(video_id: str, http: Request) -> Response:
    body = await pipeline.parse(http, REMIX, VideoRemixRequest)
    async with await pipeline.open_call(http, REMIX, _default_model(http)) as call:
        request = videos_pb2.RemixVideoRequest(
            meta=call.meta(), video_id=video_id, prompt=body.prompt, idempotency_key=_idempotency_key(http)
        )
        return _job_response(call, await call.unary("RemixVideo", request))


@router.get("/v1/videos/{video_id}")
async def retrieve_video(video_id: str, http: Request) -> Response:
    async with await pipeline.open_call(http, RETRIEVE, _default_model(http)) as call:
        job = await call.unary("GetVideo", videos_pb2.GetVideoRequest(meta=call.meta(), video_id=video_id))
        return _job_response(call, job)


@router.get("/v1/videos")
async def list_videos(http: Request) -> Response:
    query = await pipeline.query(http, LIST, ListQuery)
    async with await pipeline.open_call(http, LIST, _default_model(http)) as call:
        request = videos_pb2.ListVideosRequest(
            meta=call.meta(), after=query.after, limit=query.limit, order=query.order
        )
        return call.respond(translate.page(await call.unary("ListVideos", request)))


@router.delete("/v1/videos/{video_id}")
async def delete_video(video_id: str, http: Request) -> Response:
    async with await pipeline.open_call(http, DELETE, _default_model(http)) as call:
        job = await call.unary("DeleteVideo", videos_pb2.DeleteVideoRequest(meta=call.meta(), video_id=video_id))
        return call.respond(translate.deleted(job))


@router.get("/v1/videos/{video_id}/content")
async def download_video_content(video_id: str, http: Request) -> Response:
    variant = (await pipeline.query(http, CONTENT, ContentQuery)).variant
    async with await pipeline.open_call(http, CONTENT, _default_model(http)) as call:
        offset, length, suffix = translate.byte_range(http.headers.get("range")) or (0, 0, 0)
        request = videos_pb2.DownloadVideoContentRequest(
            meta=call.meta(), video_id=video_id, variant=variant, offset=offset, length=length, suffix_length=suffix
        )
        chunks = await call.stream("DownloadVideoContent", request)
        first = await anext(chunks)
        etag = f'"{first.etag}"'
        ranged = bool(offset or length or suffix)
        headers = {"etag": etag, "accept-ranges": "bytes", **call.admitted.headers}
        if first.range_not_satisfiable:
            past = f"The requested range starts past the end of the file ({first.total_size} bytes)."
            refused = http_only_error(416, past)
            refused.headers.update({**headers, "content-range": f"bytes */{first.total_size}"})
            return refused
        if etag in _etags(http.headers.get("if-none-match")):
            await chunks.aclose()
            return Response(status_code=304, headers=headers)
        sent = first.total_size - first.offset if not length else min(length, first.total_size - first.offset)
        headers["content-length"] = str(sent)
        if ranged:
            headers["content-range"] = f"bytes {first.offset}-{first.offset + sent - 1}/{first.total_size}"
        call.hand_off()
        return _Body(_data(first, chunks), call.finish, status_code=206 if ranged else 200, headers=headers,
                     media_type=first.mime_type)


def _etags(header: str | None) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in (header or "").split(",") if tag.strip()}


async def _data(first: videos_pb2.VideoContentChunk, rest: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    if first.data:
        yield first.data
    async for chunk in rest:
        yield chunk.data


class _Body(StreamingResponse):
    """File bytes; the call is accounted when the body ends, however it ends."""

    def __init__(self, content: AsyncIterator[bytes], on_close, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close(failed=False)



