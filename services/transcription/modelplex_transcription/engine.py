"""The engine protocol every transcription adapter implements.

Adapters turn one uploaded file into text; the servicer owns the request check,
the bounds on decoding (decode.py), admission of concurrent files, and the
assembly of text, segments and the stream of deltas.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from modelplex.v1 import catalog_pb2, transcription_pb2
from modelplex_transcription.decode import AudioSource


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event: what the engine learned of the whole file."""

    language: str
    duration_seconds: float


EngineEvent = transcription_pb2.TranscriptSegment | transcription_pb2.TranscriptWord | Finished


class TranscriptionEngine(Protocol):
    #: What this engine really supports; requests beyond it get a 400.
    capabilities: catalog_pb2.TranscriptionCapabilities

    def transcribe(
        self, request: transcription_pb2.TranscribeRequest, audio: AudioSource, *, incremental: bool = False
    ) -> AsyncIterator[EngineEvent]:
        """Transcribes (or, with ``request.translate``, translates into English) ``audio``.

        ``incremental``: the caller streams text to the client (TranscribeStream), which
        renders no segments; an engine may then yield text-only segments (start = end = 0)
        as soon as it has them, rather than timed ones at the end.

        Streaming contract:
        - ``TranscriptSegment`` events in time order, each as soon as it is recognised
          (an engine that only answers whole files yields them all at the end), with
          ``text`` as it joins the transcript (a leading space between segments);
        - ``TranscriptWord`` events (only when ``request.word_timestamps``), interleaved
          after the segment they belong to;
        - exactly one ``Finished``, last;
        - a file that cannot be decoded or is too long raises ``ServiceError`` 400 with
          ``param="file"``; an upstream that went away raises ``unavailable`` (503);
        - if the consumer stops early (``aclose()``, cancellation), work stops promptly.
        """
        ...

    async def close(self) -> None:
        """Releases the engine's connections, threads and memory."""
        ...
