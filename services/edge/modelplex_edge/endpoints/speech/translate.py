"""Speech: SpeechRequest -> SynthesizeRequest; SynthesizeResponse stream -> audio bytes or OpenAI's SSE events."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

from modelplex.v1 import common_pb2, speech_pb2
from modelplex_edge.admission import Consumption
from modelplex_edge.endpoints.speech.protocol import SpeechRequest

MIME_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}


def to_proto(body: SpeechRequest, model_id: str, meta: common_pb2.RequestMeta) -> speech_pb2.SynthesizeRequest:
    return speech_pb2.SynthesizeRequest(
        meta=meta,
        model=model_id,
        input=body.input,
        voice=body.voice_name(),
        response_format=body.response_format,
        speed=body.speed,
        instructions=body.instructions or "",
    )


def meter(message: speech_pb2.SynthesizeResponse, used: Consumption) -> None:
    """Speech is metered in input characters (on the stream's last message; before it, the characters
    begun so far, accounted if the stream ends early)."""
    if message.characters:
        used.add_units(message.characters, "characters")
    elif message.characters_so_far:
        used.running_count(message.characters_so_far, "characters")
    if message.HasField("usage"):
        used.add_usage(message.usage)


async def audio_bytes(stream: AsyncIterator[speech_pb2.SynthesizeResponse]) -> AsyncIterator[bytes]:
    async for message in stream:
        if message.audio:
            yield message.audio


async def sse_events(stream: AsyncIterator[speech_pb2.SynthesizeResponse]) -> AsyncIterator[dict[str, Any]]:
    """OpenAI's speech.audio.delta events, then speech.audio.done (usage in tokens: 0 on engines without
    tokens; the characters spoken are added as ``input_characters``)."""
    last = speech_pb2.SynthesizeResponse()
    async for message in stream:
        if message.audio:
            yield {"type": "speech.audio.delta", "audio": base64.b64encode(message.audio).decode()}
        last = message
    usage = {
        "input_tokens": last.usage.prompt_tokens,
        "output_tokens": last.usage.completion_tokens,
        "total_tokens": last.usage.total_tokens,
        "input_characters": last.characters,
    }
    yield {"type": "speech.audio.done", "usage": usage}
