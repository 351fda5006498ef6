"""Request model of POST /v1/responses (OpenAI's CreateResponse).

Input items are checked one by one (``parse_item``) rather than by a pydantic union, so a failure names the
item's field in OpenAI's notation (``input[2].type``, ``input[0].content[1].image_url``) and an item type
we do not serve is told apart from a malformed one.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator

from modelplex_edge.errors import openai_param
from modelplex_edge.wire import (
    FAIL_FAST,
    MAX_TOOLS,
    Lenient,
    Strict,
    Temperature,
    TopP,
    count_parts,
    param_error,
    too_long,
)

# OpenAI's hosted tools: served by OpenAI's own infrastructure, not by a self-hosted model.
HOSTED_TOOLS = frozenset(
    {
        "web_search",
        "web_search_preview",
        "web_search_preview_2025_03_11",
        "web_search_2025_08_26",
        "file_search",
        "code_interpreter",
        "computer_use_preview",
        "computer_use",
        "image_generation",
        "mcp",
        "local_shell",
        "shell",
        "apply_patch",
        "custom",
    }
)
LOGPROBS_INCLUDE = "message.output_text.logprobs"
# `include` values that are harmless here: we produce neither reasoning nor fetch images.
IGNORED_INCLUDES = frozenset({"reasoning.encrypted_content", "message.input_image.image_url"})


class InputText(Lenient):
    type: Literal["input_text", "output_text"]
    text: str


class InputImage(Lenient):
    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["auto", "low", "high"] = "auto"


class Refusal(Lenient):
    type: Literal["refusal"]
    refusal: str


Part = InputText | InputImage | Refusal
_PART_TYPES: dict[str, Any] = {
    "input_text": InputText,
    "output_text": InputText,
    "input_image": InputImage,
    "refusal": Refusal,
}


class MessageItem(Lenient):
    type: Literal["message"] = "message"
    id: str | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | Annotated[list[Part], FAIL_FAST]


class FunctionCallItem(Lenient):
    type: Literal["function_call"]
    id: str | None = None
    call_id: Annotated[str, Field(min_length=1)]
    name: Annotated[str, Field(min_length=1)]
    arguments: str


class FunctionCallOutputItem(Lenient):
    type: Literal["function_call_output"]
    id: str | None = None
    call_id: Annotated[str, Field(min_length=1)]
    output: str | Annotated[list[InputText], FAIL_FAST]


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem
def _type_of(raw: Any, default: str | None = None) -> str | None:
    """A part's, item's or tool's ``type`` when it is a string: anything else names no known type (a 400
    naming it, never a lookup of an unhashable value)."""
    kind = raw.get("type", default) if isinstance(raw, dict) else None
    return kind if isinstance(kind, str) else None


def _shown(raw: Any) -> str:
    return repr(raw.get("type") if isinstance(raw, dict) else None)[:100]


_ITEM_TYPES: dict[str, type[Lenient]] = {
    "message": MessageItem,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
}
_ADAPTERS = {kind: TypeAdapter(model) for kind, model in _ITEM_TYPES.items()}


def _parts(item: dict[str, Any], where: str) -> None:
    """Names the part whose type is not served (input_file, input_audio) before pydantic's union does."""
    content = item.get("content")
    if not isinstance(content, list):
        return
    for j, part in enumerate(content):
        kind = _type_of(part)
        if kind not in _PART_TYPES:
            raise param_error(
                f"{where}.content[{j}].type",
                f"Content parts of type {_shown(part)} are not supported; use 'input_text' or 'input_image'.",
            )
        if kind == "input_image" and not part.get("image_url"):
            raise param_error(
                f"{where}.content[{j}].image_url",
                "Images must be sent inline as 'image_url' (a URL or data URL); file ids are not supported.",
            )


def parse_item(raw: Any, i: int) -> InputItem:
    where = f"input[{i}]"
    if not isinstance(raw, dict):
        raise param_error(where, "Each input item must be an object.")
    kind = _type_of(raw, "message" if "role" in raw else None)
    if kind not in _ITEM_TYPES:
        raise param_error(
            f"{where}.type",
            f"Input items of type {_shown(raw)} are not supported; use 'message', 'function_call' or "
            "'function_call_output'.",
        )
    _parts(raw, where)
    try:
        return _ADAPTERS[kind].validate_python(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        inner = openai_param(tuple(first["loc"]))
        raise param_error(f"{where}.{inner}" if inner else where, first["msg"]) from None


class FunctionTool(Strict):
    type: Literal["function"]
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(Strict):
    type: Literal["function"]
    name: str


class TextFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[str | None, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")] = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and (self.schema_ is None or not self.name):
            raise param_error("text.format", "A 'json_schema' format needs a 'name' and a 'schema'.")
        return self


class TextParam(Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class StreamOptions(Strict):
    include_obfuscation: bool | None = None


class CreateResponseRequest(Strict):
    model: str
    input: str | list[Any]
    instructions: str | None = None
    tools: list[Any] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedFunction | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextParam | None = None
    max_output_tokens: Annotated[int | None, Field(ge=16)] = None
    temperature: Temperature = None
    top_p: TopP = None
    top_logprobs: Annotated[int | None, Field(ge=0, le=20)] = None
    include: list[str] | None = None
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]] | None, Field(max_length=16)] = None
    user: str | None = None
    safety_identifier: Annotated[str | None, Field(max_length=64)] = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    service_tier: str | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    background: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # Defined by OpenAI, not served: any value but null is a 400 naming the field (see _not_served).
    reasoning: dict[str, Any] | None = None
    conversation: Any = None
    prompt: Any = None
    max_tool_calls: int | None = None

    @field_validator("input")
    @classmethod
    def _items(cls, value: str | list[Any]) -> str | list[InputItem]:
        if isinstance(value, str):
            return value
        if not value:
            raise param_error("input", "'input' must not be empty.")
        count_parts("input", value)
        return [parse_item(raw, i) for i, raw in enumerate(value)]

    @field_validator("tools")
    @classmethod
    def _function_tools(cls, value: list[Any] | None) -> list[FunctionTool] | None:
        if value is None:
            return None
        if len(value) > MAX_TOOLS:
            raise too_long("tools", MAX_TOOLS, len(value))
        tools = []
        for i, raw in enumerate(value):
            kind = _type_of(raw)
            if kind != "function":
                what = "Hosted tools" if kind in HOSTED_TOOLS else "Tools"
                raise param_error(
                    f"tools[{i}].type",
                    f"{what} of type {_shown(raw)} are not supported by Modelplex; only 'function' tools are.",
                )
            try:
                tools.append(FunctionTool.model_validate(raw))
            except ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                raise param_error(f"tools[{i}].{openai_param(tuple(first['loc']))}", first["msg"]) from None
        return tools

    @field_validator("include")
    @classmethod
    def _includes(cls, value: list[str] | None) -> list[str] | None:
        for i, name in enumerate(value or ()):
            if name != LOGPROBS_INCLUDE and name not in IGNORED_INCLUDES:
                raise param_error(f"include[{i}]", f"include value {name!r} is not supported by Modelplex.")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CreateResponseRequest:
        self._not_served()
        if isinstance(self.tool_choice, dict):
            raise param_error("tool_choice", "tool_choice must be 'auto', 'none', 'required' or a function.")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise param_error("tool_choice", "'tool_choice' is only allowed when 'tools' are specified.")
        named = self.tool_choice.name if isinstance(self.tool_choice, NamedFunction) else None
        if named is not None and named not in {tool.name for tool in self.tools or ()}:
            raise param_error("tool_choice", f"the function '{self.tool_choice.name}' is not among the tools.")
        if self.stream_options is not None and not self.stream:
            raise param_error("stream_options", "'stream_options' is only allowed when 'stream' is enabled.")
        return self

    def _not_served(self) -> None:
        if self.reasoning and any(v is not None for v in self.reasoning.values()):
            raise param_error("reasoning", "'reasoning' is not supported by this model.")
        if self.conversation is not None:
            raise param_error(
                "conversation", "The Conversations API is not offered; use 'previous_response_id' instead."
            )
        if self.prompt is not None:
            raise param_error("prompt", "Stored prompt templates are not offered; send 'instructions' instead.")

    @property
    def wants_logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or ())

    @property
    def items(self) -> list[InputItem]:
        """The input as items (a string is one user message)."""
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return list(self.input)
