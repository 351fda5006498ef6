"""Chat templating for engines that take raw text (llama.cpp, Triton).

The model's own Jinja chat template (from the GGUF metadata) renders the
conversation. Tools and JSON output are described to the model in a system
message; the grammar (llama.cpp) or guided decoding (Triton/vLLM) then makes
the output follow the format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

from modelplex.v1 import text_pb2

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"

# ChatML: the fallback when a model ships no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_Mode = text_pb2.ToolChoice.Mode


def _raise(message: str) -> None:
    raise ValueError(message)


@lru_cache(maxsize=8)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(source)


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: list[dict[str, Any]]) -> str:
        return _compile(self.source).render(
            messages=messages, add_generation_prompt=True, bos_token=self.bos_token, eos_token=self.eos_token
        )


def tools_active(request: text_pb2.GenerateRequest) -> bool:
    return bool(request.tools) and request.tool_choice.mode != _Mode.MODE_NONE


def forced_tool_indexes(request: text_pb2.GenerateRequest) -> list[int]:
    """Indexes (in ``request.tools``) of the tools the model must choose from, or [] when calling is optional."""
    mode = request.tool_choice.mode
    if mode == _Mode.MODE_NAMED:
        return [i for i, t in enumerate(request.tools) if t.name == request.tool_choice.function_name]
    if mode == _Mode.MODE_REQUIRED:
        return list(range(len(request.tools)))
    return []


def forced_tools(request: text_pb2.GenerateRequest) -> list[text_pb2.Tool]:
    """The tools the model must choose from, or [] when calling is optional."""
    return [request.tools[i] for i in forced_tool_indexes(request)]


def tool_call_schema(tools: list[text_pb2.Tool]) -> dict[str, Any]:
    """JSON Schema of one call {"name": ..., "arguments": {...}} to any of ``tools``."""
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": _parameters(tool)},
            "required": ["name", "arguments"],
        }
        for tool in tools
    ]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def _parameters(tool: text_pb2.Tool) -> dict[str, Any]:
    params = json.loads(tool.parameters_json) if tool.parameters_json else {}
    return params or {"type": "object", "properties": {}}


def _tools_instructions(request: text_pb2.GenerateRequest) -> str:
    listing = "\n".join(
        json.dumps({"name": t.name, "description": t.description, "parameters": _parameters(t)}) for t in request.tools
    )
    if forced_tools(request):
        how = 'Call a tool now: reply with only a JSON object {"name": <tool name>, "arguments": <arguments object>}.'
    else:
        how = (
            f"If a tool helps, reply with only {TOOL_CALL_OPEN}"
            '{"name": <tool name>, "arguments": <arguments object>}'
            f"{TOOL_CALL_CLOSE}; otherwise answer normally."
        )
    return f"You can call these tools:\n<tools>\n{listing}\n</tools>\n{how}"


def _format_instructions(request: text_pb2.GenerateRequest) -> str:
    fmt = request.response_format
    if fmt.type == text_pb2.ResponseFormat.TYPE_JSON_SCHEMA:
        return f"Reply with only a JSON object that follows this JSON Schema:\n{fmt.schema_json}"
    if fmt.type == text_pb2.ResponseFormat.TYPE_JSON_OBJECT:
        return "Reply with only a valid JSON object."
    return ""


def _message_text(message: text_pb2.ChatMessage) -> str:
    text = "".join(part.text for part in message.content if part.WhichOneof("part") == "text")
    calls = "".join(
        f'{TOOL_CALL_OPEN}{{"name": {json.dumps(c.name)}, "arguments": {c.arguments or "{}"}}}{TOOL_CALL_CLOSE}'
        for c in message.tool_calls
    )
    return text + calls


def chat_messages(request: text_pb2.GenerateRequest) -> list[dict[str, Any]]:
    """The conversation as template input, with tool/format instructions folded into the system turn."""
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": _message_text(m)}
        for m in request.chat.messages
    ]
    extra = [
        part
        for part in (_tools_instructions(request) if tools_active(request) else "", _format_instructions(request))
        if part
    ]
    return with_instructions(messages, "\n\n".join(extra))


def constrained_output_instructions(request: text_pb2.GenerateRequest) -> str:
    """What a remote engine's model is told of an output its decoder will be made to follow: a forced
    tool call (the tools and the call's shape) or the response format. The local engine tells its model
    the same (``chat_messages``); a model not told writes, say, a never-ending string in a schema's field.
    An optional tool call is left to the remote engine's chat template and tool parser."""
    if forced_tools(request):
        return _tools_instructions(request)
    return "" if tools_active(request) else _format_instructions(request)


def with_instructions(messages: list[dict[str, Any]], instructions: str) -> list[dict[str, Any]]:
    """``messages`` with ``instructions`` appended to the leading system turn, or in a new one."""
    if not instructions:
        return messages
    first = messages[0] if messages else {}
    if first.get("role") != "system":
        return [{"role": "system", "content": instructions}, *messages]
    content = first.get("content")
    if isinstance(content, list):  # content parts (OpenAI JSON): one more text part
        merged: Any = [*content, {"type": "text", "text": f"\n\n{instructions}"}]
    else:
        merged = f"{content or ''}\n\n{instructions}"
    return [{**first, "content": merged}, *messages[1:]]


def prompt_text(request: text_pb2.GenerateRequest, template: ChatTemplate) -> str:
    if request.WhichOneof("input") == "completion":
        return request.completion.prompt
    return template.render(chat_messages(request))


@dataclass(frozen=True, slots=True)
class OutputConstraint:
    """What the decoder must produce; each adapter turns it into its engine's form."""

    # "json_schema": follow ``schema``; "json_object": any JSON object;
    # "tool_call": the {"name", "arguments"} object of ``schema``;
    # "tool_call_or_text": prose, or that object inside <tool_call> tags.
    kind: str
    schema: dict[str, Any] | None = None
    # For the tool kinds: the index in ``request.tools`` of each tool in ``schema`` (its anyOf
    # variants, in order), so a schema that cannot be enforced is blamed on the right tool.
    tool_indexes: tuple[int, ...] = ()

    @property
    def param(self) -> str:
        """The request field the schema came from, as OpenAI names it in errors."""
        return "tools" if self.tool_indexes else "response_format.json_schema.schema"


@dataclass(frozen=True, slots=True)
class PromptPlan:
    prompt: str
    constraint: OutputConstraint | None
    # None: no tool calling; True: a call is forced; False: the model may call.
    tool_call_forced: bool | None


def output_constraint(request: text_pb2.GenerateRequest) -> OutputConstraint | None:
    """What the output must follow, from the tools and the response format; None when it is free."""
    if request.WhichOneof("input") == "chat" and tools_active(request):
        indexes = forced_tool_indexes(request)
        kind = "tool_call" if indexes else "tool_call_or_text"
        indexes = indexes or list(range(len(request.tools)))
        return OutputConstraint(kind, tool_call_schema([request.tools[i] for i in indexes]), tuple(indexes))
    fmt = request.response_format
    if fmt.type == text_pb2.ResponseFormat.TYPE_JSON_SCHEMA:
        return OutputConstraint("json_schema", json.loads(fmt.schema_json or "{}"))
    if fmt.type == text_pb2.ResponseFormat.TYPE_JSON_OBJECT:
        return OutputConstraint("json_object")
    return None


def plan_prompt(request: text_pb2.GenerateRequest, template: ChatTemplate) -> PromptPlan:
    constraint = output_constraint(request)
    forced = None if constraint is None or not constraint.tool_indexes else constraint.kind == "tool_call"
    return PromptPlan(prompt_text(request, template), constraint, forced)
