"""The TextGenerationService: ids, capability checks and aggregation around an engine."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from modelplex.v1 import catalog_pb2, common_pb2, text_pb2, text_pb2_grpc
from modelplex_kit.modalities.text import check_and_fit_text_request
from modelplex_text.batching import merge_deltas, ready_batches
from modelplex_text.constraints import check_request
from modelplex_text.engine import Progress, TextEngine


class TextGenerationServicer(text_pb2_grpc.TextGenerationServiceServicer):
    def __init__(self, engine: TextEngine) -> None:
        self._engine = engine
        self._capabilities = catalog_pb2.Capabilities(text=engine.capabilities)

    async def GenerateStream(
        self, request, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[text_pb2.GenerateStreamResponse]:
        await check(request, self._capabilities)
        header = {"id": uuid.uuid4().hex, "model": request.model, "created": int(time.time())}
        usage = common_pb2.Usage()
        progress = RunningUsage()
        async with aclosing(self._engine.stream(request)) as events:
            async for batch in ready_batches(events):
                deltas = []
                for event in batch:
                    if isinstance(event, common_pb2.Usage):
                        usage = event
                    elif isinstance(event, Progress):
                        progress.engine_says(event)
                    else:
                        progress.delta_seen()
                        deltas.append(event)
                if deltas:
                    yield text_pb2.GenerateStreamResponse(
                        **header, deltas=merge_deltas(deltas), progress=progress.usage()
                    )
        yield text_pb2.GenerateStreamResponse(**header, usage=usage, progress=usage)

    async def Generate(self, request, context: grpc.aio.ServicerContext) -> text_pb2.GenerateResponse:
        await check(request, self._capabilities)
        choices = [text_pb2.Choice(index=i) for i in range(max(1, request.n))]
        usage = common_pb2.Usage()
        async with aclosing(self._engine.stream(request, incremental=False)) as events:
            async for event in events:
                if isinstance(event, common_pb2.Usage):
                    usage = event
                elif not isinstance(event, Progress):  # a unary answer is accounted whole, or not at all
                    merge_delta(choices[event.index], event)
        return text_pb2.GenerateResponse(
            id=uuid.uuid4().hex, model=request.model, created=int(time.time()), choices=choices, usage=usage
        )


class RunningUsage:
    """What a stream has consumed so far, sent on each message so an interrupted stream is still metered.

    Engines that report ``Progress`` are taken at their word; for those that do not (an OpenAI-compatible
    upstream), each delta counts as one token: upstreams stream about one token per chunk.
    """

    def __init__(self) -> None:
        self._reported = Progress(0, 0)
        self._deltas = 0

    def engine_says(self, progress: Progress) -> None:
        self._reported = progress

    def delta_seen(self) -> None:
        self._deltas += 1

    def usage(self) -> common_pb2.Usage:
        completion = max(self._reported.completion_tokens, self._deltas)
        prompt = self._reported.prompt_tokens
        return common_pb2.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def check(request: text_pb2.GenerateRequest, capabilities: catalog_pb2.Capabilities) -> None:
    """Rejects what the engine cannot serve, and tools or schemas beyond the structured-output limits.

    The same schema limits hold whichever engine enforces the schema (local or upstream).
    """
    check_and_fit_text_request(request, capabilities)
    if request.tools or request.response_format.type != text_pb2.ResponseFormat.TYPE_UNSPECIFIED:
        # Off the event loop: a schema within the limits still takes milliseconds to compile.
        await asyncio.to_thread(check_request, request)


def merge_delta(choice: text_pb2.Choice, delta: text_pb2.ChoiceDelta) -> None:
    """Appends a streamed delta to the choice it belongs to."""
    choice.text += delta.text
    for fragment in delta.tool_calls:
        while len(choice.tool_calls) <= fragment.index:
            choice.tool_calls.add()
        call = choice.tool_calls[fragment.index]
        call.id = call.id or fragment.id
        call.name += fragment.name
        call.arguments += fragment.arguments
    choice.logprobs.extend(delta.logprobs)
    if delta.finish_reason:
        choice.finish_reason = delta.finish_reason
