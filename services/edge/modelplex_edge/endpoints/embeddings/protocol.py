"""Request model of POST /v1/embeddings (OpenAI's CreateEmbeddingRequest)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from modelplex_edge.wire import Strict

# OpenAI's limit on inputs per request; a model's own limit may be lower (checked against the catalog).
MAX_INPUTS = 2048

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Input = (
    str
    | Annotated[list[str], Field(min_length=1, max_length=MAX_INPUTS)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_INPUTS)]
)


class EmbeddingRequest(Strict):
    model: str
    input: Input
    # The SDKs omit it (and the official Python SDK asks for base64 by default, decoding it itself).
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int | None, Field(ge=1)] = None
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        """The inputs as a list, each a text or a list of token ids."""
        if isinstance(self.input, str):
            return [self.input]
        if self.input and isinstance(self.input[0], int):
            return [self.input]  # type: ignore[list-item]  # one token array
        return list(self.input)  # type: ignore[arg-type]
