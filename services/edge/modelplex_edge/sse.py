"""Server-sent events: framing, mid-stream errors, the closing [DONE], and drain.

Every streaming endpoint hands this module an async iterator of JSON-able
chunks; the framing and the failure behaviour live here once. A failure after
the first byte cannot change the HTTP status any more, so it becomes an
``error`` event (which the OpenAI SDKs raise as APIError), then ``[DONE]``.
When the edge is told to stop (SIGTERM), streams still running at the end of
the grace period are closed the same way, so no client sees a truncated body.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from modelplex_kit.errors import ServiceError

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_SHUTTING_DOWN = "The server is restarting; the stream was closed before it finished. Please retry."


#: What a held stream sends while it waits for its first chunk (a comment: every SSE client skips it).
KEEPALIVE = b": the model is starting\n\n"


def event(data: Any, name: str | None = None) -> bytes:
    head = b"event: " + name.encode() + b"\n" if name else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


class Drain:
    """Closes the streams still open when the edge must stop."""

    def __init__(self) -> None:
        self.fired = False
        self._streams: set[asyncio.Task] = set()
        self._loop = asyncio.get_running_loop()

    def schedule(self, delay: float) -> None:
        """Fires after ``delay`` seconds; safe to call from a signal handler."""
        self._loop.call_soon_threadsafe(self._loop.call_later, max(0.0, delay), self.fire)

    def track(self, task: asyncio.Task) -> None:
        self._streams.add(task)

    def untrack(self, task: asyncio.Task) -> None:
        self._streams.discard(task)

    def fire(self) -> None:
        if self._streams:
            log.warning(
                "closing streams still open at the end of the grace period", extra={"streams": len(self._streams)}
            )
        self.fired = True
        for task in list(self._streams):
            task.cancel("drain")


def _error_frame(exc: BaseException) -> bytes:
    if isinstance(exc, ServiceError):
        return event(exc.envelope())
    if isinstance(exc, grpc.aio.AioRpcError):
        return event(ServiceError.from_rpc_error(exc).envelope())
    log.error("stream failed", exc_info=exc)  # never a traceback to the client
    return event(ServiceError(grpc.StatusCode.INTERNAL, "The server had an error while streaming.").envelope())


async def _kept_alive(chunks: AsyncIterator[Any], every: float) -> AsyncIterator[Any]:
    """``chunks``, with a keepalive comment every ``every`` seconds until the first one comes (a stream held
    for a cold start: proxies and clients must not take the silence for a dead connection)."""
    iterator = chunks.__aiter__()
    first = asyncio.ensure_future(iterator.__anext__())
    try:
        while not (await asyncio.wait({first}, timeout=every))[0]:
            yield KEEPALIVE
        try:
            yield first.result()
        except StopAsyncIteration:
            return
    finally:
        first.cancel()
    async for chunk in iterator:
        yield chunk


async def _frames(
    chunks: AsyncIterator[Any], done: bytes | None = DONE, drain: Drain | None = None
) -> AsyncIterator[bytes]:
    task = asyncio.current_task()
    if drain is not None and task is not None:
        drain.track(task)
    try:
        async for chunk in chunks:
            yield chunk if isinstance(chunk, bytes) else event(chunk)
    except asyncio.CancelledError:
        if drain is None or not drain.fired or task is None:
            raise
        task.uncancel()  # our own drain, not the client leaving: finish the body properly
        yield event(ServiceError(grpc.StatusCode.UNAVAILABLE, _SHUTTING_DOWN).envelope())
    except Exception as exc:
        yield _error_frame(exc)
    finally:
        if drain is not None and task is not None:
            drain.untrack(task)
    if done:
        yield done


class SSEResponse(StreamingResponse):
    """A StreamingResponse whose ``on_close`` runs however the response ends,
    even when the client leaves before the first chunk was produced."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]] | None, **kw: Any):
        super().__init__(content, media_type="text/event-stream", **kw)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._on_close is not None:
                await self._on_close()


def sse_response(
    chunks: AsyncIterator[Any],
    *,
    headers: dict[str, str] | None = None,
    on_close: Callable[[], Awaitable[None]] | None = None,
    drain: Drain | None = None,
    done: bytes | None = DONE,
    keepalive_seconds: float = 0.0,
) -> StreamingResponse:
    """``keepalive_seconds`` > 0: comments at that interval until the first chunk (a held stream)."""
    if keepalive_seconds > 0:
        chunks = _kept_alive(chunks, keepalive_seconds)
    return SSEResponse(_frames(chunks, done, drain), on_close, headers={**HEADERS, **(headers or {})})
