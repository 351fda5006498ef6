from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

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
        response = await call.unary("Embed", request)
        return call.respond(translate.from_proto(response, call.model.id, body.encoding_format))
