"""The wire protocol of /v1/files: the upload form (OpenAI's CreateFileRequest) and the list query."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from modelplex_edge.wire import Query, Strict

#: Purposes OpenAI defines; only ``batch`` is served (the others are a 400 naming ``purpose``).
OPENAI_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
SERVED_PURPOSES = ("batch",)
#: OpenAI's bounds on expires_after.seconds: one hour to 30 days.
MIN_EXPIRY_SECONDS, MAX_EXPIRY_SECONDS = 3600, 30 * 24 * 3600


class ExpiresAfter(Strict):
    anchor: Literal["created_at"]
    seconds: int = Field(ge=MIN_EXPIRY_SECONDS, le=MAX_EXPIRY_SECONDS)


class UploadForm(Strict):
    """The form's fields other than ``file`` (``expires_after[anchor]`` arrives as nested keys)."""

    purpose: str
    expires_after: ExpiresAfter | None = None


class ListFilesQuery(Query):
    purpose: str | None = None
    limit: int = Field(10_000, ge=1, le=10_000)
    order: Literal["asc", "desc"] = "desc"
    after: str | None = None
