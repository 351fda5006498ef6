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
from modelplex_text.engine import TextEngine


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
        async with aclosing(self._engine.stream(request)) as events:
            async for batch in ready_batches(events):
                deltas = []
                for event in batch:
                    if isinstance(event, common_pb2.Usage):
                        usage = event
                    else:
                        deltas.append(event)
                if deltas:
                    yield text_pb2.GenerateStreamResponse(**header, deltas=merge_deltas(deltas))
        yield text_pb2.GenerateStreamResponse(**header, usage=usage)

    async def Generate(self, request, context: grpc.aio.ServicerContext) -> text_pb2.GenerateResponse:
        await check(request, self._capabilities)
        choices = [text_pb2.Choice(index=i) for i in range(max(1, request.n))]
        usage = common_pb2.Usage()
        async with aclosing(self._engine.stream(request, incremental=False)) as events:
            async for event in events:
                if isinstance(event, common_pb2.Usage):
                    usage = event
                else:
                    merge_delta(choices[event.index], event)
        return text_pb2.GenerateResponse(
            id=uuid.uuid4().hex, model=request.model, created=int(time.time()), choices=choices, usage=usage
        )


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
