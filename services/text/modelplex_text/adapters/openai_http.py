"""The remote engine: an OpenAI-compatible HTTP server (a vLLM pod).

The upstream already speaks our API's dialect, so the adapter only re-encodes
the request as OpenAI JSON (streamed for GenerateStream, one non-streaming call
for Generate) and maps upstream failures to gRPC statuses. The HTTP client is
aiohttp: on this hop it costs about half of what httpx did per request.
Closing the HTTP response is how an abandoned request gets aborted upstream:
vLLM stops generating when its client disconnects.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

import aiohttp
import grpc
import orjson

from modelplex.v1 import catalog_pb2, common_pb2, text_pb2
from modelplex_kit.errors import ServiceError, invalid, unavailable
from modelplex_text.assembler import finish_reason
from modelplex_text.engine import EngineEvent
from modelplex_text.settings import TextSettings

log = logging.getLogger(__name__)

_TOOL_CHOICE = {
    text_pb2.ToolChoice.MODE_AUTO: "auto",
    text_pb2.ToolChoice.MODE_NONE: "none",
    text_pb2.ToolChoice.MODE_REQUIRED: "required",
}
# Upstream client errors that are the API client's fault (the rest are ours).
_INVALID_STATUSES = {400, 413, 422}
_MAX_MESSAGE = 2000  # upstream messages are echoed to clients; bound them
# Below uvicorn's (so vLLM's) 5 s keep-alive: we drop an idle connection before the server
# does, which makes reusing one it has just closed (see _send's retry) rarer.
_KEEPALIVE_S = 4.0
# How a reused keep-alive connection the server had just closed fails before any response.
_STALE_CONNECTION = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientConnectionResetError)


class OpenAIHttpEngine:
    # Everything the protocol can express; the catalog entry narrows it per model.
    capabilities = catalog_pb2.Capabilities(
        chat=True,
        completions=True,
        tool_use=True,
        vision=True,
        json_schema=True,
        prompt_caching=True,
        logprobs=True,
        multiple_choices=True,
    )

    def __init__(self, settings: TextSettings) -> None:
        if not settings.upstream_url:
            raise ValueError("engine=openai needs MODELPLEX_TEXT_UPSTREAM_URL (e.g. http://vllm:8000/v1)")
        key = settings.upstream_api_key.get_secret_value()
        self._model = settings.upstream_model
        self._base_url = settings.upstream_url.rstrip("/")
        self._headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
        self._connections = settings.upstream_max_connections
        timeout = settings.upstream_timeout_seconds
        # Bounds on waiting (for a connection, then for each read), not on the whole request:
        # a long generation that keeps streaming must not be cut off at a fixed total.
        self._timeout = aiohttp.ClientTimeout(total=None, connect=timeout, sock_read=timeout)
        self._client: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        # Made on first use, not in __init__: a session binds to the event loop running it.
        if self._client is None:
            connector = aiohttp.TCPConnector(limit=self._connections, keepalive_timeout=_KEEPALIVE_S)
            self._client = aiohttp.ClientSession(headers=self._headers, connector=connector, timeout=self._timeout)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def stream(
        self, request: text_pb2.GenerateRequest, *, incremental: bool = True
    ) -> AsyncIterator[EngineEvent]:
        if not incremental:
            async for event in self._complete(request):
                yield event
            return
        path, body = upstream_request(request, self._model or request.model)
        usage, streamed = None, 0
        async with self._post(path, body) as response:
            if response.status >= 400:
                raise upstream_error(response.status, _json_or_empty(await response.read()))
            async with aclosing(_sse_events(response)) as events:
                async for event in events:
                    usage = event.get("usage") or usage
                    for choice in event.get("choices") or ():
                        delta = choice_delta(choice)
                        streamed += bool(delta.text or delta.tool_calls)
                        if delta.text or delta.tool_calls or delta.logprobs or delta.finish_reason:
                            yield delta
        yield to_usage(usage, streamed)

    async def _complete(self, request: text_pb2.GenerateRequest) -> AsyncIterator[EngineEvent]:
        """One non-streaming upstream call: a whole answer costs one JSON parse, not one per token."""
        path, body = upstream_request(request, self._model or request.model, stream=False)
        async with self._post(path, body) as response:
            answer = _json_or_empty(await response.read())
        if response.status >= 400:
            raise upstream_error(response.status, answer)
        if not isinstance(answer.get("choices"), list):
            raise unavailable("The model server sent a malformed answer; retry shortly.")
        for choice in answer["choices"]:
            yield choice_delta(_as_chunk_choice(choice))
        yield to_usage(answer.get("usage"), 0)

    @asynccontextmanager
    async def _post(self, path: str, body: dict[str, Any]) -> AsyncIterator[aiohttp.ClientResponse]:
        """A POST whose body the caller reads; transport failures become UNAVAILABLE."""
        # Compact, non-ASCII kept and NaN refused: the bytes httpx used to send.
        payload = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        try:
            response = await self._send(f"{self._base_url}/{path}", payload)
            try:
                yield response
            finally:
                # A body read to its end frees the connection for reuse. Anything else (the
                # consumer left early, was cancelled, failed) closes it: the disconnect is
                # what makes the upstream stop generating.
                if response.content.at_eof():
                    response.release()
                else:
                    response.close()
        except TimeoutError as exc:  # aiohttp's own timeouts subclass it too
            raise unavailable("The model server timed out; retry shortly.") from exc
        except aiohttp.ClientError as exc:
            log.warning("upstream unreachable: %r", exc)
            raise unavailable("The model server is unreachable; retry shortly.") from exc

    async def _send(self, url: str, payload: bytes) -> aiohttp.ClientResponse:
        # A redirect is answered as it stands, as httpx did: following it would turn the POST into a GET.
        post = functools.partial(self._session().post, url, data=payload, allow_redirects=False)
        try:
            return await post()
        except aiohttp.ClientConnectorError:
            raise  # refused or unresolved: nothing was sent, and a fresh connection fares no better
        except _STALE_CONNECTION:
            # Failing before any response is the signature of a pooled keep-alive connection
            # the server had just closed (uvicorn does after a failed stream): the request did
            # not run, and a generation has no side effects, so retry once on a fresh connection.
            # (aiohttp retries this itself only for idempotent methods, never for a POST.)
            return await post()


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


# -- response: SSE chunks -> engine events ----------------------------------
async def _sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """Yields each event's JSON until ``[DONE]``; a stream cut short is an upstream failure."""
    data: list[bytes] = []
    async with aclosing(_line_batches(response.content)) as batches:
        async for lines in batches:
            for line in lines:
                if line.startswith(b"data:"):
                    data.append(line[5:].removeprefix(b" "))
                elif not line and data:  # a blank line ends an event; other fields (pings, ids) carry nothing
                    payload, data = b"\n".join(data), []
                    if payload == b"[DONE]":
                        # Read to the end of the body: a fully read response returns its
                        # keep-alive connection to the pool instead of being dropped.
                        async for _ in batches:
                            pass
                        return
                    yield _parse_event(payload)
    if data != [b"[DONE]"]:  # tolerate a last line without its blank terminator
        # llama.cpp's server, for one, ends the stream silently when generation raises.
        raise unavailable("The model server ended the stream before finishing; retry shortly.")


async def _line_batches(content: aiohttp.StreamReader) -> AsyncIterator[list[bytes]]:
    """The body's lines (ended by ``\\n`` or ``\\r\\n``), in one batch per network read.

    Split here rather than by ``readline()``: one await per read instead of one per
    line, and no 128 KiB cap on a line (an echoed prompt's logprobs can exceed it).
    """
    rest = b""
    async for chunk in content.iter_any():
        *lines, rest = (rest + chunk).split(b"\n")
        if lines:
            yield [line.removesuffix(b"\r") for line in lines]
    if rest:  # a last line without its newline
        yield [rest.removesuffix(b"\r")]


def _parse_event(payload: bytes) -> dict[str, Any]:
    event = _json_or_empty(payload)
    if not event:
        raise unavailable("The model server sent a malformed stream event; retry shortly.")
    if "error" in event or event.get("object") == "error":  # how vLLM reports a failure mid-stream
        err = event.get("error", event)
        code = err.get("code") if isinstance(err, dict) else None
        # vLLM's code is the HTTP status it would have answered; anything else is a server failure.
        raise upstream_error(code if isinstance(code, int) and 400 <= code < 600 else 500, event)
    return event


def _as_chunk_choice(choice: dict[str, Any]) -> dict[str, Any]:
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


# -- errors -------------------------------------------------------------------
def upstream_error(status: int, body: dict[str, Any]) -> ServiceError:
    """Maps an upstream HTTP failure to the status our client should see."""
    message, param, code = _envelope(body)
    if status in (401, 403):
        # The backend's key, not the client's: an operator must fix it, so the client sees a 503.
        return unavailable("The model server rejected this backend's upstream credentials; an operator must fix them.")
    if status == 404:
        if code == "model_not_found" or "model" in message.lower():
            param, code = "model", "model_not_found"
        message = message or "Not found on the model server."
        return ServiceError(grpc.StatusCode.NOT_FOUND, message, param=param, code=code)
    if status in _INVALID_STATUSES:
        return invalid(message or f"The model server refused the request (HTTP {status}).", param, code)
    if status == 429:
        message = message or "The model server is overloaded; retry shortly."
        return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
    # 5xx bodies can hold tracebacks: log them for the operator, never pass them on.
    log.warning("upstream failed: HTTP %s %s", status, message)
    return unavailable(f"The model server failed (HTTP {status}); retry shortly.")


def _envelope(body: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """Message, param and code from OpenAI's envelope, vLLM's flat one or FastAPI's ``detail``."""
    err = body.get("error") if isinstance(body.get("error"), dict) else body
    message = err.get("message") or err.get("error") or ""
    param = err.get("param")
    detail = body.get("detail")
    if isinstance(detail, str):
        message = message or detail
    elif isinstance(detail, list) and detail and isinstance(detail[0], dict):  # FastAPI validation (422)
        message = message or str(detail[0].get("msg", ""))
        param = param or ".".join(str(p) for p in detail[0].get("loc", ()) if p != "body") or None
    code = err.get("code")  # vLLM puts the HTTP status here; only OpenAI's string codes mean anything
    return str(message)[:_MAX_MESSAGE], _str_or_none(param), _str_or_none(code)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _json_or_empty(raw: bytes) -> dict[str, Any]:
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
