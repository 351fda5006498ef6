"""POST /v1/images/generations (edits and variations answer 404 with advice: endpoints/unsupported)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from starlette.responses import Response

from modelplex.v1 import images_pb2
from modelplex_edge import pipeline
from modelplex_edge.endpoints.images import translate
from modelplex_edge.endpoints.images.protocol import ImageGenerationRequest
from modelplex_edge.sse import event
from modelplex_kit.modalities import images

router = APIRouter()
ENDPOINT = pipeline.Endpoint("images.generations", images.MODALITY, meter=translate.meter)


@router.post("/v1/images/generations")
async def create_images(http: Request) -> Response:
    body = await pipeline.parse(http, ENDPOINT, ImageGenerationRequest)
    if (error := translate.refusal(body)) is not None:
        await pipeline.refuse(http, ENDPOINT.name, error)
    async with await pipeline.open_call(http, ENDPOINT, body.model, cost=body.n or 1) as call:
        request = translate.to_proto(body, call.model, call.meta(body.user))
        call.check(request)
        if body.stream:
            events = await call.stream("StreamImages", request)
            return call.respond_stream(_frames(events, request), done=None)
        response = await call.unary("GenerateImages", request)
        return call.respond(translate.from_proto(response, request))


async def _frames(events: AsyncIterator[images_pb2.ImageStreamEvent], request) -> AsyncIterator[bytes]:
    async for message in events:
        name, data = translate.stream_event(message, request)
        yield event(data, name)
