"""Speech (text to speech): a model's voices and limits, and the one request check.

The edge runs the check with the catalog's capabilities, the speech backend with
its engine's own, so a request is refused with the same clear 400 wherever the
gap is found. The check also resolves OpenAI's voice names (``alloy``...) onto
the model's own voices in place, as the catalog's ``voice_aliases`` say.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from modelplex.v1 import catalog_pb2, speech_pb2, speech_pb2_grpc
from modelplex_kit.errors import invalid, unsupported
from modelplex_kit.modalities.base import CapabilitySpec, Modality

FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
MIN_SPEED, MAX_SPEED = 0.25, 4.0
# OpenAI's own limit on `input`.
OPENAI_MAX_INPUT_CHARS = 4096


class SpeechCapabilitySpec(CapabilitySpec):
    """``capabilities: {voices: [en-us, en-gb], voice_aliases: {alloy: en-us}, max_input_chars: 4096}``."""

    voices: list[str] = Field(min_length=1)
    voice_aliases: dict[str, str] = {}
    max_input_chars: int = Field(OPENAI_MAX_INPUT_CHARS, ge=1)
    instructions: bool = False

    @model_validator(mode="after")
    def _aliases_name_voices(self) -> SpeechCapabilitySpec:
        if unknown := sorted(set(self.voice_aliases.values()) - set(self.voices)):
            raise ValueError(f"voice_aliases point at voices the model lacks: {unknown}")
        return self

    def to_proto(self) -> catalog_pb2.Capabilities:
        return catalog_pb2.Capabilities(speech=catalog_pb2.SpeechCapabilities(**self.model_dump()))


def check_speech_request(request: speech_pb2.SynthesizeRequest, capabilities: catalog_pb2.Capabilities) -> None:
    """Raises a 400 naming the parameter the model cannot serve; maps an alias voice onto the model's voice."""
    caps = capabilities.speech
    if not request.input.strip():
        raise invalid("'input' must not be empty.", "input")
    if caps.max_input_chars and len(request.input) > caps.max_input_chars:
        raise invalid(
            f"'input' is {len(request.input)} characters long; this model accepts at most {caps.max_input_chars}.",
            "input",
            code="string_above_max_length",
        )
    if request.instructions and not caps.instructions:
        raise unsupported("instructions", "`instructions`")
    if request.response_format and request.response_format not in FORMATS:
        raise invalid(f"'response_format' must be one of {', '.join(FORMATS)}.", "response_format")
    if request.speed and not MIN_SPEED <= request.speed <= MAX_SPEED:
        raise invalid(f"'speed' must be between {MIN_SPEED} and {MAX_SPEED}.", "speed")
    request.voice = resolve_voice(request.voice, caps)


def resolve_voice(voice: str, caps: catalog_pb2.SpeechCapabilities) -> str:
    if voice in caps.voices:
        return voice
    if voice in caps.voice_aliases:
        return caps.voice_aliases[voice]
    valid = [*caps.voices, *sorted(caps.voice_aliases)]
    raise invalid(f"Voice '{voice}' is not available for this model. Valid voices: {', '.join(valid)}.", "voice")


MODALITY = Modality(
    name="speech",
    proto=catalog_pb2.MODALITY_SPEECH,
    package="modelplex_speech",
    env_prefix="MODELPLEX_SPEECH_",
    stub=speech_pb2_grpc.SpeechServiceStub,
    capabilities=SpeechCapabilitySpec,
    check=check_speech_request,
    port=50065,  # 50060 + the Modality enum value, as every row
)
