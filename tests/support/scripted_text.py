"""An edge in-process over a scripted text backend, for edge tests that need exact control of what the
engine answers (tool calls mid-stream, a stream that breaks, logprobs) without loading a model.

The backend speaks the real TextGenerationService and CatalogService protocols over real gRPC; the edge
is the real app served by uvicorn on a free port, so clients are the official SDK over HTTP. Beside it, in
the same process and over the same state (its in-memory stores included), runs what the jobs process runs
(``JobsRunner``: batches and background responses), unless a test asks for none (``jobs=False``). What the
engine says is a pure function of the request, documented on ``Scripted``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import uvicorn

from modelplex.v1 import catalog_pb2, catalog_pb2_grpc, common_pb2, text_pb2, text_pb2_grpc
from modelplex_edge.app import create_app
from modelplex_edge.jobs.runner import JobsRunner
from modelplex_edge.settings import EdgeSettings
from modelplex_edge.state import EdgeState
from modelplex_kit.errors import ERROR_DETAIL_KEY
from modelplex_kit.modalities.text import max_tokens_too_large
from tests.support.ports import free_port

CONTEXT_LENGTH = 4096
ARGUMENTS = ['{"city": ', '"Paris"}']


def _last_text(request: text_pb2.GenerateRequest) -> str:
    message = request.chat.messages[-1]
    return " ".join(part.text for part in message.content if part.WhichOneof("part") == "text")


def _prompt_tokens(request: text_pb2.GenerateRequest) -> int:
    return sum(len(part.text.split()) + 1 for m in request.chat.messages for part in m.content)


SLOW_SECONDS = 0.3


class Scripted(text_pb2_grpc.TextGenerationServiceServicer):
    """The engine's script:

    - tools with tool_choice required or named: one call of the named (else the first) tool with
      arguments {"city": "Paris"} (streamed in two fragments), finish reason tool_calls;
    - otherwise the text "echo: <the last message's text>" one word a token, cut at max_tokens
      (finish reason length), else finish reason stop;
    - a last message containing BREAK: the stream fails after its first token;
    - a last message containing SLOW: a streamed token every SLOW_SECONDS (a long generation to cancel);
      a stream cancelled by its caller is counted in ``cancelled``;
    - with logprobs: each token -0.5, its alternatives -1, -2, ...;
    - prompt tokens: the words of every message plus one each; a prompt over CONTEXT_LENGTH is refused
      as the llama.cpp engine refuses it, and so is a max_tokens beyond what the prompt leaves.
    """

    def __init__(self) -> None:
        self.requests: list[text_pb2.GenerateRequest] = []
        self.cancelled = 0

    def _check(self, request: text_pb2.GenerateRequest) -> None:
        self.requests.append(request)

    def _call(self, request: text_pb2.GenerateRequest) -> text_pb2.ToolCall | None:
        mode = request.tool_choice.mode
        if not request.tools or mode not in (text_pb2.ToolChoice.MODE_REQUIRED, text_pb2.ToolChoice.MODE_NAMED):
            return None
        name = request.tool_choice.function_name or request.tools[0].name
        return text_pb2.ToolCall(id=f"call_{len(self.requests)}", name=name, arguments="".join(ARGUMENTS))

    def _words(self, request: text_pb2.GenerateRequest) -> tuple[list[str], int]:
        words = ("echo: " + _last_text(request)).split()
        bound = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else len(words)
        finish = text_pb2.FINISH_REASON_LENGTH if len(words) > bound else text_pb2.FINISH_REASON_STOP
        tokens = [word if i == 0 else " " + word for i, word in enumerate(words[:bound])]
        return tokens, finish

    @staticmethod
    def _logprobs(request: text_pb2.GenerateRequest, token: str) -> list[text_pb2.TokenLogprob]:
        if not request.logprobs:
            return []
        tops = [text_pb2.TopLogprob(token=f"alt{i}", logprob=-1.0 - i) for i in range(request.top_logprobs)]
        return [text_pb2.TokenLogprob(token=token, logprob=-0.5, token_bytes=token.encode(), top_logprobs=tops)]

    @staticmethod
    def _usage(request: text_pb2.GenerateRequest, completion: int) -> common_pb2.Usage:
        prompt = _prompt_tokens(request)
        return common_pb2.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def _refuse_long(self, request: text_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        prompt = _prompt_tokens(request)
        if prompt >= CONTEXT_LENGTH:
            detail = common_pb2.ErrorDetail(param="messages", code="context_length_exceeded")
            await context.abort(
                grpc.StatusCode.OUT_OF_RANGE,
                f"This model's maximum context length is {CONTEXT_LENGTH} tokens.",
                trailing_metadata=((ERROR_DETAIL_KEY, detail.SerializeToString()),),
            )
        asked = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else 0
        if asked > CONTEXT_LENGTH - prompt:
            refused = max_tokens_too_large(asked, CONTEXT_LENGTH, prompt)
            await context.abort(refused.status, refused.message, trailing_metadata=refused.trailing_metadata())

    async def Generate(self, request, context):
        self._check(request)
        await self._refuse_long(request, context)
        call = self._call(request)
        if call is not None:
            choice = text_pb2.Choice(tool_calls=[call], finish_reason=text_pb2.FINISH_REASON_TOOL_CALLS)
            return text_pb2.GenerateResponse(id="x", choices=[choice], usage=self._usage(request, 8))
        tokens, finish = self._words(request)
        logprobs = [lp for token in tokens for lp in self._logprobs(request, token)]
        choice = text_pb2.Choice(text="".join(tokens), finish_reason=finish, logprobs=logprobs)
        return text_pb2.GenerateResponse(id="x", choices=[choice], usage=self._usage(request, len(tokens)))

    async def GenerateStream(self, request, context):
        self._check(request)
        await self._refuse_long(request, context)
        call = self._call(request)
        if call is not None:
            first = text_pb2.ToolCallDelta(id=call.id, name=call.name, arguments=ARGUMENTS[0])
            yield text_pb2.GenerateStreamResponse(deltas=[text_pb2.ChoiceDelta(tool_calls=[first])])
            rest = text_pb2.ToolCallDelta(arguments=ARGUMENTS[1])
            last = text_pb2.ChoiceDelta(tool_calls=[rest], finish_reason=text_pb2.FINISH_REASON_TOOL_CALLS)
            yield text_pb2.GenerateStreamResponse(deltas=[last])
            yield text_pb2.GenerateStreamResponse(usage=self._usage(request, 8))
            return
        tokens, finish = self._words(request)
        try:
            async for message in self._stream_tokens(request, context, tokens, finish):
                yield message
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def _stream_tokens(self, request, context, tokens: list[str], finish: int):
        slow = "SLOW" in _last_text(request)
        for i, token in enumerate(tokens):
            if slow:
                await asyncio.sleep(SLOW_SECONDS)
            if i == 1 and "BREAK" in _last_text(request):
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine went away")
            delta = text_pb2.ChoiceDelta(
                text=token,
                logprobs=self._logprobs(request, token),
                finish_reason=finish if i == len(tokens) - 1 else text_pb2.FINISH_REASON_UNSPECIFIED,
            )
            yield text_pb2.GenerateStreamResponse(deltas=[delta])
        yield text_pb2.GenerateStreamResponse(usage=self._usage(request, len(tokens)))


class OneCatalog(catalog_pb2_grpc.CatalogServiceServicer):
    def __init__(self, models: list[catalog_pb2.Model]) -> None:
        self.models = models

    async def WatchModels(self, request, context):
        yield catalog_pb2.WatchModelsResponse(models=self.models, revision=1)
        await asyncio.Event().wait()  # no further changes


def text_model(model_id: str, target: str, flags: tuple[str, ...]) -> catalog_pb2.Model:
    caps = catalog_pb2.Capabilities(text=catalog_pb2.TextCapabilities(**dict.fromkeys(flags, True)))
    return catalog_pb2.Model(
        id=model_id,
        modality=catalog_pb2.MODALITY_TEXT,
        backend_target=target,
        capabilities=caps,
        context_length=CONTEXT_LENGTH,
        created=1,
    )


@dataclass(slots=True)
class Edge:
    base_url: str
    engine: Scripted
    settings: EdgeSettings
    servers: list = field(default_factory=list)
    #: The edge app's state (its stores, catalog copy, admission), shared with ``jobs``.
    state: EdgeState | None = None
    #: The jobs process's workers, run in this process over the edge's state (None: ``jobs=False``).
    jobs: JobsRunner | None = None


@dataclass(slots=True)
class Backend:
    target: str
    engine: Scripted


@contextlib.asynccontextmanager
async def scripted_backend() -> AsyncIterator[Backend]:
    """The scripted engine and a catalog of its models on one gRPC port (for edges started apart)."""
    engine = Scripted()
    backend = grpc.aio.server()
    target = f"127.0.0.1:{free_port()}"
    text_pb2_grpc.add_TextGenerationServiceServicer_to_server(engine, backend)
    models = [
        text_model("scripted", target, ("chat", "tool_use", "logprobs", "json_schema", "vision")),
        text_model("plain", target, ("chat",)),
    ]
    catalog_pb2_grpc.add_CatalogServiceServicer_to_server(OneCatalog(models), backend)
    backend.add_insecure_port(target)
    await backend.start()
    try:
        yield Backend(target, engine)
    finally:
        await backend.stop(None)


@contextlib.asynccontextmanager
async def edge_on(backend: Backend, jobs: bool = True, **settings) -> AsyncIterator[Edge]:
    """An edge in this process, serving ``backend``'s models; ``jobs``: with the jobs process's workers
    running here over its state (their counts are the edge settings', as in the jobs process)."""
    edge_settings = EdgeSettings(port=free_port(), catalog_target=backend.target, **settings)
    app = create_app(edge_settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=edge_settings.port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    runner = None
    try:
        while not server.started:
            if serving.done():
                serving.result()
            await asyncio.sleep(0.02)
        if jobs:
            runner = JobsRunner(app.state.edge).start()
        url = f"http://127.0.0.1:{edge_settings.port}/v1"
        yield Edge(url, backend.engine, edge_settings, state=app.state.edge, jobs=runner)
    finally:
        if runner is not None:
            await runner.stop()
        server.should_exit = True
        await serving


@contextlib.asynccontextmanager
async def scripted_edge(jobs: bool = True, **settings) -> AsyncIterator[Edge]:
    """Models: `scripted` (chat, tools, logprobs, json_schema, vision), `plain` (chat only)."""
    async with scripted_backend() as backend, edge_on(backend, jobs, **settings) as edge:
        yield edge
