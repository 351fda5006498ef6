from __future__ import annotations

import time
from typing import Any

import grpc
from fastapi import APIRouter, Request
from starlette.responses import Response

from modelplex.v1 import catalog_pb2, common_pb2
from modelplex_edge import pipeline
from modelplex_edge.endpoints.responses import background, translate
from modelplex_edge.endpoints.responses.conversation import load_chain
from modelplex_edge.endpoints.responses.events import ResponseEvents, framed, generate_events
from modelplex_edge.endpoints.responses.protocol import CreateResponseRequest
from modelplex_edge.endpoints.responses.store import ResponseStore, StoredResponse
from modelplex_edge.responses import json_response
from modelplex_edge.sse import sse_response
from modelplex_edge.state import EdgeState
from modelplex_kit.errors import ServiceError, invalid
from modelplex_kit.modalities import text
from modelplex_kit.modalities.text import CHAT_OUTPUT_BOUNDS

router = APIRouter()
ENDPOINT = pipeline.Endpoint("responses", text.MODALITY)
MAX_PAGE = 100
_OUTPUT_BOUNDS = frozenset({"max_tokens", "max_completion_tokens"})


def _state(http: Request) -> EdgeState:
    return http.app.state.edge


def _not_found(response_id: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, f"Response with id '{response_id}' not found.")


def _in_responses_terms(exc: grpc.aio.AioRpcError | ServiceError) -> ServiceError:
    """The text checks name chat's parameters (`messages`, `logprobs`, `max_tokens`); here they are `input`,
    `include`, `max_output_tokens`."""
    error = exc if isinstance(exc, ServiceError) else ServiceError.from_rpc_error(exc)
    if error.param and error.param.startswith("messages"):
        error.param = "input"
    elif error.param == "logprobs":
        error.param = "include"
    elif error.param in _OUTPUT_BOUNDS:
        error.param = "max_output_tokens"
        error.message = error.message.replace(CHAT_OUTPUT_BOUNDS, "'max_output_tokens'")
    return error


class Saver:
    """Stores a finished response with its input (``store`` true), scoped to the caller's project."""

    def __init__(self, store: ResponseStore, scope: str, body: CreateResponseRequest, depth: int) -> None:
        self._store, self._scope, self._body, self._depth = store, scope, body, depth
        self._input_items = translate.input_items(body)

    async def __call__(self, response: dict[str, Any]) -> None:
        if self._body.store is False:
            return  # never written anywhere
        record = StoredResponse(response["id"], self._scope, response, self._input_items, self._depth)
        await self._store.put(record)


@router.post("/v1/responses")
async def create_response(http: Request) -> Response:
    body = await pipeline.parse(http, ENDPOINT, CreateResponseRequest)
    if body.background and body.store is False:
        # As OpenAI: a background response is polled, so it must be stored.
        await pipeline.refuse(http, ENDPOINT.name, invalid("Background mode requires 'store' to be true.", "store"))
    state = _state(http)
    scope = (await pipeline.identify(http, ENDPOINT)).scope if body.previous_response_id else ""
    chain = await load_chain(
        state.responses, scope, body.previous_response_id, state.settings, *translate.chain_room(body)
    )
    prompt = translate.Prompt(body, [*chain.items, *body.items])
    async with await pipeline.open_call(
        http, ENDPOINT, body.model, lambda model: prompt.fit(model.context_length)
    ) as call:
        request = translate.to_proto(body, prompt.items, call.model.id, call.meta(body.safety_identifier or body.user))
        try:
            call.check(request)
        except ServiceError as exc:
            raise _in_responses_terms(exc) from None
        response_id = translate.new_id("resp")
        if body.background:
            queued = await background.enqueue(state, call, body, await http.body(), response_id, chain.depth + 1)
            if body.stream:
                return _resumed(state, call.admitted.scope, response_id, -1, call.admitted.headers)
            return call.respond(queued)
        save = Saver(state.responses, call.admitted.scope, body, chain.depth + 1)
        try:
            if body.stream:
                stream = await call.stream("GenerateStream", request, keep_alive=True)
                events = ResponseEvents(body, response_id, int(time.time()), call.model.id)
                return call.respond_stream(framed(generate_events(events, stream, save)), done=None)
        except (grpc.aio.AioRpcError, ServiceError) as exc:
            raise _in_responses_terms(exc) from None
        return call.respond(await _answer(call, body, request, response_id, save))


async def _answer(
    call: pipeline.Call, body: CreateResponseRequest, request: Any, response_id: str, save: Saver
) -> dict[str, Any]:
    """The non-streamed response, stored when ``store`` says so."""
    try:
        result = translate.from_proto(body, await call.unary("Generate", request), response_id, call.model.id)
    except (grpc.aio.AioRpcError, ServiceError) as exc:
        raise _in_responses_terms(exc) from None
    await save(result)
    return result


def _batch_prompt(body: CreateResponseRequest) -> translate.Prompt:
    """A batch line's prompt: its own input (lines are independent: no stored chain, no background)."""
    if body.previous_response_id:
        raise invalid("Batch lines cannot continue a stored response.", "previous_response_id")
    if body.background:
        raise invalid("Batch lines cannot run in the background: a batch already does.", "background")
    return translate.Prompt(body, list(body.items))


def batch_request(body: CreateResponseRequest, model: catalog_pb2.Model, meta: common_pb2.RequestMeta) -> Any:
    prompt = _batch_prompt(body)
    prompt.fit(model.context_length)
    request = translate.to_proto(body, prompt.items, model.id, meta)
    try:
        ENDPOINT.modality.check(request, model.capabilities)
    except ServiceError as exc:  # in this endpoint's terms (`input`, `include`), as the route says them
        raise _in_responses_terms(exc) from None
    return request


async def batch_answer(call: pipeline.Call, body: CreateResponseRequest, request: Any) -> dict[str, Any]:
    save = Saver(call.state.responses, call.admitted.scope, body, 1)
    return await _answer(call, body, request, translate.new_id("resp"), save)


BATCH_LINE = pipeline.LineRoute(
    ENDPOINT,
    CreateResponseRequest,
    lambda body, model: _batch_prompt(body).fit(model.context_length),
    batch_request,
    batch_answer,
)


def _resumed(state: EdgeState, scope: str, response_id: str, after: int, headers: dict[str, str]) -> Response:
    poll = state.settings.responses_background_renew_seconds
    events = background.replay(state.responses, scope, response_id, after, poll)
    return sse_response(events, headers=headers, drain=state.drain, done=None)


def _starting_after(http: Request) -> int:
    raw = http.query_params.get("starting_after")
    if raw is None:
        return -1
    if not raw.isdigit():
        raise invalid("Invalid 'starting_after': it must be a non-negative integer (a sequence number).",
                      "starting_after")
    return int(raw)


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, http: Request) -> Response:
    admitted = await pipeline.identify(http, ENDPOINT)
    streaming = http.query_params.get("stream", "false").lower() not in ("false", "0")
    after = _starting_after(http)
    state = _state(http)
    record = await state.responses.get(admitted.scope, response_id)
    if record is None:
        raise _not_found(response_id)
    if streaming:
        if not record.response.get("background"):
            # As OpenAI: only a background response's event stream is kept to be resumed.
            raise invalid("Streaming a stored response is only possible for background responses.", "stream")
        return _resumed(state, admitted.scope, response_id, after, admitted.headers)
    return json_response(record.response, headers=admitted.headers or None)


@router.post("/v1/responses/{response_id}/cancel")
async def cancel_response(response_id: str, http: Request) -> Response:
    admitted = await pipeline.identify(http, ENDPOINT)
    state = _state(http)
    record = await state.responses.get(admitted.scope, response_id)
    if record is None:
        raise _not_found(response_id)
    if not record.response.get("background"):
        raise invalid("Only responses created with background set to true can be cancelled.", "response_id")
    cancelled = await background.cancel(state, record, ENDPOINT.name)
    return json_response(cancelled, headers=admitted.headers or None)


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, http: Request) -> Response:
    admitted = await pipeline.identify(http, ENDPOINT)
    if not await _state(http).responses.delete(admitted.scope, response_id):
        raise _not_found(response_id)
    body = {"id": response_id, "object": "response.deleted", "deleted": True}
    return json_response(body, headers=admitted.headers or None)


def _page_params(http: Request) -> tuple[str | None, int, str]:
    query = http.query_params
    raw_limit = query.get("limit", "20")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_PAGE:
        raise invalid(f"Invalid 'limit': it must be an integer from 1 to {MAX_PAGE}.", "limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid("Invalid 'order': it must be 'asc' or 'desc'.", "order")
    return query.get("after"), int(raw_limit), order


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(response_id: str, http: Request) -> Response:
    admitted = await pipeline.identify(http, ENDPOINT)
    after, limit, order = _page_params(http)
    record = await _state(http).responses.get(admitted.scope, response_id)
    if record is None:
        raise _not_found(response_id)
    items = record.input_items if order == "asc" else list(reversed(record.input_items))
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise invalid(f"No input item with id '{after}' in response '{response_id}'.", "after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    body = {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }
    return json_response(body, headers=admitted.headers or None)
