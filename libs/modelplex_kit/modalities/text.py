"""Text (chat and legacy completions): capability flags and the one request check.

The edge runs the check with the catalog's advertised capabilities, the text
backend with its engine's real ones, so a request is refused with the same
clear 400 wherever the gap is found.
"""

from __future__ import annotations

from typing import Literal

from pydantic import RootModel

from modelplex.v1 import catalog_pb2, text_pb2, text_pb2_grpc
from modelplex_kit.errors import ServiceError, invalid, unsupported
from modelplex_kit.modalities.base import Modality

Flag = Literal[
    "chat", "completions", "tool_use", "vision", "json_schema", "prompt_caching", "logprobs", "multiple_choices"
]

#: OpenAI's bound on alternatives per token (chat; legacy completions allow 5).
MAX_TOP_LOGPROBS = 20

_SCHEMA = text_pb2.ResponseFormat.TYPE_JSON_SCHEMA
_JSON_OBJECT = text_pb2.ResponseFormat.TYPE_JSON_OBJECT


class TextCapabilitySpec(RootModel[list[Flag]]):
    """A list of flags: ``capabilities: [chat, completions, tool_use]``."""

    root: list[Flag] = []

    def to_proto(self) -> catalog_pb2.Capabilities:
        return catalog_pb2.Capabilities(text=catalog_pb2.TextCapabilities(**{flag: True for flag in self.root}))


#: How vLLM's message names chat's and completions' output bounds (the Responses API names its own).
CHAT_OUTPUT_BOUNDS = "'max_tokens' or 'max_completion_tokens'"


def max_tokens_too_large(
    asked: int, context_length: int, prompt_tokens: int, at_least: bool = False, param: str = "max_tokens"
) -> ServiceError:
    """vLLM's 400 for an output bound the context cannot hold (OpenAI answers it on `max_tokens` too).
    ``at_least``: the prompt was not counted exactly, only bounded below (the edge's check before
    admission; the backend's, with the prompt tokenized, is exact)."""
    has = f"at least {prompt_tokens}" if at_least else str(prompt_tokens)
    named = CHAT_OUTPUT_BOUNDS if param in ("max_tokens", "max_completion_tokens") else f"'{param}'"
    return invalid(
        f"{named} is too large: {asked}. This model's maximum context "
        f"length is {context_length} tokens and your request has {has} input tokens "
        f"({asked} > {context_length} - {prompt_tokens}).",
        param=param,
    )


def check_output_bound(asked: int | None, context_length: int, param: str = "max_tokens") -> None:
    """Before admission: every prompt holds at least one token, so an output bound of the whole context
    or more can never be served. A 400 now, instead of a reservation no token budget ever covers (a 429
    that clients retry forever). 0 = a context length the catalog does not know: nothing to check."""
    if asked is not None and context_length and asked > context_length - 1:
        raise max_tokens_too_large(asked, context_length, 1, at_least=True, param=param)


def check_and_fit_text_request(request: text_pb2.GenerateRequest, capabilities: catalog_pb2.Capabilities) -> None:
    """Raises a 400 ServiceError naming the parameter the model cannot serve, and fits the rest to it.

    Fitting changes ``request`` in place: a ``json_schema`` response format on a
    model without schema support becomes ``json_object`` (the documented fallback).
    """
    caps = capabilities.text
    kind = request.WhichOneof("input")
    if kind == "chat" and not caps.chat:
        raise invalid("This model does not support chat completions; use /v1/completions.", "model")
    if kind == "completion" and not caps.completions:
        raise invalid("This model does not support legacy completions; use /v1/chat/completions.", "model")
    if request.n > 1 and not caps.multiple_choices:
        raise unsupported("n", "Generating more than one choice (`n` > 1)")
    if request.logprobs and not caps.logprobs:
        raise unsupported("logprobs", "`logprobs`")
    if request.top_logprobs > MAX_TOP_LOGPROBS:  # bounds the work per token, whoever sent the request
        raise invalid(f"'top_logprobs' must be at most {MAX_TOP_LOGPROBS}.", "top_logprobs")
    if request.tools and not caps.tool_use:
        raise unsupported("tools", "Tool calling")
    if request.response_format.type == _SCHEMA and not caps.json_schema:
        request.response_format.type = _JSON_OBJECT
        request.response_format.schema_json = ""
    if kind == "chat" and not caps.vision:
        _refuse_images(request.chat.messages)


def bind_adapter(request: text_pb2.GenerateRequest, model: catalog_pb2.Model) -> None:
    """A request for a LoRA adapter's catalog entry carries the adapter, for the base's engine to load."""
    if model.HasField("adapter"):
        adapter = model.adapter
        request.adapter.CopyFrom(text_pb2.LoraAdapter(name=model.id, source=adapter.source, rank=adapter.rank))


def _refuse_images(messages) -> None:
    for i, message in enumerate(messages):
        for j, part in enumerate(message.content):
            if part.WhichOneof("part") == "image":
                raise invalid(
                    "Image content is not supported by this model; choose a model with vision.",
                    f"messages[{i}].content[{j}]",
                    code="image_not_supported",
                )


MODALITY = Modality(
    name="text",
    proto=catalog_pb2.MODALITY_TEXT,
    package="modelplex_text",
    env_prefix="MODELPLEX_TEXT_",
    stub=text_pb2_grpc.TextGenerationServiceStub,
    capabilities=TextCapabilitySpec,  # type: ignore[arg-type]  # a RootModel with to_proto
    check=check_and_fit_text_request,
    port=50061,
    bind=bind_adapter,
)
