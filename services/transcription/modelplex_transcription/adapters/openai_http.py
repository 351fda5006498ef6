"""engine=openai: Whisper on vLLM (or any OpenAI-compatible server), ``/v1/audio/transcriptions`` and
``/v1/audio/translations``, multipart over aiohttp.

Two ways to call it:
- timed (``Transcribe``, or any request for word timestamps): ``response_format=verbose_json`` with
  ``timestamp_granularities[]``; vLLM's segments (seek, tokens, avg_logprob...) and words map 1:1 onto
  ours, so srt/vtt/verbose_json keep Whisper's own timing;
- incremental (``TranscribeStream``, when ``upstream_stream``): ``stream=true``; vLLM's
  ``transcription.chunk`` deltas are yielded as text-only segments as they arrive.
The file is decoded here first (adapters/upstream.py says why); the original bytes are uploaded,
to a replica of the engine pool (``modelplex_kit.pools``: the least loaded; another one if it
fails before answering).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import aiohttp
import orjson

from modelplex.v1 import transcription_pb2 as pb
from modelplex_kit.errors import unavailable, upstream_http_error
from modelplex_kit.openai_upstream import OpenAIUpstream
from modelplex_kit.pools.http import OpenAIPool
from modelplex_transcription.adapters.upstream import Decoding, upstream_capabilities
from modelplex_transcription.decode import AudioSource
from modelplex_transcription.engine import EngineEvent, Finished
from modelplex_transcription.settings import UpstreamSettings

log = logging.getLogger(__name__)

# Transport failures and bodies that are not JSON: the upstream is not answering as vLLM does.
_UNREACHABLE = (aiohttp.ClientError, TimeoutError, ValueError)


class OpenAIHttpEngine:
    def __init__(self, settings: UpstreamSettings) -> None:
        if not settings.upstream_url:
            raise ValueError("engine=openai needs MODELPLEX_TRANSCRIPTION_UPSTREAM_URL (e.g. http://vllm:8000/v1)")
        self._model = settings.upstream_model
        self._upstream = OpenAIPool(
            "transcription",
            settings,
            settings.upstream_api_key.get_secret_value(),
            timeout_seconds=settings.upstream_timeout_seconds,
            what="transcription model server",
        )
        self._stream = settings.upstream_stream
        self._decoding = Decoding(settings, "openai-decode")
        self.capabilities = upstream_capabilities(settings)

    async def transcribe(
        self, request: pb.TranscribeRequest, audio: AudioSource, *, incremental: bool = False
    ) -> AsyncIterator[EngineEvent]:
        seconds = await self._decoding.measure(audio)
        streamed = incremental and self._stream and not request.word_timestamps
        language = request.language

        def call(upstream: OpenAIUpstream) -> AsyncIterator[EngineEvent]:
            return self._call(upstream, request, streamed, seconds)

        async with aclosing(self._upstream.stream(call)) as events:
            async for event in events:
                if isinstance(event, Finished):
                    language = event.language or language
                else:
                    yield event
        yield Finished(language=language, duration_seconds=seconds)

    async def _call(
        self, upstream: OpenAIUpstream, request: pb.TranscribeRequest, streamed: bool, seconds: float
    ) -> AsyncIterator[EngineEvent]:
        """One upload to one replica: its segments, then a Finished carrying the language it detected."""
        path = "audio/translations" if request.translate else "audio/transcriptions"
        try:
            async with upstream.post(path, lambda: self._form(request, streamed)) as response:
                if response.status != 200:
                    raise upstream_http_error(response.status, await _json_or_empty(response), "file")
                if streamed:
                    async for segment in _stream_segments(response):
                        yield segment
                    yield Finished(language=request.language, duration_seconds=seconds)
                else:
                    body = await response.json(content_type=None)
                    for event in verbose_events(body, request.word_timestamps, seconds):
                        yield event
                    yield Finished(language=body.get("language") or request.language, duration_seconds=seconds)
        except _UNREACHABLE as exc:
            log.warning("transcription upstream unreachable: %s", type(exc).__name__)
            raise unavailable("The transcription model server is unreachable; retry shortly.") from exc

    def _form(self, request: pb.TranscribeRequest, streamed: bool) -> aiohttp.FormData:
        form = aiohttp.FormData()
        form.add_field(
            "file",
            request.audio,
            filename=request.filename or "audio",
            content_type=request.mime_type or "application/octet-stream",
        )
        fields: dict[str, str] = {"model": self._model, "temperature": f"{request.temperature:g}"}
        if request.language:
            fields["language"] = request.language
        if request.prompt:
            fields["prompt"] = request.prompt
        if streamed:
            fields |= {"response_format": "json", "stream": "true", "stream_include_usage": "true"}
        else:
            fields["response_format"] = "verbose_json"
        for name, value in fields.items():
            form.add_field(name, value)
        if not streamed and not request.translate:  # /translations takes no granularities
            for granularity in ("segment", "word") if request.word_timestamps else ("segment",):
                form.add_field("timestamp_granularities[]", granularity)
        return form

    async def ready(self) -> bool:
        return await self._upstream.ready()

    async def close(self) -> None:
        await self._upstream.close()
        self._decoding.close()


def verbose_events(body: dict[str, Any], words: bool, seconds: float) -> list[EngineEvent]:
    """vLLM's verbose_json -> our segments, each followed by the words that start inside it."""
    segments = [_segment(s) for s in body.get("segments") or []]
    if not segments and body.get("text"):  # a server that answers verbose_json without segments
        segments = [pb.TranscriptSegment(id=0, start=0.0, end=seconds, text=body["text"])]
    pending = [_word(w) for w in body.get("words") or []] if words else []
    events: list[EngineEvent] = []
    for segment in segments:
        events.append(segment)
        while pending and pending[0].start < segment.end:
            events.append(pending.pop(0))
    return events + pending


def _segment(s: dict[str, Any]) -> pb.TranscriptSegment:
    # Whisper's optional figures come back null from some servers; the proto's 0 means "none".
    return pb.TranscriptSegment(
        id=int(s.get("id") or 0),
        seek=int(s.get("seek") or 0),
        start=float(s.get("start") or 0.0),
        end=float(s.get("end") or 0.0),
        text=s.get("text") or "",
        tokens=[int(t) for t in s.get("tokens") or []],
        temperature=float(s.get("temperature") or 0.0),
        avg_logprob=float(s.get("avg_logprob") or 0.0),
        compression_ratio=float(s.get("compression_ratio") or 0.0),
        no_speech_prob=float(s.get("no_speech_prob") or 0.0),
    )


def _word(w: dict[str, Any]) -> pb.TranscriptWord:
    start, end = float(w.get("start") or 0.0), float(w.get("end") or 0.0)
    return pb.TranscriptWord(word=w.get("word") or "", start=start, end=end)


async def _stream_segments(response: aiohttp.ClientResponse) -> AsyncIterator[pb.TranscriptSegment]:
    """vLLM's SSE: ``data: {"object": "transcription.chunk", "choices": [{"delta": {"content": ...}}]}``
    lines, a usage-only chunk (``choices: []``), then ``data: [DONE]``; an error mid-stream is a
    ``data: {"error": ...}`` line."""
    index = 0
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        chunk = orjson.loads(data)
        if "error" in chunk:
            raise upstream_http_error(500, chunk, "file")
        for choice in chunk.get("choices") or []:
            if text := (choice.get("delta") or {}).get("content"):
                yield pb.TranscriptSegment(id=index, text=text)
                index += 1


async def _json_or_empty(response: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        body = await response.json(content_type=None)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}

