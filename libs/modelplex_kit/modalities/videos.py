"""Videos: the sizes, durations and limits a model serves, and the one request check."""

from __future__ import annotations

from pydantic import Field, field_validator

from modelplex.v1 import catalog_pb2, videos_pb2, videos_pb2_grpc
from modelplex_kit.errors import invalid
from modelplex_kit.modalities.base import CapabilitySpec, Modality
from modelplex_kit.modalities.images import parse_size

# OpenAI's VideoSize and VideoSeconds values, the first being the default.
OPENAI_SIZES = ("720x1280", "1280x720", "1024x1792", "1792x1024")
OPENAI_SECONDS = (4, 8, 12)
OPENAI_MAX_PROMPT_CHARS = 32000


class VideosCapabilitySpec(CapabilitySpec):
    """``capabilities: {sizes: [720x1280, 1280x720], seconds: [4, 8, 12], max_prompt_chars: 32000}``."""

    sizes: list[str] = Field(default_factory=lambda: list(OPENAI_SIZES), min_length=1)
    seconds: list[int] = Field(default_factory=lambda: list(OPENAI_SECONDS), min_length=1)
    max_prompt_chars: int = Field(OPENAI_MAX_PROMPT_CHARS, ge=1)
    input_reference: bool = False

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, sizes: list[str]) -> list[str]:
        for size in sizes:
            parse_size(size)
        return sizes

    def to_proto(self) -> catalog_pb2.Capabilities:
        return catalog_pb2.Capabilities(videos=catalog_pb2.VideosCapabilities(**self.model_dump()))


def check_prompt(prompt: str, caps: catalog_pb2.VideosCapabilities) -> None:
    if not prompt:
        raise invalid("'prompt' must not be empty.", "prompt")
    if caps.max_prompt_chars and len(prompt) > caps.max_prompt_chars:
        raise invalid(
            f"'prompt' is {len(prompt)} characters long; this model accepts at most {caps.max_prompt_chars}.",
            "prompt",
        )


def check_seconds(seconds: int, caps: catalog_pb2.VideosCapabilities) -> None:
    if seconds not in caps.seconds:
        raise invalid(
            f"Invalid seconds '{seconds}'. Supported durations for this model: "
            f"{', '.join(str(s) for s in caps.seconds)}.",
            "seconds",
        )


def check_video_request(request: videos_pb2.CreateVideoRequest, capabilities: catalog_pb2.Capabilities) -> None:
    caps = capabilities.videos
    check_prompt(request.prompt, caps)
    if f"{request.width}x{request.height}" not in caps.sizes:
        raise invalid(
            f"Invalid size '{request.width}x{request.height}'. Supported sizes for this model: "
            f"{', '.join(caps.sizes)}.",
            "size",
        )
    check_seconds(request.seconds, caps)
    if request.input_reference and not caps.input_reference:
        raise invalid("This model does not accept 'input_reference'.", "input_reference", "unsupported_parameter")


MODALITY = Modality(
    name="videos",
    proto=catalog_pb2.MODALITY_VIDEOS,
    package="modelplex_videos",
    env_prefix="MODELPLEX_VIDEOS_",
    stub=videos_pb2_grpc.VideosServiceStub,
    capabilities=VideosCapabilitySpec,
    check=check_video_request,
    port=50064,
)
