"""Responses: CreateResponseRequest (+ the stored chain before it) -> GenerateRequest, and the
backend's results -> OpenAI's Response object and its output items."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from modelplex.v1 import common_pb2, text_pb2
from modelplex_edge.endpoints.responses.protocol import (
    CreateResponseRequest,
    FunctionCallItem,
    FunctionCallOutputItem,
    InputImage,
    InputItem,
    InputText,
    MessageItem,
    NamedFunction,
)
from modelplex_edge.endpoints.text_shared import estimate_bytes, sampling, tool_choice
from modelplex_edge.wire import MAX_ITEMS
from modelplex_kit.modalities.text import check_output_bound

_FORMATS = {
    "text": text_pb2.ResponseFormat.TYPE_TEXT,
    "json_object": text_pb2.ResponseFormat.TYPE_JSON_OBJECT,
    "json_schema": text_pb2.ResponseFormat.TYPE_JSON_SCHEMA,
}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


# -- request -> proto ------------------------------------------------------------------------


def _add_content(parts: Any, content: str | list) -> None:
    if isinstance(content, str):
        parts.add(text=content)
        return
    for part in content:
        if isinstance(part, InputImage):
            parts.add(image=text_pb2.ImageInput(url=part.image_url or "", detail=part.detail))
        else:
            parts.add(text=part.text if isinstance(part, InputText) else part.refusal)


def _output_text(output: str | list[InputText]) -> str:
    return output if isinstance(output, str) else "".join(part.text for part in output)


def add_chat_messages(messages: Any, instructions: str | None, items: Iterable[InputItem]) -> None:
    """Items as chat messages, appended in place to a request's repeated ``messages`` (no text copied twice):
    function calls join the assistant turn they follow, outputs are tool turns."""
    if instructions:
        messages.add(role="system").content.add(text=instructions)
    for item in items:
        if isinstance(item, MessageItem):
            _add_content(messages.add(role=item.role).content, item.content)
        elif isinstance(item, FunctionCallItem):
            if not messages or messages[-1].role != "assistant":
                messages.add(role="assistant")
            messages[-1].tool_calls.add(id=item.call_id, name=item.name, arguments=item.arguments)
        elif isinstance(item, FunctionCallOutputItem):
            messages.add(role="tool", tool_call_id=item.call_id).content.add(text=_output_text(item.output))


def _tool_choice(body: CreateResponseRequest) -> text_pb2.ToolChoice:
    choice = body.tool_choice
    if isinstance(choice, NamedFunction):
        return tool_choice(None, choice.name)
    return tool_choice(choice)


def _response_format(body: CreateResponseRequest) -> text_pb2.ResponseFormat:
    fmt = body.text.format if body.text else None
    if fmt is None:
        return text_pb2.ResponseFormat()
    result = text_pb2.ResponseFormat(type=_FORMATS[fmt.type])
    if fmt.type == "json_schema":
        result.schema_name = fmt.name or ""
        result.schema_json = orjson.dumps(fmt.schema_).decode()
        result.strict = bool(fmt.strict)
    return result


def _is_user_turn(item: InputItem) -> bool:
    return isinstance(item, MessageItem) and item.role == "user"


@dataclass(slots=True)
class Prompt:
    """The items a request sends (the stored chain, then its input), fitted to a model's context."""

    body: CreateResponseRequest
    items: list[InputItem]

    def _fixed_bytes(self) -> int:
        """What every prompt carries whatever is dropped: the instructions and the tools."""
        return len((self.body.instructions or "").encode()) + sum(
            len(tool.model_dump_json().encode()) for tool in self.body.tools or ()
        )

    def fit(self, context_length: int) -> int:
        """With ``truncation: auto``, drops the oldest turns (up to the next user message, so no tool output
        loses its call) until the prompt and the output bound fit; returns what admission reserves: the
        prompt plus the output bound (the rest of the context without one).

        Linear in the items: each is serialized once and the dropped ones are subtracted, so a long input
        costs the event loop one pass (it was one pass per dropped turn: 10,000 items held the loop 45 s)."""
        asked = self.body.max_output_tokens
        check_output_bound(asked, context_length, "max_output_tokens")  # a 400 before admission, not a 429
        sizes = [len(item.model_dump_json().encode()) for item in self.items]
        total = self._fixed_bytes() + sum(sizes)
        room = context_length - (asked or 1)
        start = 0
        if self.body.truncation == "auto":
            while len(sizes) - start > 1 and estimate_bytes(total) > room:
                total -= sizes[start]
                start += 1
                while len(sizes) - start > 1 and not _is_user_turn(self.items[start]):
                    total -= sizes[start]
                    start += 1
            self.items = self.items[start:]
        prompt = estimate_bytes(total)
        return prompt + (asked or max(0, context_length - prompt))


def chain_room(body: CreateResponseRequest) -> tuple[int, bool]:
    """(items of a stored chain a request has room for, whether older turns may be dropped to fit)."""
    return MAX_ITEMS - len(body.items), body.truncation == "auto"


def to_proto(
    body: CreateResponseRequest, items: list[InputItem], model_id: str, meta: common_pb2.RequestMeta
) -> text_pb2.GenerateRequest:
    request = text_pb2.GenerateRequest(
        meta=meta,
        model=model_id,
        prompt_cache_key=body.prompt_cache_key or "",
        user=body.user or body.safety_identifier or "",
        sampling=sampling(
            temperature=body.temperature,
            top_p=body.top_p,
            max_tokens=body.max_output_tokens,
            stop=None,
            seed=None,
            presence_penalty=None,
            frequency_penalty=None,
        ),
        tools=[
            text_pb2.Tool(
                name=tool.name,
                description=tool.description or "",
                parameters_json=orjson.dumps(tool.parameters).decode() if tool.parameters else "",
                strict=tool.strict is not False,  # OpenAI's Responses default strict to true
            )
            for tool in body.tools or ()
        ],
        tool_choice=_tool_choice(body),
        response_format=_response_format(body),
        n=1,
        logprobs=body.wants_logprobs,
        top_logprobs=(body.top_logprobs or 0) if body.wants_logprobs else 0,
    )
    add_chat_messages(request.chat.messages, body.instructions, items)
    return request


# -- results -> the Response object -------------------------------------------------------------


def logprob(lp: text_pb2.TokenLogprob) -> dict[str, Any]:
    """OpenAI's LogProb (output_text.logprobs)."""
    return {
        "token": lp.token,
        "logprob": lp.logprob,
        "bytes": list(lp.token_bytes),
        "top_logprobs": [
            {"token": top.token, "logprob": top.logprob, "bytes": list(top.token_bytes)} for top in lp.top_logprobs
        ],
    }


def delta_logprob(lp: text_pb2.TokenLogprob) -> dict[str, Any]:
    """OpenAI's ResponseLogProb (the stream's text events)."""
    return {
        "token": lp.token,
        "logprob": lp.logprob,
        "top_logprobs": [{"token": t.token, "logprob": t.logprob} for t in lp.top_logprobs],
    }


def usage(used: common_pb2.Usage) -> dict[str, Any]:
    return {
        "input_tokens": used.prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": used.cached_prompt_tokens,
            "cache_write_tokens": used.cache_creation_prompt_tokens,
        },
        "output_tokens": used.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": used.total_tokens,
    }


@dataclass(slots=True)
class Output:
    """The output items of one response as they grow (a stream) or at once (unary). The item dicts are the
    ones rendered in events and in the final response, so an item's id is the same everywhere."""

    items: list[dict[str, Any]] = field(default_factory=list)
    message: dict[str, Any] | None = None

    def open_message(self) -> dict[str, Any]:
        self.message = {
            "id": new_id("msg"),
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        self.items.append(self.message)
        return self.message

    def open_call(self, call_id: str, name: str) -> dict[str, Any]:
        self.message = None  # text after a call is a new message
        call = {
            "id": new_id("fc"),
            "type": "function_call",
            "call_id": call_id,
            "name": name,
            "arguments": "",
            "status": "in_progress",
        }
        self.items.append(call)
        return call

    def finish(self, status: str) -> None:
        for item in self.items:
            item["status"] = status


def text_part(text: str = "", logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def output_of(choice: text_pb2.Choice, with_logprobs: bool) -> Output:
    output = Output()
    if choice.text or not choice.tool_calls:
        logprobs = [logprob(lp) for lp in choice.logprobs] if with_logprobs else []
        output.open_message()["content"].append(text_part(choice.text, logprobs))
    for call in choice.tool_calls:
        output.open_call(call.id, call.name)["arguments"] = call.arguments
    return output


@dataclass(slots=True)
class Outcome:
    """How a response ended."""

    status: str  # completed | incomplete | failed | in_progress | queued | cancelled
    incomplete_reason: str | None = None
    error: dict[str, str] | None = None

    @staticmethod
    def of(finish_reason: int) -> Outcome:
        if finish_reason == text_pb2.FINISH_REASON_LENGTH:
            return Outcome("incomplete", "max_output_tokens")
        if finish_reason == text_pb2.FINISH_REASON_CONTENT_FILTER:
            return Outcome("incomplete", "content_filter")
        return Outcome("completed")

    @property
    def item_status(self) -> str:
        return "incomplete" if self.status == "incomplete" else "completed"


def _tool_choice_echo(body: CreateResponseRequest) -> Any:
    if isinstance(body.tool_choice, NamedFunction):
        return {"type": "function", "name": body.tool_choice.name}
    return body.tool_choice or "auto"


def _text_echo(body: CreateResponseRequest) -> dict[str, Any]:
    fmt = body.text.format if body.text else None
    if fmt is None:
        return {"format": {"type": "text"}, "verbosity": "medium"}
    rendered: dict[str, Any] = {"type": fmt.type}
    if fmt.type == "json_schema":
        rendered |= {"name": fmt.name, "schema": fmt.schema_, "strict": bool(fmt.strict)}
        if fmt.description is not None:
            rendered["description"] = fmt.description
    return {"format": rendered, "verbosity": (body.text.verbosity if body.text else None) or "medium"}


def response_object(
    body: CreateResponseRequest,
    *,
    response_id: str,
    created_at: int,
    model_id: str,
    outcome: Outcome,
    output: list[dict[str, Any]],
    used: common_pb2.Usage | None,
) -> dict[str, Any]:
    """OpenAI's Response: the outcome, the output, and the request's settings echoed."""
    rendered = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": outcome.status,
        "completed_at": int(time.time()) if outcome.status == "completed" else None,
        "background": bool(body.background),
        "error": outcome.error,
        "incomplete_details": {"reason": outcome.incomplete_reason} if outcome.incomplete_reason else None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "max_tool_calls": body.max_tool_calls,
        "model": model_id,
        "output": output,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": body.store is not False,
        "temperature": body.temperature if body.temperature is not None else 1.0,
        "text": _text_echo(body),
        "tool_choice": _tool_choice_echo(body),
        "tools": [
            {
                "type": "function",
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.parameters,
                "strict": tool.strict is not False,
            }
            for tool in body.tools or ()
        ],
        "top_logprobs": body.top_logprobs or 0,
        "top_p": body.top_p if body.top_p is not None else 1.0,
        "truncation": body.truncation or "disabled",
        "safety_identifier": body.safety_identifier,
        "prompt_cache_key": body.prompt_cache_key,
        "metadata": body.metadata or {},
    }
    # Neither is nullable in OpenAI's schema: absent until known.
    if used is not None:
        rendered["usage"] = usage(used)
    if body.user is not None:
        rendered["user"] = body.user
    return rendered


def from_proto(
    body: CreateResponseRequest, response: text_pb2.GenerateResponse, response_id: str, model_id: str
) -> dict[str, Any]:
    choice = response.choices[0]
    outcome = Outcome.of(choice.finish_reason)
    output = output_of(choice, body.wants_logprobs)
    output.finish(outcome.item_status)
    return response_object(
        body,
        response_id=response_id,
        created_at=response.created or int(time.time()),
        model_id=model_id,
        outcome=outcome,
        output=output.items,
        used=response.usage,
    )


def input_items(body: CreateResponseRequest) -> list[dict[str, Any]]:
    """This request's input as stored items (OpenAI's input_items list), each with an id."""
    rendered = []
    for item in body.items:
        data = item.model_dump(exclude_none=True)
        if isinstance(item, MessageItem):
            data["content"] = _stored_content(item)
            data["status"] = "completed"
            prefix = "msg"
        elif isinstance(item, FunctionCallItem):
            data["status"] = "completed"
            prefix = "fc"
        else:
            data["output"] = _output_text(item.output)
            data["status"] = "completed"
            prefix = "fco"
        data["id"] = item.id or new_id(prefix)
        rendered.append(data)
    return rendered


def _stored_content(item: MessageItem) -> list[dict[str, Any]]:
    if isinstance(item.content, str):
        kind = "output_text" if item.role == "assistant" else "input_text"
        return [text_part(item.content) if kind == "output_text" else {"type": kind, "text": item.content}]
    parts = []
    for part in item.content:
        if isinstance(part, InputImage):
            parts.append({"type": "input_image", "image_url": part.image_url, "detail": part.detail})
        elif isinstance(part, InputText) and part.type == "output_text":
            parts.append(text_part(part.text))
        else:
            parts.append(part.model_dump())
    return parts
