"""Request model of POST /v1/completions (legacy; OpenAI's CreateCompletionRequest)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, Field, model_validator

from modelplex_edge.wire import (
    OutputTokens,
    Penalty,
    Seed,
    Stop,
    StreamOptions,
    Strict,
    Temperature,
    TopP,
    param_error,
    too_long,
)

#: Prompts in one request (each is its own generation): the bound embeddings' inputs have at OpenAI.
MAX_PROMPTS = 2048


def _prompt_count(value: object) -> object:
    # Before the union is tried, so the error names the bound (a list of ints is one tokenized prompt).
    if isinstance(value, list) and len(value) > MAX_PROMPTS and not isinstance(value[0], int):
        raise too_long("prompt", MAX_PROMPTS, len(value))
    return value


class CompletionRequest(Strict):
    model: str
    prompt: Annotated[
        str | Annotated[list[str], Field(min_length=1)] | list[int] | list[list[int]],
        BeforeValidator(_prompt_count),
    ]
    best_of: Annotated[int | None, Field(ge=0, le=20)] = None
    echo: bool | None = None
    frequency_penalty: Penalty = None
    logit_bias: dict[str, float] | None = None
    logprobs: Annotated[int | None, Field(ge=0, le=5)] = None
    # OpenAI's default for legacy completions (null means the default too). At least 1:
    # engines read 0 as "no limit", which would turn a scoring request into a runaway.
    max_tokens: OutputTokens = 16
    n: Annotated[int | None, Field(ge=1, le=128)] = None
    presence_penalty: Penalty = None
    seed: Seed = None
    stop: Stop = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: Temperature = None
    top_p: TopP = None
    user: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise param_error(
                "stream_options", "The 'stream_options' parameter is only allowed when 'stream' is enabled."
            )
        if self.best_of not in (None, 0, 1) and self.best_of != (self.n or 1):
            raise param_error("best_of", "only best_of equal to n is supported.")
        return self

    def prompts(self) -> list[str] | None:
        """The prompts as text, or None when given as token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and all(isinstance(p, str) for p in self.prompt):
            return list(self.prompt)  # type: ignore[arg-type]
        return None
