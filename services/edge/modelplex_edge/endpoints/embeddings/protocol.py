"""Request model of POST /v1/embeddings (OpenAI's CreateEmbeddingRequest)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from modelplex_edge.wire import UINT32_MAX, Strict, too_long

# OpenAI's limit on inputs per request; a model's own limit may be lower (checked against the catalog).
MAX_INPUTS = 2048

TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=UINT32_MAX)]], Field(min_length=1)]


def _count_rule(value: object) -> object:
    # Checked before the union is tried, so the message names the limit instead of "Input should be a
    # valid string" from the union's first member. A list of ints is one token array, not many inputs.
    if isinstance(value, list) and len(value) > MAX_INPUTS and not isinstance(value[0], int):
        raise too_long("input", MAX_INPUTS, len(value))
    return value


Input = Annotated[
    str
    | Annotated[list[str], Field(min_length=1, max_length=MAX_INPUTS)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_INPUTS)],
    BeforeValidator(_count_rule),
]


class EmbeddingRequest(Strict):
    model: str
    input: Input
    # The SDKs omit it (and the official Python SDK asks for base64 by default, decoding it itself).
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int | None, Field(ge=1, le=UINT32_MAX)] = None
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        """The inputs as a list, each a text or a list of token ids."""
        if isinstance(self.input, str):
            return [self.input]
        if self.input and isinstance(self.input[0], int):
            return [self.input]  # type: ignore[list-item]  # one token array
        return list(self.input)  # type: ignore[arg-type]
