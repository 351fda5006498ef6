from __future__ import annotations

from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from modelplex.v1 import catalog_pb2, common_pb2
from modelplex_edge import pipeline
from modelplex_edge.endpoints.completions import translate
from modelplex_edge.endpoints.completions.protocol import CompletionRequest
from modelplex_kit.modalities import text

router = APIRouter()
ENDPOINT = pipeline.Endpoint("completions", text.MODALITY)


@router.post("/v1/completions")
async def create_completion(http: Request) -> Response:
    body = await pipeline.parse(http, ENDPOINT, CompletionRequest)
    async with await pipeline.open_call(http, ENDPOINT, body.model, partial(translate.cost, body)) as call:
        requests = translate.to_protos(body, call.model.id, call.meta(body.user))
        call.check(requests[0])  # the prompts differ, nothing checked does
        if body.stream:
            # The first prompt is opened now so its errors get an HTTP status; later ones lazily.
            first = await call.stream("GenerateStream", requests[0], keep_alive=True)
            streams = [first, *(call.lazy_stream("GenerateStream", r) for r in requests[1:])]
            chunks = translate.stream_chunks(streams, call.model.id, body.n or 1, translate.include_usage(body))
            return call.respond_stream(chunks)
        return call.respond(await answer(call, body, requests))


async def answer(call: pipeline.Call, body: CompletionRequest, requests: list[Any]) -> dict[str, Any]:
    """The non-streamed completion of every prompt: the route's body, and a batch line's."""
    return translate.from_protos(await call.unary_each("Generate", requests), call.model.id)


def batch_request(body: CompletionRequest, model: catalog_pb2.Model, meta: common_pb2.RequestMeta) -> list[Any]:
    return translate.to_protos(body, model.id, meta)


BATCH_LINE = pipeline.LineRoute(ENDPOINT, CompletionRequest, translate.cost, batch_request, answer)
