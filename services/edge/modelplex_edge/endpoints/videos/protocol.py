"""Request models of /v1/videos (OpenAI's CreateVideoJsonBody / CreateVideoMultipartBody, CreateVideoRemixBody)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from modelplex_edge.wire import Strict

MAX_PROMPT = 32000


class ImageRef(Strict):
    image_url: str | None = None
    file_id: str | None = None


class VideoCreateRequest(Strict):
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT)]
    # OpenAI falls back to sora-2; Modelplex has no such model, so it asks for one.
    model: str
    # A string in OpenAI's API ("4"); numbers are accepted too.
    seconds: int | None = None
    size: str | None = None
    input_reference: ImageRef | None = None
    # Not in OpenAI's API: the same seed and prompt give the same video.
    seed: int | None = None
    user: str | None = None

    @field_validator("seconds", mode="before")
    @classmethod
    def _seconds(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        return value


class VideoRemixRequest(Strict):
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT)]


Variant = Literal["video", "thumbnail", "spritesheet"]
Order = Literal["asc", "desc"]
