from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from modelplex.v1 import catalog_pb2, common_pb2
from modelplex_edge import pipeline
from modelplex_edge.endpoints.embeddings import translate
from modelplex_edge.endpoints.embeddings.protocol import EmbeddingRequest
from modelplex_kit.modalities import embeddings

router = APIRouter()
ENDPOINT = pipeline.Endpoint("embeddings", embeddings.MODALITY)


@router.post("/v1/embeddings")
async def create_embeddings(http: Request) -> Response:
    body = await pipeline.parse(http, ENDPOINT, EmbeddingRequest)
    async with await pipeline.open_call(http, ENDPOINT, body.model, translate.cost(body)) as call:
        request = translate.to_proto(body, call.model.id, call.meta(body.user))
        call.check(request)
        return call.respond(await answer(call, body, request))


async def answer(call: pipeline.Call, body: EmbeddingRequest, request: Any) -> dict[str, Any]:
    """The embeddings: the route's body, and a batch line's."""
    return translate.from_proto(await call.unary("Embed", request), call.model.id, body.encoding_format)


def batch_request(body: EmbeddingRequest, model: catalog_pb2.Model, meta: common_pb2.RequestMeta) -> Any:
    return translate.to_proto(body, model.id, meta)


BATCH_LINE = pipeline.LineRoute(
    ENDPOINT, EmbeddingRequest, lambda body, model: translate.cost(body), batch_request, answer
)
