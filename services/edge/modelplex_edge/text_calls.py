"""The text path shared by chat and legacy completions: resolve, check, call, render."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from modelplex.v1 import catalog_pb2, text_pb2
from modelplex_edge.auth import Caller
from modelplex_edge.backends import all_of, open_stream, until_disconnect
from modelplex_edge.protocol.chat import ChatCompletionRequest
from modelplex_edge.protocol.completions import CompletionRequest
from modelplex_edge.sse import sse_response
from modelplex_edge.state import EdgeState
from modelplex_edge.translate import chat as chat_tr
from modelplex_edge.translate import completions as completions_tr
from modelplex_kit.capabilities import check_text_request
from modelplex_kit.telemetry import TOKENS


def json_response(body: dict[str, Any]) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


def _count_tokens(model_id: str, usage) -> None:
    TOKENS.labels(model_id, "prompt").inc(usage.prompt_tokens)
    TOKENS.labels(model_id, "completion").inc(usage.completion_tokens)


async def _metered(stream: AsyncIterator[text_pb2.GenerateStreamResponse], model_id: str):
    async for message in stream:
        if message.HasField("usage"):
            _count_tokens(model_id, message.usage)
        yield message


def _include_usage(body: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _resolve(state: EdgeState, name: str) -> catalog_pb2.Model:
    return state.catalog.resolve(name, catalog_pb2.MODALITY_TEXT)


async def chat_completion(http: Request, body: ChatCompletionRequest, caller: Caller, state: EdgeState) -> Response:
    model = _resolve(state, body.model)
    request = chat_tr.to_proto(body, model.id, caller.meta(body.user))
    check_text_request(request, model.capabilities)
    stub = state.backends.text(model.backend_target)
    options = state.backends.call_options(caller.request_id)
    if body.stream:
        stream = await until_disconnect(http, _open(stub, request, options, model.id))
        return sse_response(chat_tr.stream_chunks(stream, model.id, _include_usage(body)))
    response = await until_disconnect(http, stub.Generate(request, **options))
    _count_tokens(model.id, response.usage)
    return json_response(chat_tr.from_proto(response, model.id))


async def completion(http: Request, body: CompletionRequest, caller: Caller, state: EdgeState) -> Response:
    model = _resolve(state, body.model)
    requests = completions_tr.to_protos(body, model.id, caller.meta(body.user))
    check_text_request(requests[0], model.capabilities)  # the prompts differ, nothing checked does
    stub = state.backends.text(model.backend_target)
    options = state.backends.call_options(caller.request_id)
    if body.stream:
        # The first prompt is opened now so its errors get an HTTP status; later ones lazily.
        first = await until_disconnect(http, _open(stub, requests[0], options, model.id))
        streams = [first, *(_lazy(stub, r, options, model.id) for r in requests[1:])]
        return sse_response(completions_tr.stream_chunks(streams, model.id, body.n or 1, _include_usage(body)))
    responses = await until_disconnect(http, all_of([stub.Generate(r, **options) for r in requests]))
    for response in responses:
        _count_tokens(model.id, response.usage)
    return json_response(completions_tr.from_protos(list(responses), model.id))


async def _open(stub, request, options, model_id: str) -> AsyncIterator[text_pb2.GenerateStreamResponse]:
    """Opens a metered backend stream. Awaited under until_disconnect: a request can wait
    a while for its first token, and a client that leaves meanwhile must cancel it."""
    return _metered(await open_stream(stub.GenerateStream(request, **options)), model_id)


async def _lazy(stub, request, options, model_id: str):
    async for message in await _open(stub, request, options, model_id):
        yield message
