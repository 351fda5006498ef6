"""Transcription and translation (speech to text): languages, limits, and the one request check.

The check runs at the edge with the catalog's capabilities and in the backend
with its engine's own. What only decoding can tell (the audio's length against
``max_audio_seconds``, a corrupt file) the backend checks while it decodes.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from modelplex.v1 import catalog_pb2, transcription_pb2, transcription_pb2_grpc
from modelplex_kit.errors import invalid, unsupported
from modelplex_kit.modalities.base import CapabilitySpec, Modality

# OpenAI's upload limit for /v1/audio/transcriptions and /translations (25 MB).
MAX_FILE_BYTES = 25 * 1024 * 1024
# The containers and codecs OpenAI accepts, by file extension.
FILE_TYPES = ("flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm")


class TranscriptionCapabilitySpec(CapabilitySpec):
    """``capabilities: {languages: [en], translation_model: smollm2, max_audio_seconds: 3600}``."""

    translate: bool = False
    translation_model: str = ""
    languages: list[str] = []
    word_timestamps: bool = False
    max_audio_seconds: int = Field(3600, ge=1)

    @model_validator(mode="after")
    def _one_way_to_translate(self) -> TranscriptionCapabilitySpec:
        if self.translate and self.translation_model:
            raise ValueError("a model that translates itself names no translation_model")
        return self

    def to_proto(self) -> catalog_pb2.Capabilities:
        return catalog_pb2.Capabilities(transcription=catalog_pb2.TranscriptionCapabilities(**self.model_dump()))


def check_transcribe_request(
    request: transcription_pb2.TranscribeRequest, capabilities: catalog_pb2.Capabilities
) -> None:
    caps = capabilities.transcription
    if not request.audio:
        raise invalid("'file' is empty; upload an audio file.", "file")
    if len(request.audio) > MAX_FILE_BYTES:
        raise invalid(f"'file' is larger than {MAX_FILE_BYTES // (1024 * 1024)} MB.", "file")
    language = request.language.lower()
    if language and caps.languages and language not in caps.languages:
        raise invalid(
            f"Language '{request.language}' is not supported by this model. Supported: {', '.join(caps.languages)}.",
            "language",
        )
    if request.word_timestamps and not caps.word_timestamps:
        raise unsupported("timestamp_granularities", "Word timestamps")
    if request.translate and not caps.translate:
        raise invalid("This model does not translate; use a model with a translation_model.", "model")
    if not 0.0 <= request.temperature <= 1.0:
        raise invalid("'temperature' must be between 0 and 1.", "temperature")


MODALITY = Modality(
    name="transcription",
    proto=catalog_pb2.MODALITY_TRANSCRIPTION,
    package="modelplex_transcription",
    env_prefix="MODELPLEX_TRANSCRIPTION_",
    stub=transcription_pb2_grpc.TranscriptionServiceStub,
    capabilities=TranscriptionCapabilitySpec,
    check=check_transcribe_request,
    port=50066,
)
