"""The one call pipeline every endpoint goes through.

    parse -> resolve the model (for the endpoint's modality) -> admit (key, model,
    endpoint, cost) -> check the request against the model's capabilities ->
    call the backend, unary or streaming, under the disconnect watcher ->
    account what was consumed (exactly once, streams included) -> render.

An endpoint's router only parses, translates and renders; everything a request
must pass through, and every metric of it, lives here once.

    body = await pipeline.parse(http, CHAT, ChatCompletionRequest)
    async with await pipeline.open_call(http, CHAT, body.model, cost) as call:
        request = translate.to_proto(body, call.model, call.meta(body.user))
        call.check(request)
        response = await call.unary("Generate", request)
        return call.respond(translate.from_proto(response))
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import Message
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from modelplex.v1 import catalog_pb2, common_pb2
from modelplex_edge import json_budget
from modelplex_edge.admission import CLIENT_DISCONNECT, DRAIN, UPSTREAM_FAILURE, Admitted, Ask, Consumption
from modelplex_edge.errors import parse_body, validation_error
from modelplex_edge.grpc_calls import all_of, open_stream, until_disconnect
from modelplex_edge.responses import json_response
from modelplex_edge.sse import sse_response
from modelplex_edge.state import EdgeState
from modelplex_kit.errors import ServiceError
from modelplex_kit.logging import request_id_var
from modelplex_kit.modalities import Modality
from modelplex_kit.priority import BATCH
from modelplex_kit.telemetry import (
    E2E_REQUEST_LATENCY,
    GENERATION_TOKENS,
    INTER_TOKEN_LATENCY,
    PROMPT_TOKENS,
    REQUEST_UNITS,
    REQUESTS_RUNNING,
    TIME_TO_FIRST_TOKEN,
    labelled,
)

M = TypeVar("M", bound=BaseModel)
Meter = Callable[[Message, Consumption], None]

# A call that failed with one of these ended because of the backend, not because of the request.
_UPSTREAM_STATUSES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DATA_LOSS,
    }
)


def meter_usage(message: Message, used: Consumption) -> None:
    """The default meter: token usage, where a backend message carries it; on streams that report them
    (text), the running totals, accounted if the stream ends before its final usage."""
    if message.HasField("usage"):
        used.add_usage(message.usage)
    elif "progress" in message.DESCRIPTOR.fields_by_name and message.HasField("progress"):
        used.running_usage(message.progress)


#: Bodies from this size on give the loop back between the pipeline's stages (``breathe``).
LARGE_BODY = 256 * 1024
#: Backend calls one request has in flight at once (a legacy completion of 2,048 prompts): started
#: together, their set-up alone held the loop 250 ms, and the engine runs a bounded batch anyway.
FAN_OUT = 64
_LARGE = "modelplex.large_body"


@dataclass(frozen=True, slots=True)
class Endpoint:
    #: "chat.completions", "embeddings": names the endpoint to admission, metrics and logs.
    name: str
    modality: Modality
    #: Reads what a backend message says was consumed.
    meter: Meter = field(default=meter_usage)


@dataclass(frozen=True, slots=True)
class LineRoute:
    """How one endpoint answers a batch line: the very functions its route uses (same parsing, cost
    bound, checks, backend call and body), minus HTTP."""

    endpoint: Endpoint
    #: The endpoint's request body (pydantic).
    body: type[BaseModel]
    #: (body, model) -> tokens; raises the route's 400 for a bound the model can never serve.
    cost: Callable[[Any, catalog_pb2.Model], int]
    #: (body, model, meta) -> the backend request (or the list of them, one per prompt).
    request: Callable[[Any, catalog_pb2.Model, common_pb2.RequestMeta], Any]
    #: (call, body, request) -> the response body the synchronous endpoint returns.
    answer: Callable[[Call, Any, Any], Awaitable[dict[str, Any]]]

    def checked(self, body: Any, model: catalog_pb2.Model, meta: common_pb2.RequestMeta) -> Any:
        """The backend request, after the cost bound and the model's capability checks (ServiceError: 400)."""
        self.cost(body, model)
        request = self.request(body, model, meta)
        self.endpoint.modality.check(request[0] if isinstance(request, list) else request, model.capabilities)
        return request


def _state(http: Request) -> EdgeState:
    return http.app.state.edge


def authorization(http: Request) -> tuple[str, ...]:
    return tuple(value.decode("latin-1") for key, value in http.scope["headers"] if key == b"authorization")


async def refuse(http: Request, endpoint: str, error: ServiceError) -> NoReturn:
    """Refuses a request before it reaches a model, checking the key first: a caller
    without a valid key is told that, and nothing about the request or the catalog."""
    await _state(http).admission.admit(Ask(authorization(http), endpoint))
    raise error


async def identify(http: Request, endpoint: Endpoint) -> Admitted:
    """Who is calling, without admitting a model call: for reads of what a caller stored."""
    return await _state(http).admission.admit(Ask(authorization(http), endpoint.name))


async def parse(http: Request, endpoint: Endpoint, model: type[M]) -> M:
    try:
        body = await http.body()
        await json_budget.check(body, _state(http).settings.max_json_weight)
        parsed = parse_body(model, body)
    except ServiceError as exc:
        await refuse(http, endpoint.name, exc)
    if len(body) >= LARGE_BODY:
        http.scope[_LARGE] = True  # the scope, not request.state: one dict lookup on the hot path
        await asyncio.sleep(0)
    return parsed


async def breathe(http: Request | None) -> None:
    """Between the pipeline's stages of a large request (parsed, admitted, built, called): each stage of a
    16 MiB request holds the loop tens of milliseconds, all of them together more than the loop-lag
    bound (README: Input limits), so the loop serves others in between."""
    if http is not None and _LARGE in http.scope:
        await asyncio.sleep(0)


async def query(http: Request, endpoint: Endpoint, model: type[M]) -> M:
    """The query string, the one way every endpoint reads it: a bad value is a 400 naming it (never
    FastAPI's 422), with the key checked first."""
    try:
        return model.model_validate(dict(http.query_params))
    except ValidationError as exc:
        await refuse(http, endpoint.name, validation_error(exc))


async def open_call(
    http: Request, endpoint: Endpoint, model_name: str, cost: int | Callable[[catalog_pb2.Model], int] = 0
) -> Call:
    """Resolves and admits. ``cost`` is what admission reserves (tokens, or the modality's units); a
    callable gets the resolved model, for bounds that depend on it (a context length), and may refuse
    the request (a ServiceError) before admission: a request the model can never serve is a 400, not a
    429 for a reservation no budget will ever cover."""
    state = _state(http)
    try:
        model = state.catalog.resolve(model_name, endpoint.modality.proto)
        reserve = cost(model) if callable(cost) else cost
    except ServiceError as exc:
        await refuse(http, endpoint.name, exc)
    admitted = await state.admission.admit(Ask(authorization(http), endpoint.name, model.id, reserve))
    await breathe(http)
    return Call(http, state, endpoint, model, admitted)


def background_call(state: EdgeState, endpoint: Endpoint, model_name: str, admitted: Admitted) -> Call:
    """A call admitted earlier by a request that has since been answered (a background response),
    run by a worker with no HTTP request to watch; it is accounted with that admission's ticket."""
    model = state.catalog.resolve(model_name, endpoint.modality.proto)
    return Call(None, state, endpoint, model, admitted)


def batch_call(state: EdgeState, endpoint: Endpoint, model: catalog_pb2.Model, admitted: Admitted) -> Call:
    """One line of a batch, run by the batch worker: below interactive traffic (the backend is told
    ``x-modelplex-priority: batch``), accounted with the batch's admission (its key, outside its RPM/TPM)."""
    return Call(None, state, endpoint, model, admitted, priority=BATCH)


class Call:
    """One admitted request on its way to a backend and back.

    Used as ``async with``: a failure before a response is handed over is
    accounted as failed. A streaming response accounts when its stream ends.
    """

    def __init__(
        self,
        http: Request | None,
        state: EdgeState,
        endpoint: Endpoint,
        model: catalog_pb2.Model,
        admitted: Admitted,
        priority: str = "",
    ) -> None:
        self.http = http
        self.model = model
        self.endpoint = endpoint
        self.admitted = admitted
        self.used = Consumption()
        self._state = state
        self._started = (http.scope.get("modelplex.start") if http else None) or time.perf_counter()
        self._labels = (model.id, endpoint.name)
        self._stub = state.backends.stub(endpoint.modality, model.backend_target)
        self._options = state.backends.call_options(request_id_var.get(), priority)
        self._handed_off = False
        self._finished = False
        #: A response stream is being relayed (``watched``), and whether it ran to its end.
        self._relaying = False
        self._relayed_whole = False
        #: The backend holds the stream for a cold start: its SSE response keeps the connection alive.
        self._held = False
        labelled(REQUESTS_RUNNING, *self._labels).inc()

    async def __aenter__(self) -> Call:
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self.used.ended = self._why_ended(exc)
        if exc is not None or not self._handed_off:
            await self.finish(failed=exc is not None)

    def _why_ended(self, exc: BaseException) -> str:
        """Why a call that raised stopped early ("" for the request's own fault, e.g. a 400)."""
        if isinstance(exc, asyncio.CancelledError):
            return DRAIN if self._state.drain.fired else CLIENT_DISCONNECT
        if isinstance(exc, ServiceError) and exc.status == grpc.StatusCode.CANCELLED:
            return CLIENT_DISCONNECT  # until_disconnect's: the client left while the backend worked
        if isinstance(exc, ServiceError) and exc.status in _UPSTREAM_STATUSES:
            return UPSTREAM_FAILURE
        return ""

    @property
    def state(self) -> EdgeState:
        """What the edge shares (stores), for endpoints that keep what they answered."""
        return self._state

    # -- request ----------------------------------------------------------------
    def meta(self, end_user: str | None = None) -> common_pb2.RequestMeta:
        return common_pb2.RequestMeta(
            request_id=request_id_var.get(), principal_id=self.admitted.principal_id, end_user=end_user or ""
        )

    def check(self, request: Message) -> None:
        self.endpoint.modality.check(request, self.model.capabilities)

    # -- backend calls ------------------------------------------------------------
    async def unary(self, method: str, request: Message) -> Any:
        await breathe(self.http)
        self.endpoint.modality.bind(request, self.model)
        response = await until_disconnect(self.http, getattr(self._stub, method)(request, **self._options))
        self.endpoint.meter(response, self.used)
        return response

    async def unary_each(self, method: str, requests: list[Message]) -> list[Any]:
        """One call per request, at most FAN_OUT at a time; one failure cancels the rest."""
        await breathe(self.http)
        started = asyncio.Semaphore(FAN_OUT)

        async def one(request: Message) -> Any:
            self.endpoint.modality.bind(request, self.model)
            async with started:
                return await getattr(self._stub, method)(request, **self._options)

        responses = await until_disconnect(self.http, all_of([one(request) for request in requests]))
        for response in responses:
            self.endpoint.meter(response, self.used)
        return responses

    async def delegate(self, modality: Modality, model_name: str, method: str, request: Message) -> Any:
        """One unary call to another catalog model on this request's behalf (a text model translating a
        transcript); its token usage is accounted to this call."""
        model = self._state.catalog.resolve(model_name, modality.proto)
        stub = self._state.backends.stub(modality, model.backend_target)
        request.model = model.id  # type: ignore[attr-defined]
        modality.bind(request, model)
        response = await until_disconnect(self.http, getattr(stub, method)(request, **self._options))
        meter_usage(response, self.used)
        return response

    async def stream(self, method: str, request: Message, keep_alive: bool = False) -> AsyncIterator[Any]:
        """Opens a server stream now (its errors still get an HTTP status) and returns its messages.
        ``keep_alive`` (an SSE response follows): a stream the backend holds for a cold start is returned
        before its first message, and ``respond_stream`` keeps the connection alive until it comes."""
        await breathe(self.http)
        self.endpoint.modality.bind(request, self.model)
        call = getattr(self._stub, method)(request, **self._options)
        opened = await until_disconnect(self.http, open_stream(call, self._mark_held if keep_alive else None))
        return self._observed(opened)

    def _mark_held(self) -> None:
        self._held = True

    def lazy_stream(self, method: str, request: Message) -> AsyncIterator[Any]:
        """A stream opened only when first read (later prompts of a multi-prompt request)."""

        async def messages() -> AsyncIterator[Any]:
            async for message in await self.stream(method, request):
                yield message

        return messages()

    async def _observed(self, messages: AsyncIterator[Any]) -> AsyncIterator[Any]:
        ttft, itl = labelled(TIME_TO_FIRST_TOKEN, *self._labels), labelled(INTER_TOKEN_LATENCY, *self._labels)
        last = None
        async for message in messages:
            now = time.perf_counter()
            if last is None:
                ttft.observe(now - self._started)
            else:
                itl.observe(now - last)
            last = now
            self.endpoint.meter(message, self.used)
            yield message

    # -- responses ------------------------------------------------------------------
    def respond(self, body: Any) -> Response:
        return json_response(body, headers=self.admitted.headers or None)

    def respond_stream(self, chunks: AsyncIterator[Any], **kwargs: Any) -> Response:
        """An SSE response; the call is accounted when the stream ends, however it ends."""
        self._handed_off = True
        return sse_response(
            self.watched(chunks),
            headers=self.admitted.headers,
            on_close=self.finish,
            drain=self._state.drain,
            keepalive_seconds=self._state.settings.stream_keepalive_seconds if self._held else 0.0,
            **kwargs,
        )

    def defer(self) -> None:
        """The work goes on in a background job, which accounts it (``background_call`` with this
        call's ``admitted``): this request ends here without accounting anything."""
        self._handed_off = self._finished = True
        self._done_running()

    def hand_off(self) -> None:
        """For custom streaming responses: the caller promises to await ``finish`` when done."""
        self._handed_off = True

    async def watched(self, chunks: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """Relays a response stream, noting how it ended: whole, or cut (then ``finish`` says why)."""
        self._relaying = True
        try:
            async for chunk in chunks:
                yield chunk
        except Exception:
            self.used.ended = UPSTREAM_FAILURE  # the backend failed mid-stream (it becomes an error event)
            raise
        self._relayed_whole = True

    def _done_running(self) -> None:
        labelled(REQUESTS_RUNNING, *self._labels).dec()

    async def finish(self, failed: bool = False) -> None:
        if self._finished:
            return
        self._finished = True
        if self._relaying and not self._relayed_whole and not self.used.ended:
            # Cut without an error of its own: the edge's drain cancelled it, or the client left.
            self.used.ended = DRAIN if self._state.drain.fired else CLIENT_DISCONNECT
        failed = failed or self.used.ended == UPSTREAM_FAILURE  # a stream whose backend failed mid-way too
        self.used.settle()
        self._done_running()
        labelled(E2E_REQUEST_LATENCY, *self._labels).observe(time.perf_counter() - self._started)
        usage = self.used.usage
        if usage.prompt_tokens:
            labelled(PROMPT_TOKENS, self.model.id).inc(usage.prompt_tokens)
        if usage.completion_tokens:
            labelled(GENERATION_TOKENS, self.model.id).inc(usage.completion_tokens)
        if self.used.units:
            labelled(REQUEST_UNITS, self.model.id, self.used.unit_kind).inc(self.used.units)
        await self._state.admission.account(self.admitted, self.used, failed)
