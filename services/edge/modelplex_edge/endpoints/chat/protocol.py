"""Request model of POST /v1/chat/completions (OpenAI's CreateChatCompletionRequest)."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Discriminator, Field, Tag, model_validator

from modelplex_edge.wire import (
    FAIL_FAST,
    MAX_TOOL_CALLS,
    MAX_TOOLS,
    Lenient,
    OutputTokens,
    Penalty,
    Seed,
    Stop,
    StreamOptions,
    Strict,
    Temperature,
    TopP,
    count_parts,
    param_error,
)


class TextPart(Lenient):
    type: Literal["text"]
    text: str


class ImageURL(Lenient):
    url: str
    detail: Literal["auto", "low", "high"] = "auto"


class ImagePart(Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


class RefusalPart(Lenient):
    type: Literal["refusal"]
    refusal: str


def _part_tag(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if not isinstance(kind, str):  # a list or an object as the type: no part's tag (a 400, not a TypeError)
        return None
    return {"text": "TextPart", "image_url": "ImagePart", "refusal": "RefusalPart"}.get(kind)


ContentPart = Annotated[
    Annotated[TextPart, Tag("TextPart")]
    | Annotated[ImagePart, Tag("ImagePart")]
    | Annotated[RefusalPart, Tag("RefusalPart")],
    Discriminator(
        _part_tag,
        custom_error_type="invalid_content_part",
        custom_error_message="Content parts must have type 'text' or 'image_url'",
    ),
]


class FunctionCall(Lenient):
    name: str
    arguments: str


class MessageToolCall(Lenient):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[ContentPart], FAIL_FAST] | None = None
    name: str | None = None
    tool_calls: Annotated[list[MessageToolCall] | None, Field(max_length=MAX_TOOL_CALLS)] = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("messages with role 'tool' must have a tool_call_id")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"messages with role '{self.role}' must have content")
        return self


class FunctionDef(Strict):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaSpec(Strict):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' requires a 'json_schema' object")
        return self


class ChatCompletionRequest(Strict):
    model: str
    messages: Annotated[
        list[ChatMessage], Field(min_length=1), FAIL_FAST, BeforeValidator(partial(count_parts, "messages"))
    ]
    frequency_penalty: Penalty = None
    presence_penalty: Penalty = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int | None, Field(ge=0, le=20)] = None
    max_tokens: OutputTokens = None
    max_completion_tokens: OutputTokens = None
    n: Annotated[int | None, Field(ge=1, le=128)] = None
    response_format: ResponseFormat | None = None
    seed: Seed = None
    stop: Stop = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Temperature = None
    top_p: TopP = None
    tools: Annotated[list[ToolDef] | None, Field(max_length=MAX_TOOLS)] = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    # Accepted for SDK compatibility; they do not change generation.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise param_error(
                "stream_options", "The 'stream_options' parameter is only allowed when 'stream' is enabled."
            )
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise param_error("tool_choice", "'tool_choice' is only allowed when 'tools' are specified.")
        if isinstance(self.tool_choice, NamedToolChoice):
            wanted = self.tool_choice.function.name
            if wanted not in {tool.function.name for tool in self.tools or ()}:
                raise param_error("tool_choice", f"the function '{wanted}' is not among the provided tools.")
        if self.top_logprobs is not None and not self.logprobs:
            raise param_error("top_logprobs", "'logprobs' must be set to true if 'top_logprobs' is used.")
        return self
