"""OpenAI JSON <-> text protos for the openai adapter: pure translation, no I/O.

Requests become OpenAI chat/completions bodies; streamed or whole upstream
choices become ChoiceDelta events (upstream failures: ``upstream_errors``).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from modelplex.v1 import common_pb2, text_pb2
from modelplex_kit.errors import invalid
from modelplex_text.assembler import finish_reason

_TOOL_CHOICE = {
    text_pb2.ToolChoice.MODE_AUTO: "auto",
    text_pb2.ToolChoice.MODE_NONE: "none",
    text_pb2.ToolChoice.MODE_REQUIRED: "required",
}


# -- request: GenerateRequest -> OpenAI JSON --------------------------------
def upstream_request(request: text_pb2.GenerateRequest, model: str, stream: bool = True) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"model": model, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    body.update(_sampling(request))
    if request.n > 1:
        body["n"] = request.n
    if request.meta.end_user:
        body["user"] = request.meta.end_user
    if request.WhichOneof("input") == "completion":
        return "completions", body | _completion_fields(request)
    return "chat/completions", body | _chat_fields(request)


def _sampling(request: text_pb2.GenerateRequest) -> dict[str, Any]:
    """Only the fields the client set, so the upstream's defaults (e.g. generation_config) apply."""
    s = request.sampling
    out: dict[str, Any] = {f: getattr(s, f) for f in ("temperature", "top_p", "max_tokens", "seed") if s.HasField(f)}
    if s.stop:
        out["stop"] = list(s.stop)
    for penalty in ("presence_penalty", "frequency_penalty"):
        if getattr(s, penalty):
            out[penalty] = getattr(s, penalty)
    return out


def _completion_fields(request: text_pb2.GenerateRequest) -> dict[str, Any]:
    c = request.completion
    out: dict[str, Any] = {"prompt": c.prompt, "echo": c.echo}
    if c.suffix:
        out["suffix"] = c.suffix
    if request.logprobs:
        out["logprobs"] = request.top_logprobs  # legacy API: an int, alternatives per token
    return out


def _chat_fields(request: text_pb2.GenerateRequest) -> dict[str, Any]:
    out: dict[str, Any] = {"messages": [_message(m) for m in request.chat.messages]}
    if request.tools:
        out["tools"] = [_tool(i, t) for i, t in enumerate(request.tools)]
    mode = request.tool_choice.mode
    if mode == text_pb2.ToolChoice.MODE_NAMED:
        out["tool_choice"] = {"type": "function", "function": {"name": request.tool_choice.function_name}}
    elif mode in _TOOL_CHOICE:
        out["tool_choice"] = _TOOL_CHOICE[mode]
    fmt = request.response_format
    if fmt.type == text_pb2.ResponseFormat.TYPE_JSON_OBJECT:
        out["response_format"] = {"type": "json_object"}
    elif fmt.type == text_pb2.ResponseFormat.TYPE_JSON_SCHEMA:
        schema = _parse(fmt.schema_json, "response_format")
        spec = {"name": fmt.schema_name or "response", "schema": schema, "strict": fmt.strict}
        out["response_format"] = {"type": "json_schema", "json_schema": spec}
    if request.logprobs:
        out["logprobs"] = True
        out["top_logprobs"] = request.top_logprobs
    return out


def _message(m: text_pb2.ChatMessage) -> dict[str, Any]:
    parts = [_part(p) for p in m.content]
    # A lone text part goes as a plain string: text-only chat templates expect one.
    content: Any = parts[0]["text"] if len(parts) == 1 and "text" in parts[0] else parts or None
    out: dict[str, Any] = {"role": m.role, "content": content}
    if m.name:
        out["name"] = m.name
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    return out


def _part(p: text_pb2.ContentPart) -> dict[str, Any]:
    if p.WhichOneof("part") == "image":
        image = {"url": p.image.url} | ({"detail": p.image.detail} if p.image.detail else {})
        return {"type": "image_url", "image_url": image}
    return {"type": "text", "text": p.text}


def _tool(index: int, t: text_pb2.Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": t.name}
    if t.description:
        function["description"] = t.description
    if t.parameters_json:
        function["parameters"] = _parse(t.parameters_json, f"tools[{index}].function.parameters")
    if t.strict:
        function["strict"] = True
    return {"type": "function", "function": function}


def _parse(text: str, param: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise invalid(f"`{param}` is not valid JSON: {exc}", param) from exc


# -- response: upstream choices -> engine events --------------------------
def as_chunk_choice(choice: dict[str, Any]) -> dict[str, Any]:
    """A non-streamed choice (``message``) in the shape of a streamed one (``delta``)."""
    message = dict(choice.get("message") or {})
    message["tool_calls"] = [{**call, "index": i} for i, call in enumerate(message.get("tool_calls") or ())]
    return {**choice, "delta": message}


def choice_delta(choice: dict[str, Any]) -> text_pb2.ChoiceDelta:
    """One upstream choice of a chat chunk (``delta``) or a completion chunk (``text``)."""
    delta = choice.get("delta") or {}
    out = text_pb2.ChoiceDelta(index=choice.get("index") or 0, text=delta.get("content") or choice.get("text") or "")
    for call in delta.get("tool_calls") or ():
        function = call.get("function") or {}
        out.tool_calls.add(
            index=call.get("index") or 0,
            id=call.get("id") or "",
            name=function.get("name") or "",
            arguments=function.get("arguments") or "",
        )
    out.logprobs.extend(_logprobs(choice.get("logprobs") or {}))
    if choice.get("finish_reason"):
        out.finish_reason = finish_reason(choice["finish_reason"])
    return out


def _logprobs(lp: dict[str, Any]) -> list[text_pb2.TokenLogprob]:
    if "content" in lp:  # chat: a list of {token, logprob, bytes, top_logprobs}
        return [_token_logprob(t, t.get("top_logprobs") or ()) for t in lp["content"] or ()]
    # legacy completions: parallel lists, the alternatives as {token: logprob} maps
    tokens = lp.get("tokens") or []
    tops = lp.get("top_logprobs") or [None] * len(tokens)
    return [
        _token_logprob({"token": t, "logprob": v}, [{"token": k, "logprob": a} for k, a in (alts or {}).items()])
        for t, v, alts in zip(tokens, lp.get("token_logprobs") or (), tops, strict=False)
    ]


def _token_logprob(entry: dict[str, Any], alternatives: Any) -> text_pb2.TokenLogprob:
    return text_pb2.TokenLogprob(
        **_scored(entry), top_logprobs=[text_pb2.TopLogprob(**_scored(a)) for a in alternatives]
    )


def _scored(entry: dict[str, Any]) -> dict[str, Any]:
    raw = entry.get("bytes")  # servers that omit bytes (llama.cpp's) get the token's UTF-8
    return {
        "token": entry["token"],
        "logprob": entry.get("logprob") or 0.0,  # null for an echoed first prompt token
        "token_bytes": bytes(raw) if raw is not None else entry["token"].encode(),
    }


def to_usage(usage: dict[str, Any] | None, streamed_chunks: int) -> common_pb2.Usage:
    if not usage:
        # Servers without stream_options (llama.cpp's) send none. Token-streaming servers send
        # about one token per chunk, so the chunk count is a lower bound worth metering.
        return common_pb2.Usage(completion_tokens=streamed_chunks, total_tokens=streamed_chunks)
    details = usage.get("prompt_tokens_details") or {}
    return common_pb2.Usage(
        prompt_tokens=usage.get("prompt_tokens") or 0,
        completion_tokens=usage.get("completion_tokens") or 0,
        total_tokens=usage.get("total_tokens") or 0,
        cached_prompt_tokens=details.get("cached_tokens") or 0,
    )


def json_or_empty(raw: bytes) -> dict[str, Any]:
    value = _loads(raw)
    return value if isinstance(value, dict) else {}


def _loads(raw: bytes) -> Any:
    """orjson (a tenth of json's cost per streamed chunk), falling back to json where orjson is
    stricter (NaN and Infinity, which some servers put in logprobs; lone surrogates)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
