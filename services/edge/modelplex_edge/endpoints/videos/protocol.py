"""Request models of /v1/videos (OpenAI's CreateVideoJsonBody / CreateVideoMultipartBody, CreateVideoRemixBody)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from modelplex_edge.wire import Query, Seed, Strict

MAX_PROMPT = 32000


class ImageRef(Strict):
    image_url: str | None = None
    file_id: str | None = None


class VideoCreateRequest(Strict):
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT)]
    # OpenAI falls back to sora-2; Modelplex has no such model, so it asks for one.
    model: str
    # A string in OpenAI's API ("4"); numbers are accepted too. Which durations a model serves is
    # checked against its catalog entry before admission (translate.seconds).
    seconds: int | None = None
    size: str | None = None
    input_reference: ImageRef | None = None
    # Not in OpenAI's API: the same seed and prompt give the same video.
    seed: Seed = None
    user: str | None = None

    @field_validator("seconds", mode="before")
    @classmethod
    def _seconds(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise ValueError("must be a whole number of seconds, such as \"4\"") from None
        return value


class VideoRemixRequest(Strict):
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT)]


Variant = Literal["video", "thumbnail", "spritesheet"]
Order = Literal["asc", "desc"]


class ListQuery(Query):
    """GET /v1/videos?after=&limit=&order="""

    after: str = ""
    limit: Annotated[int, Field(ge=1, le=100)] = 20
    order: Order = "desc"


class ContentQuery(Query):
    """GET /v1/videos/{id}/content?variant="""

    variant: Variant = "video"
