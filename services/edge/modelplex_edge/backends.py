"""gRPC channels to backends, and the call helpers every route uses.

One channel per backend target, created on first use and shared. The helpers
carry the request id and trace context, apply the deadline, cancel the call
when the HTTP client goes away, and turn gRPC failures into ServiceErrors.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import grpc
from starlette.requests import Request

from modelplex.v1 import text_pb2_grpc
from modelplex_kit.errors import ServiceError
from modelplex_kit.telemetry import outgoing_metadata

T = TypeVar("T")

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Spread calls over every backend pod behind a headless Service.
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target if "://" in target else f"dns:///{target}", options=_CHANNEL_OPTIONS)


class Backends:
    def __init__(self, timeout_seconds: float) -> None:
        self.timeout = timeout_seconds
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._text: dict[str, text_pb2_grpc.TextGenerationServiceStub] = {}

    def _channel(self, target: str) -> grpc.aio.Channel:
        if target not in self._channels:
            self._channels[target] = channel(target)
        return self._channels[target]

    def text(self, target: str) -> text_pb2_grpc.TextGenerationServiceStub:
        stub = self._text.get(target)
        if stub is None:
            stub = self._text[target] = text_pb2_grpc.TextGenerationServiceStub(self._channel(target))
        return stub

    def call_options(self, request_id: str) -> dict[str, Any]:
        return {"metadata": outgoing_metadata(request_id), "timeout": self.timeout}

    async def close(self) -> None:
        await asyncio.gather(*(ch.close() for ch in self._channels.values()))


async def _disconnected(request: Request) -> None:
    # After the body is read, receive() only returns when the client leaves.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Awaits backend work, cancelling it (and so its gRPC calls) if the HTTP client leaves first."""
    watcher = asyncio.ensure_future(_disconnected(request))
    work = asyncio.ensure_future(awaitable)
    try:
        await asyncio.wait((work, watcher), return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            raise ServiceError(grpc.StatusCode.CANCELLED, "The client closed the request.")
        return work.result()
    except grpc.aio.AioRpcError as exc:
        raise ServiceError.from_rpc_error(exc) from None
    finally:
        watcher.cancel()
        work.cancel()  # no-op once done; stops the backend calls if we were cancelled ourselves


async def all_of(calls: list[Awaitable[T]]) -> list[T]:
    """Like gather, but one failure cancels the other calls instead of leaving them running."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def open_stream(call: grpc.aio.UnaryStreamCall) -> AsyncIterator[Any]:
    """Starts a server stream and waits for its first message.

    Failures before any output (bad request, model down) thus still get their
    own HTTP status instead of a 200 with an error event. The returned
    iterator cancels the call when closed early, e.g. on client disconnect.
    """
    iterator = call.__aiter__()
    try:
        first = await iterator.__anext__()
    except StopAsyncIteration:
        first = None
    except grpc.aio.AioRpcError as exc:
        raise ServiceError.from_rpc_error(exc) from None
    except BaseException:  # cancelled (the client left while queued): the backend must hear of it
        call.cancel()
        raise
    return _rest(call, iterator, first)


async def _rest(call: grpc.aio.UnaryStreamCall, iterator: AsyncIterator[Any], first: Any) -> AsyncIterator[Any]:
    try:
        if first is not None:
            yield first
            async for message in iterator:
                yield message
    finally:
        call.cancel()  # no-op once the stream completed
