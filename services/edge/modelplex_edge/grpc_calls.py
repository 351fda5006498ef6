"""Awaiting backend calls on behalf of an HTTP client.

Each helper cancels the gRPC call when the HTTP client goes away (so the
backend aborts its engine's work) and turns gRPC failures into ServiceErrors.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from starlette.requests import Request

from modelplex_kit import cold_start
from modelplex_kit.errors import ServiceError

T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    # After the body is read, receive() only returns when the client leaves.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request | None, awaitable: Awaitable[T]) -> T:
    """Awaits backend work, cancelling it (and so its gRPC calls) if the HTTP client leaves first.
    Without a request (a background job's call) it only maps gRPC errors; cancelling the task cancels it.

    The work runs in the request's own task and only the watcher gets a task of its own (one task per
    call, not two plus asyncio.wait's bookkeeping): a disconnect cancels the request's task, and that
    cancellation becomes a CANCELLED ServiceError here."""
    if request is None:
        try:
            return await awaitable
        except grpc.aio.AioRpcError as exc:
            raise ServiceError.from_rpc_error(exc) from None
    task = asyncio.current_task()
    assert task is not None
    watching, left = True, False

    def client_left(watcher: asyncio.Future) -> None:
        nonlocal left
        if watching and not watcher.cancelled() and watcher.exception() is None:
            left = True
            task.cancel()

    watcher = asyncio.ensure_future(_disconnected(request))
    watcher.add_done_callback(client_left)
    try:
        return await awaitable
    except asyncio.CancelledError:
        if not left or task.uncancel():
            raise  # cancelled by someone else (the server's shutdown), or by someone else too
        raise ServiceError(grpc.StatusCode.CANCELLED, "The client closed the request.") from None
    except grpc.aio.AioRpcError as exc:
        raise ServiceError.from_rpc_error(exc) from None
    finally:
        watching = False  # a watcher finishing from here on must not cancel the task's later work
        watcher.cancel()


async def all_of(calls: list[Awaitable[T]]) -> list[T]:
    """Like gather, but one failure cancels the other calls instead of leaving them running."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def open_stream(
    call: grpc.aio.UnaryStreamCall, on_held: Callable[[], None] | None = None
) -> AsyncIterator[Any]:
    """Starts a server stream and waits for its first message.

    Failures before any output (bad request, model down) thus still get their
    own HTTP status instead of a 200 with an error event. The returned
    iterator cancels the call when closed early, e.g. on client disconnect.

    With ``on_held``: a stream the backend holds for a cold start (it says so in its headers, before any
    message: ``modelplex_kit.cold_start``) is returned at once, ``on_held`` called, so the caller can answer
    and keep the connection alive while the model starts.
    """
    iterator = call.__aiter__()
    try:
        if on_held is not None and cold_start.is_held(await call.initial_metadata()):
            on_held()
            return _rest(call, iterator, _PENDING)
        first = await iterator.__anext__()
    except StopAsyncIteration:
        first = None
    except grpc.aio.AioRpcError as exc:
        raise ServiceError.from_rpc_error(exc) from None
    except BaseException:  # cancelled (the client left while queued): the backend must hear of it
        call.cancel()
        raise
    return _rest(call, iterator, first)


#: ``_rest``'s first message when it was not awaited yet (a held stream).
_PENDING = object()


async def _rest(call: grpc.aio.UnaryStreamCall, iterator: AsyncIterator[Any], first: Any) -> AsyncIterator[Any]:
    try:
        if first is not None:
            if first is not _PENDING:
                yield first
            async for message in iterator:
                yield message
    except grpc.aio.AioRpcError as exc:
        raise ServiceError.from_rpc_error(exc) from None
    finally:
        call.cancel()  # no-op once the stream completed
