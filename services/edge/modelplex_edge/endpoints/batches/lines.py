"""A batch's lines: read from the input file, validated, and run through the pipeline.

Each line runs as the synchronous endpoint would run it (the route's own parsing, cost bound, checks,
backend call and body: its ``BATCH_LINE``), as a ``pipeline.batch_call``: lower priority, metered to the
batch's key. Its result is OpenAI's BatchRequestOutput, the response body or error envelope exactly as the
endpoint returns it.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import orjson
from pydantic import BaseModel, ValidationError

from modelplex.v1 import catalog_pb2, common_pb2
from modelplex_edge import pipeline
from modelplex_edge.endpoints.batches.protocol import InputLine
from modelplex_edge.endpoints.batches.records import BatchJob
from modelplex_edge.endpoints.chat.router import BATCH_LINE as CHAT
from modelplex_edge.endpoints.completions.router import BATCH_LINE as COMPLETIONS
from modelplex_edge.endpoints.embeddings.router import BATCH_LINE as EMBEDDINGS
from modelplex_edge.endpoints.responses.router import BATCH_LINE as RESPONSES
from modelplex_edge.errors import validation_error
from modelplex_edge.state import EdgeState
from modelplex_kit.errors import ServiceError, invalid, model_not_found
from modelplex_kit.logging import request_id_var

ROUTES: dict[str, pipeline.LineRoute] = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": COMPLETIONS,
    "/v1/embeddings": EMBEDDINGS,
    "/v1/responses": RESPONSES,
}


class NotYet(Exception):
    """The line's model cannot be reached now (no catalog yet, its backend down): try the batch later."""


@dataclass(frozen=True, slots=True)
class RawLine:
    #: 1-based line number in the file (what errors name).
    number: int
    #: 0-based index among the file's non-blank lines (what parts record).
    index: int
    data: bytes
    too_long: bool = False


async def read_lines(chunks: AsyncIterator[bytes], max_line_bytes: int) -> AsyncIterator[RawLine]:
    """The file's non-blank lines, streamed; a line past ``max_line_bytes`` is reported, never held whole."""
    number, index, buffer, skipping = 0, 0, bytearray(), False
    async for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            number += 1
            if skipping:
                skipping = False
                yield RawLine(number, index, b"", too_long=True)
                index += 1
            else:
                buffer += chunk[start:end]
                if buffer.strip():
                    yield RawLine(number, index, bytes(buffer))
                    index += 1
            buffer.clear()
            start = end + 1
        if not skipping:
            buffer += chunk[start:]
            if len(buffer) > max_line_bytes:
                buffer.clear()
                skipping = True
    if skipping:
        yield RawLine(number + 1, index, b"", too_long=True)
    elif buffer.strip():
        yield RawLine(number + 1, index, bytes(buffer))


@dataclass(frozen=True, slots=True)
class Checked:
    line: InputLine
    body: BaseModel


def _nested(error: ServiceError, prefix: str) -> ServiceError:
    error.param = f"{prefix}.{error.param}" if error.param else prefix
    return error


def parse_line(raw: RawLine, endpoint: str, max_line_bytes: int) -> Checked:
    """The line's shape (JSON, fields, method, url, the endpoint's body): a ServiceError naming what is wrong."""
    if raw.too_long:
        raise invalid(f"The line is longer than {max_line_bytes} bytes.")
    try:
        line = InputLine.model_validate_json(raw.data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    if line.method != "POST":
        raise invalid(f"Invalid value for 'method': '{line.method}'; batch lines must be POST.", "method")
    if line.url != endpoint:
        raise invalid(f"Invalid value for 'url': '{line.url}' is not this batch's endpoint, '{endpoint}'.", "url")
    route = ROUTES[endpoint]
    try:
        body = route.body.model_validate(line.body)
    except ValidationError as exc:
        raise _nested(validation_error(exc), "body") from None
    if getattr(body, "stream", None):
        raise invalid("Batch lines cannot stream: remove 'stream' or set it to false.", "body.stream")
    return Checked(line, body)


def resolve(state: EdgeState, job: BatchJob, route: pipeline.LineRoute, body: BaseModel) -> catalog_pb2.Model:
    """The line's model, as the route resolves it; one the batch's key may not use is not found, as for the key."""
    name = body.model  # type: ignore[attr-defined]
    model = state.catalog.resolve(name, route.endpoint.modality.proto)
    if not job.admitted(route.endpoint.name).may_use(model.id):
        raise model_not_found(name)
    return model


def check_line(state: EdgeState, job: BatchJob, checked: Checked, endpoint: str) -> None:
    """What only the model can tell: that it exists for this endpoint and serves this body (as the route's 400s)."""
    route = ROUTES[endpoint]
    try:
        model = resolve(state, job, route, checked.body)
        route.checked(checked.body, model, common_pb2.RequestMeta())
    except ServiceError as exc:
        if exc.status == grpc.StatusCode.UNAVAILABLE:
            raise NotYet(str(exc)) from exc
        raise (_nested(exc, "body") if exc.param else exc) from None


def output_line(custom_id: str, status: int, body: dict[str, Any], request_id: str) -> dict[str, Any]:
    """OpenAI's BatchRequestOutput."""
    return {
        "id": "batch_req_" + secrets.token_hex(12),
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": None,
    }


async def run_line(state: EdgeState, job: BatchJob, endpoint: str, checked: Checked) -> tuple[bool, dict[str, Any]]:
    """Runs one line; (whether it succeeded, its output line). NotYet when its backend is unavailable."""
    route = ROUTES[endpoint]
    request_id = secrets.token_hex(16)
    request_id_var.set(request_id)  # this line's task's own context
    custom_id = checked.line.custom_id
    try:
        model = resolve(state, job, route, checked.body)
        call = pipeline.batch_call(state, route.endpoint, model, job.admitted(route.endpoint.name))
        async with call:
            request = route.checked(checked.body, call.model, call.meta(getattr(checked.body, "user", None)))
            try:
                body = await route.answer(call, checked.body, request)
            except asyncio.CancelledError:
                # Cut by its worker stopping or losing the batch: not in a part, so it runs again and is
                # metered then, once.
                call.defer()
                raise
    except ServiceError as exc:
        if exc.status == grpc.StatusCode.UNAVAILABLE:
            raise NotYet(str(exc)) from exc
        return False, output_line(custom_id, exc.http.status, exc.envelope(), request_id)
    except grpc.aio.AioRpcError as exc:
        error = ServiceError.from_rpc_error(exc)
        if error.status == grpc.StatusCode.UNAVAILABLE:
            raise NotYet(str(error)) from exc
        return False, output_line(custom_id, error.http.status, error.envelope(), request_id)
    return True, output_line(custom_id, 200, orjson.loads(orjson.dumps(body)), request_id)
