"""A streamed call held for a cold start tells its caller at once, as gRPC initial metadata.

A backend pool with no replica ready holds a request until one starts (``pools.pool``). The edge waits for
a stream's first message before it answers (so failures keep their HTTP status); a held stream instead
announces itself with the header ``x-modelplex-held`` before any message, and the edge answers 200 and
keeps the client's connection alive with SSE comments until the first message comes (``modelplex_edge.sse``).

``grpc_server`` sets the announcer for each server-streaming call; the pool calls ``announce_held()``
when it starts holding (a no-op outside a streamed call, and after the first time).
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

log = logging.getLogger(__name__)

#: How long a request may wait for a model scaled to zero to start, unless its catalog entry says: a GPU
#: engine loading cached weights takes one to three minutes; the OpenAI SDKs' own timeout is ten.
DEFAULT_COLD_START_TIMEOUT_S = 300.0

HELD_HEADER = "x-modelplex-held"
HELD_VALUE = "cold-start"

_announcer: contextvars.ContextVar[Callable[[], Awaitable[None]] | None] = contextvars.ContextVar(
    "cold_start_announcer", default=None
)


class _Announcer:
    """Sends the held header on one streamed call's context, once."""

    __slots__ = ("_context", "_sent")

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context, self._sent = context, False

    async def __call__(self) -> None:
        if self._sent:
            return
        self._sent = True
        try:
            await self._context.send_initial_metadata(((HELD_HEADER, HELD_VALUE),))
        except Exception:  # headers already sent (a message went first): nothing left to announce
            log.debug("held call's headers were already sent", exc_info=True)


def announcing(context: grpc.aio.ServicerContext) -> contextvars.Token:
    return _announcer.set(_Announcer(context))


def stop_announcing(token: contextvars.Token) -> None:
    _announcer.reset(token)


async def announce_held() -> None:
    announce = _announcer.get()
    if announce is not None:
        await announce()


def is_held(metadata: Iterable[tuple[str, Any]] | None) -> bool:
    return any(key == HELD_HEADER for key, _ in metadata or ())
