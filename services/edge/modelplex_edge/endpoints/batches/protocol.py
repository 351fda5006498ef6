"""The wire protocol of /v1/batches (OpenAI's CreateBatchRequest, the list query) and of a batch's lines."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from modelplex_edge.endpoints.files.protocol import ExpiresAfter
from modelplex_edge.wire import Lenient, Query, Strict

#: The endpoints a batch's lines may call.
BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")


class CreateBatchRequest(Strict):
    input_file_id: str
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]
    completion_window: Literal["24h"]
    # OpenAI's Metadata: at most 16 pairs, keys up to 64 characters, values up to 512.
    metadata: dict[str, str] | None = Field(None, max_length=16)
    # When the output and error files expire, from their creation (OpenAI's BatchFileExpirationAfter).
    output_expires_after: ExpiresAfter | None = None


class ListBatchesQuery(Query):
    limit: int = Field(20, ge=1, le=100)
    after: str | None = None


class InputLine(Lenient):
    """One line of a batch's input file (OpenAI's BatchRequestInput)."""

    custom_id: str = Field(min_length=1, max_length=512)
    method: str
    url: str
    body: dict[str, Any]
