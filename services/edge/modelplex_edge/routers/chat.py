from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from modelplex_edge import text_calls
from modelplex_edge.errors import parse_body
from modelplex_edge.protocol.chat import ChatCompletionRequest
from modelplex_edge.state import Authorized, State

router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request, caller: Authorized, state: State) -> Response:
    body = parse_body(ChatCompletionRequest, await request.body())
    return await text_calls.chat_completion(request, body, caller, state)
