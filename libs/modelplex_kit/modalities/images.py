"""Images: the sizes, formats and limits a model serves, and the one request check."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from modelplex.v1 import catalog_pb2, images_pb2, images_pb2_grpc
from modelplex_kit.errors import invalid
from modelplex_kit.modalities.base import CapabilitySpec, Modality

# What OpenAI's image models accept, and so what the local renderer offers.
OPENAI_SIZES = ("1024x1024", "256x256", "512x512", "1024x1536", "1536x1024")
FORMATS = ("png", "jpeg", "webp")
# gpt-image-1's prompt limit.
OPENAI_MAX_PROMPT_CHARS = 32000


# WIDTHxHEIGHT, each side 1 to 99999 pixels: "-1x-1", "0x5" or "99999999999x1" are not sizes.
_SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")


def parse_size(size: str) -> tuple[int, int]:
    """"1024x768" -> (1024, 768); ValueError otherwise."""
    match = _SIZE.fullmatch(size)
    if match is None:
        raise ValueError(f"size {size!r} must be WIDTHxHEIGHT, each between 1 and 99999 pixels")
    return int(match[1]), int(match[2])


class ImagesCapabilitySpec(CapabilitySpec):
    """``capabilities: {sizes: [1024x1024, 512x512], max_n: 4, max_prompt_chars: 4000, max_partial_images: 3}``."""

    sizes: list[str] = Field(default_factory=lambda: list(OPENAI_SIZES), min_length=1)
    max_n: int = Field(10, ge=1)
    max_prompt_chars: int = Field(OPENAI_MAX_PROMPT_CHARS, ge=1)
    max_partial_images: int = Field(0, ge=0, le=3)
    output_formats: list[str] = Field(default_factory=lambda: list(FORMATS), min_length=1)

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, sizes: list[str]) -> list[str]:
        for size in sizes:
            parse_size(size)
        return sizes

    @field_validator("output_formats")
    @classmethod
    def _formats(cls, formats: list[str]) -> list[str]:
        if unknown := set(formats) - set(FORMATS):
            raise ValueError(f"unknown output formats {sorted(unknown)}; known: {list(FORMATS)}")
        return formats

    def to_proto(self) -> catalog_pb2.Capabilities:
        return catalog_pb2.Capabilities(images=catalog_pb2.ImagesCapabilities(**self.model_dump()))


def valid_sizes(caps: catalog_pb2.ImagesCapabilities) -> list[str]:
    return [*caps.sizes, "auto"]


def check_images_request(request: images_pb2.GenerateImagesRequest, capabilities: catalog_pb2.Capabilities) -> None:
    caps = capabilities.images
    if not request.prompt:
        raise invalid("'prompt' must not be empty.", "prompt")
    if caps.max_prompt_chars and len(request.prompt) > caps.max_prompt_chars:
        raise invalid(
            f"'prompt' is {len(request.prompt)} characters long; this model accepts at most "
            f"{caps.max_prompt_chars}.",
            "prompt",
        )
    if request.n < 1 or (caps.max_n and request.n > caps.max_n):
        raise invalid(f"'n' must be between 1 and {caps.max_n} for this model.", "n")
    if f"{request.width}x{request.height}" not in caps.sizes:
        raise invalid(
            f"Invalid size '{request.width}x{request.height}'. Supported sizes for this model: "
            f"{', '.join(valid_sizes(caps))}.",
            "size",
        )
    if request.output_format not in caps.output_formats:
        raise invalid(
            f"Invalid output_format '{request.output_format}'. Supported: {', '.join(caps.output_formats)}.",
            "output_format",
        )
    if request.background == "transparent" and request.output_format == "jpeg":
        raise invalid("A transparent background needs output_format png or webp; jpeg has no alpha.", "background")
    if request.output_compression > 100:
        raise invalid("'output_compression' must be between 0 and 100.", "output_compression")
    if request.partial_images > caps.max_partial_images:
        raise invalid(
            f"'partial_images' must be at most {caps.max_partial_images} for this model.", "partial_images"
        )


MODALITY = Modality(
    name="images",
    proto=catalog_pb2.MODALITY_IMAGES,
    package="modelplex_images",
    env_prefix="MODELPLEX_IMAGES_",
    stub=images_pb2_grpc.ImagesServiceStub,
    capabilities=ImagesCapabilitySpec,
    check=check_images_request,
    port=50063,
)
