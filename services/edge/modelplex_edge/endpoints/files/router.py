"""/v1/files: upload (multipart, streamed to the object store), list, retrieve, content, delete.

A file is visible to the keys of the project that uploaded it and to no other (404). Limits, as
OpenAI's for batch input: one file up to ``MODELPLEX_EDGE_FILES_MAX_BYTES`` (200 MB; 413 beyond);
purpose ``batch`` only; batch files expire after 30 days unless ``expires_after`` says otherwise.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse

from modelplex_edge import pipeline
from modelplex_edge.admission import Admitted
from modelplex_edge.endpoints.files.protocol import (
    OPENAI_PURPOSES,
    SERVED_PURPOSES,
    ListFilesQuery,
    UploadForm,
)
from modelplex_edge.endpoints.files.store import FileRecord, FileStore
from modelplex_edge.errors import BodyTimeout, BodyTooLarge, validation_error
from modelplex_edge.responses import json_response
from modelplex_edge.settings import EdgeSettings
from modelplex_edge.state import EdgeState
from modelplex_kit.errors import ServiceError, invalid
from modelplex_kit.modalities import text
from modelplex_kit.objectstore import CHUNK_BYTES, TooLarge

router = APIRouter()
UPLOAD_PATH = "/v1/files"
# Files are no model call: the endpoint names the caller to admission (its key, its project) only.
ENDPOINT = pipeline.Endpoint("files", text.MODALITY)


def body_limit(settings: EdgeSettings) -> int:
    """The edge's body limit here: the largest file plus the form around it."""
    return settings.files_max_bytes + 1024 * 1024


def _state(http: Request) -> EdgeState:
    return http.app.state.edge


def files_of(state: EdgeState) -> FileStore:
    return FileStore(state.objects)


def not_found(file_id: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, f"No such File object: {file_id}", param="id")


async def _form(http: Request) -> tuple[UploadForm, UploadFile]:
    content_type = http.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise invalid("This endpoint takes a multipart/form-data body ('file' and 'purpose').", "file")
    try:
        form = await http.form(max_files=1, max_fields=16)  # the file spills to disk past 1 MB
    except (BodyTimeout, BodyTooLarge, ClientDisconnect):
        raise  # the middleware answers these (408, 413, nothing)
    except Exception:  # starlette's MultiPartException, a missing boundary, a broken body
        raise invalid("The request must be a valid multipart/form-data body.") from None
    fields: dict[str, object] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            continue
        if key.startswith("expires_after[") and key.endswith("]"):
            fields.setdefault("expires_after", {})[key[len("expires_after[") : -1]] = value  # type: ignore[index]
        else:
            fields[key] = value
    try:
        parsed = UploadForm.model_validate(fields)
    except ValidationError as exc:
        raise validation_error(exc) from None
    if parsed.purpose not in SERVED_PURPOSES:
        known = parsed.purpose in OPENAI_PURPOSES
        raise invalid(
            f"Invalid value for 'purpose': {'purpose' if known else 'it'} '{parsed.purpose}' is "
            f"{'not served by Modelplex' if known else 'not a purpose'}; use 'batch'.",
            "purpose",
        )
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise invalid("Missing required parameter: 'file'.", "file")
    return parsed, upload


async def _chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(CHUNK_BYTES):
        yield chunk


@router.post(UPLOAD_PATH)
async def create_file(http: Request) -> Response:
    admitted = await pipeline.identify(http, ENDPOINT)  # the key first, before the body is read
    state = _state(http)
    form, upload = await _form(http)
    settings = state.settings
    seconds = form.expires_after.seconds if form.expires_after else settings.files_default_expiry_seconds
    try:
        record = await files_of(state).put(
            admitted.scope,
            _chunks(upload),
            filename=upload.filename or "upload.jsonl",
            purpose=form.purpose,
            expires_at=int(time.time()) + seconds,
            max_bytes=settings.files_max_bytes,
        )
    except TooLarge:
        raise BodyTooLarge(settings.files_max_bytes, "Uploaded 'file'") from None
    finally:
        await upload.close()
    return _respond(admitted, record.wire())


def _respond(admitted: Admitted, body: object) -> Response:
    return json_response(body, headers=admitted.headers or None)


@router.get("/v1/files")
async def list_files(http: Request) -> Response:
    query = await pipeline.query(http, ENDPOINT, ListFilesQuery)
    admitted = await pipeline.identify(http, ENDPOINT)
    records = await files_of(_state(http)).list(admitted.scope)
    if query.purpose:
        records = [r for r in records if r.purpose == query.purpose]
    if query.order == "desc":
        records.reverse()
    if query.after:
        ids = [r.id for r in records]
        if query.after not in ids:
            raise invalid(f"No file with id '{query.after}'.", "after")
        records = records[ids.index(query.after) + 1 :]
    page: list[FileRecord] = records[: query.limit]
    body = {
        "object": "list",
        "data": [r.wire() for r in page],
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
        "has_more": len(records) > query.limit,
    }
    return _respond(admitted, body)


async def _owned(http: Request, file_id: str) -> tuple[Admitted, FileRecord]:
    admitted = await pipeline.identify(http, ENDPOINT)
    record = await files_of(_state(http)).get(admitted.scope, file_id)
    if record is None:
        raise not_found(file_id)
    return admitted, record


@router.get("/v1/files/{file_id}")
async def retrieve_file(file_id: str, http: Request) -> Response:
    admitted, record = await _owned(http, file_id)
    return _respond(admitted, record.wire())


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, http: Request) -> Response:
    admitted, record = await _owned(http, file_id)
    content = files_of(_state(http)).content(admitted.scope, file_id)
    headers = {**admitted.headers, "content-length": str(record.bytes)}
    return StreamingResponse(content, media_type="application/octet-stream", headers=headers)


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, http: Request) -> Response:
    admitted = await pipeline.identify(http, ENDPOINT)
    if not await files_of(_state(http)).delete(admitted.scope, file_id):
        raise not_found(file_id)
    return _respond(admitted, {"id": file_id, "object": "file", "deleted": True})
