"""Request model of POST /v1/images/generations (OpenAI's CreateImageRequest)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from modelplex_edge.wire import Seed, Strict


class ImageGenerationRequest(Strict):
    prompt: str
    # OpenAI falls back to dall-e-2; Modelplex has no such model, so it asks for one.
    model: str
    n: Annotated[int | None, Field(ge=1, le=10)] = None
    size: str | None = None
    quality: Literal["standard", "hd", "low", "medium", "high", "auto"] | None = None
    style: Literal["vivid", "natural"] | None = None
    background: Literal["transparent", "opaque", "auto"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: Annotated[int | None, Field(ge=0, le=100)] = None
    moderation: Literal["low", "auto"] | None = None
    response_format: Literal["url", "b64_json"] | None = None
    stream: bool | None = None
    partial_images: Annotated[int | None, Field(ge=0, le=3)] = None
    user: str | None = None
    # Not in OpenAI's API: the same seed and prompt give the same image bytes.
    seed: Seed = None
