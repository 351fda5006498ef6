"""The engine protocol every text adapter implements.

An engine is three members: ``capabilities`` (what it can really do),
``stream(request, incremental=...)`` (generate, as events, under the contract
below) and ``close()`` (release it at shutdown). Adapters translate a
:class:`GenerateRequest` into their runtime's calls and stream back what it
produces. The servicer owns ids, aggregation and the gRPC surface; adapters own
nothing but the engine. Adapters whose runtime emits text per choice (llamacpp,
triton) implement ``stream`` with ``choices.stream_choices`` and supply only
"generate one choice's text"; it keeps the contract for them.

Adapters are registered in ``adapters.ENGINES`` (name -> adapter class and its
settings model); ``MODELPLEX_TEXT_ENGINE`` picks one at startup.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from modelplex.v1 import catalog_pb2, common_pb2, text_pb2


@dataclass(frozen=True, slots=True)
class Progress:
    """Running totals of a request still generating: what it has consumed so far."""

    prompt_tokens: int
    #: Tokens generated so far, every choice together (at least the pieces emitted; exact at the end).
    completion_tokens: int


EngineEvent = text_pb2.ChoiceDelta | common_pb2.Usage | Progress


class TextEngine(Protocol):
    #: What this engine can really do; requests beyond it get a 400.
    capabilities: catalog_pb2.TextCapabilities

    def stream(self, request: text_pb2.GenerateRequest, *, incremental: bool = True) -> AsyncIterator[EngineEvent]:
        """Generates ``request`` and yields events as the engine produces them.

        ``incremental=False`` says the caller only wants the finished answer
        (unary Generate): an engine may then produce it in one piece, e.g. one
        non-streaming upstream call, as long as the events keep this contract.

        Streaming contract:
        - zero or more ``ChoiceDelta`` per choice index in ``[0, max(n, 1))``;
          each choice ends with exactly one delta whose ``finish_reason`` is set;
        - then exactly one ``Usage``, the last event;
        - optionally, at any point before it, ``Progress`` (running totals), so a request that
          ends early (the client left, the edge drained) is still accounted what it consumed;
        - a request the engine cannot serve raises ``ServiceError`` before the
          first event (400s) or at any point (503 when the engine went away);
        - if the consumer stops early (``aclose()``, or cancellation because
          the client disconnected), the engine aborts the work promptly.
        """
        ...

    async def close(self) -> None:
        """Releases the engine's connections, threads and memory."""
        ...


class RemoteEngine(Protocol):
    """What a remote engine (vLLM, Triton) adds: whether it can serve now.

    Optional: ``__main__`` passes ``engine.ready`` to ``grpc_server.serve`` when the
    adapter has one, so the backend is NOT_SERVING while its upstream loads or is
    down. In-process engines (llama.cpp) are ready once constructed.
    """

    async def ready(self) -> bool:
        """True when the upstream answers and has the model loaded; never raises."""
        ...
