"""Endpoints the compatibility page marks "No": a 404 that says what to use instead."""

from __future__ import annotations

import grpc
from fastapi import APIRouter, Request

from modelplex_kit.errors import ServiceError

router = APIRouter()

# path prefix -> what to use instead
UNSUPPORTED = {
    "/v1/fine_tuning": "Fine-tuning is not offered by Modelplex; fine-tune elsewhere and serve the result.",
    "/v1/fine-tuning": "Fine-tuning is not offered by Modelplex; fine-tune elsewhere and serve the result.",
    "/v1/assistants": "The Assistants API is not planned; use /v1/chat/completions with tools.",
    "/v1/threads": "The Assistants API (threads, runs) is not planned; use /v1/chat/completions with tools.",
    "/v1/images/edits": "Image editing is not supported yet; use /v1/images/generations.",
    "/v1/images/variations": "Image variations are not supported yet; use /v1/images/generations.",
}


def _not_offered(advice: str):
    async def endpoint(request: Request) -> None:
        raise ServiceError(
            grpc.StatusCode.NOT_FOUND,
            f"{request.method} {request.url.path} is not supported by Modelplex. {advice}",
            code="unsupported_endpoint",
        )

    return endpoint


for prefix, advice in UNSUPPORTED.items():
    for path in (prefix, prefix + "/{rest:path}"):
        router.add_api_route(path, _not_offered(advice), methods=["GET", "POST", "DELETE"], include_in_schema=False)
