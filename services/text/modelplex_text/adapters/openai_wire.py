"""OpenAI JSON <-> text protos for the openai adapter: pure translation, no I/O.

Requests become OpenAI chat/completions bodies carrying only what the client set
(or vLLM needs), so the upstream's own defaults (generation_config) apply; streamed
or whole upstream choices become ChoiceDelta events. The transport, SSE and the
mapping of failures are ``modelplex_kit.openai_upstream``'s.

A forced tool choice (``required`` or a named function) is not left to the
upstream's tool parser: vLLM's parsers are per model family and guarantee neither
a call nor arguments valid against the schema (with ``required`` a small model's
raw ``<tool_call>`` text came back as content; with a named function the arguments
came back double-encoded). So, as the local engine does, the call itself is asked
for as structured output (``response_format`` json_schema of {"name", "arguments"},
which vLLM enforces by guided decoding) and ``ChoiceTranslator`` turns that JSON
into ``tool_calls``.
"""

from __future__ import annotations

import json
from typing import Any

from modelplex.v1 import text_pb2
from modelplex_kit.errors import invalid
from modelplex_kit.pools.adapters import AdapterRef
from modelplex_kit.pools.picker import PickRequest
from modelplex_text.assembler import ChoiceAssembler, finish_reason
from modelplex_text.prompting import (
    constrained_output_instructions,
    forced_tools,
    tool_call_schema,
    with_instructions,
)

# vLLM's floor for a logprob of -inf: a token a constraint masked. Never an alternative, as on the local engine.
_IMPOSSIBLE = -9999.0
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
    if request.prompt_cache_key:
        body["prompt_cache_key"] = request.prompt_cache_key  # vLLM ignores it; OpenAI-compatible caches key on it
    if request.WhichOneof("input") == "completion":
        return "completions", body | _completion_fields(request)
    return "chat/completions", body | _chat_fields(request)


def pick_request(
    request: text_pb2.GenerateRequest, body: dict[str, Any] | None = None, adapter: AdapterRef | None = None
) -> PickRequest:
    """What an engine pool's picker weighs: the prompt as the engine will see its prefix, the session, and
    the LoRA adapter it runs under. ``body``: the upstream request (``upstream_request``), whose prompt the
    engine's ``/tokenize`` takes as it stands, for pools that look prompts up in their engines' KV-cache
    events (base-model requests only: the events' blocks of an adapter are keyed by more than tokens)."""
    prompt = canonical_prompt(request)
    if adapter is not None:
        # An engine caches a prompt per adapter: under another adapter the same prompt is another prefix.
        prompt = f"\x1a{adapter.name}\x1a{prompt}"
    return PickRequest(
        prompt=prompt,
        session=request.prompt_cache_key or request.user,
        tokenize=tokenize_body(body) if body is not None and adapter is None else None,
        adapter=adapter,
    )


def tokenize_body(body: dict[str, Any]) -> dict[str, Any] | None:
    """vLLM's ``/tokenize`` request for an upstream chat or completions body: the same prompt, rendered by
    the same chat template with the same tools, so its tokens are the ones the engine caches. None for a
    chat with images: the engine would fetch and encode them to tokenize, and blocks holding an image are
    keyed by more than their tokens (they never match a lookup by tokens)."""
    if "messages" in body:
        if any(isinstance(m.get("content"), list) and _has_media(m["content"]) for m in body["messages"]):
            return None
        out = {"model": body["model"], "messages": body["messages"], "add_generation_prompt": True}
        return out | ({"tools": body["tools"]} if body.get("tools") else {})
    return {"model": body["model"], "prompt": body["prompt"]}


def _has_media(parts: list[Any]) -> bool:
    return any(not (isinstance(p, dict) and p.get("type") == "text") for p in parts)


def canonical_prompt(request: text_pb2.GenerateRequest) -> str:
    """The prompt in a fixed rendering, so requests that an engine's chat template renders with the
    same prefix get the same prefix here: tool definitions first (templates put them in the system
    turn), then each message's role, name and parts in order."""
    if request.WhichOneof("input") == "completion":
        return request.completion.prompt
    rendered = [f"\x1etool\x1f{t.name}\x1f{t.description}\x1f{t.parameters_json}" for t in request.tools]
    for m in request.chat.messages:
        parts = [p.text if p.WhichOneof("part") == "text" else p.image.url for p in m.content]
        calls = [f"{c.id}\x1f{c.name}\x1f{c.arguments}" for c in m.tool_calls]
        rendered.append(f"\x1e{m.role}\x1f{m.name}\x1f{m.tool_call_id}\x1f" + "\x1d".join(parts + calls))
    return "".join(rendered)


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
    out: dict[str, Any] = {"prompt": c.prompt}
    if c.echo:
        out["echo"] = True
    if c.suffix:
        out["suffix"] = c.suffix
    if request.logprobs:
        out["logprobs"] = request.top_logprobs  # legacy API: an int, alternatives per token
    return out


def _chat_fields(request: text_pb2.GenerateRequest) -> dict[str, Any]:
    messages = [_message(m) for m in request.chat.messages]
    out: dict[str, Any] = {"messages": with_instructions(messages, constrained_output_instructions(request))}
    out |= _tool_fields(request) if request.tools else _format_fields(request.response_format)
    if request.logprobs:
        out["logprobs"] = True
        out["top_logprobs"] = request.top_logprobs
    return out


def _tool_fields(request: text_pb2.GenerateRequest) -> dict[str, Any]:
    out: dict[str, Any] = {"tools": [_tool(i, t) for i, t in enumerate(request.tools)]}
    forced = forced_tools(request)
    if forced:
        # The tools stay in the prompt (chat templates render them); the call is structured output.
        schema = {"name": "tool_call", "schema": tool_call_schema(forced), "strict": True}
        return out | {"tool_choice": "none", "response_format": {"type": "json_schema", "json_schema": schema}}
    mode = request.tool_choice.mode
    if mode in _TOOL_CHOICE:  # unset (MODE_UNSPECIFIED): the upstream's default for a request with tools
        out["tool_choice"] = _TOOL_CHOICE[mode]
    if mode == text_pb2.ToolChoice.MODE_NONE:
        out |= _format_fields(request.response_format)
    return out


def _format_fields(fmt: text_pb2.ResponseFormat) -> dict[str, Any]:
    if fmt.type == text_pb2.ResponseFormat.TYPE_JSON_OBJECT:
        return {"response_format": {"type": "json_object"}}
    if fmt.type == text_pb2.ResponseFormat.TYPE_JSON_SCHEMA:
        schema = _parse(fmt.schema_json, "response_format")
        spec = {"name": fmt.schema_name or "response", "schema": schema, "strict": fmt.strict}
        return {"response_format": {"type": "json_schema", "json_schema": spec}}
    return {}


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
class ChoiceTranslator:
    """Upstream choices (streamed chunks, or whole answers via ``as_chunk_choice``) -> ChoiceDeltas.

    With a forced tool choice the upstream's content is the call's JSON (see the module's
    docstring): it goes through the same assembler as the local engine's text, which streams
    the name and then the arguments as OpenAI does and ends the choice with ``tool_calls``.
    """

    def __init__(self, request: text_pb2.GenerateRequest) -> None:
        self._forced = bool(request.tools) and bool(forced_tools(request))
        self._assemblers: dict[int, ChoiceAssembler] = {}

    def __call__(self, choice: dict[str, Any]) -> list[text_pb2.ChoiceDelta]:
        delta = choice_delta(choice)
        if not self._forced:
            return [delta] if delta.text or delta.tool_calls or delta.logprobs or delta.finish_reason else []
        assembler = self._assemblers.setdefault(delta.index, ChoiceAssembler(delta.index, tool_call_forced=True))
        out = [d for d in (assembler.feed(delta.text),) if d is not None]
        if choice.get("finish_reason"):
            out += assembler.finish(choice["finish_reason"])
        return out


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
    possible = [a for a in alternatives if (a.get("logprob") or 0.0) > _IMPOSSIBLE]
    return text_pb2.TokenLogprob(**_scored(entry), top_logprobs=[text_pb2.TopLogprob(**_scored(a)) for a in possible])


def _scored(entry: dict[str, Any]) -> dict[str, Any]:
    raw = entry.get("bytes")  # servers that omit bytes (llama.cpp's) get the token's UTF-8
    return {
        "token": entry["token"],
        "logprob": entry.get("logprob") or 0.0,  # null for an echoed first prompt token
        "token_bytes": bytes(raw) if raw is not None else entry["token"].encode(),
    }
