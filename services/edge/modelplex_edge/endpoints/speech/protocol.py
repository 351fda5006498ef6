"""Request model of POST /v1/audio/speech (OpenAI's CreateSpeechRequest)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from modelplex_edge.wire import Strict


class CustomVoice(BaseModel):
    id: str


class SpeechRequest(Strict):
    model: str
    # The length limit is the model's (catalog max_input_chars), checked with the capabilities.
    input: str
    voice: str | CustomVoice
    instructions: str | None = None
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: Annotated[float, Field(ge=0.25, le=4.0)] = 1.0
    stream_format: Literal["audio", "sse"] = "audio"

    def voice_name(self) -> str:
        return self.voice if isinstance(self.voice, str) else self.voice.id
