from __future__ import annotations

from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from modelplex.v1 import catalog_pb2, common_pb2
from modelplex_edge import pipeline
from modelplex_edge.endpoints.chat import translate
from modelplex_edge.endpoints.chat.protocol import ChatCompletionRequest
from modelplex_kit.modalities import text

router = APIRouter()
ENDPOINT = pipeline.Endpoint("chat.completions", text.MODALITY)


@router.post("/v1/chat/completions")
async def create_chat_completion(http: Request) -> Response:
    body = await pipeline.parse(http, ENDPOINT, ChatCompletionRequest)
    async with await pipeline.open_call(http, ENDPOINT, body.model, partial(translate.cost, body)) as call:
        request = translate.to_proto(body, call.model, call.meta(body.user))
        call.check(request)
        if body.stream:
            stream = await call.stream("GenerateStream", request, keep_alive=True)
            return call.respond_stream(translate.stream_chunks(stream, call.model.id, translate.include_usage(body)))
        return call.respond(await answer(call, body, request))


async def answer(call: pipeline.Call, body: ChatCompletionRequest, request: Any) -> dict[str, Any]:
    """The non-streamed completion: the route's body, and a batch line's."""
    return translate.from_proto(await call.unary("Generate", request), call.model.id)


def batch_request(body: ChatCompletionRequest, model: catalog_pb2.Model, meta: common_pb2.RequestMeta) -> Any:
    """A batch line's backend request (its cost and the model's checks are the route's)."""
    return translate.to_proto(body, model, meta)


BATCH_LINE = pipeline.LineRoute(ENDPOINT, ChatCompletionRequest, translate.cost, batch_request, answer)
