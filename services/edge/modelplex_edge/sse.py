"""Server-sent events: framing, mid-stream errors and the closing [DONE].

Every streaming endpoint hands this module an async iterator of JSON-able
chunks; the framing and the failure behaviour live here once. A failure after
the first byte cannot change the HTTP status any more, so it becomes an
``error`` event (which the OpenAI SDKs raise as APIError), then ``[DONE]``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import orjson
from starlette.responses import StreamingResponse

from modelplex_kit.errors import ServiceError

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(data: Any) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


async def _frames(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield event(chunk)
    except grpc.aio.AioRpcError as exc:
        yield event(ServiceError.from_rpc_error(exc).envelope())
    except ServiceError as exc:
        yield event(exc.envelope())
    except Exception:  # never a traceback to the client; the envelope says what it can
        log.exception("stream failed")
        yield event(ServiceError(grpc.StatusCode.INTERNAL, "The server had an error while streaming.").envelope())
    yield DONE


def sse_response(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    return StreamingResponse(_frames(chunks), media_type="text/event-stream", headers=HEADERS)
