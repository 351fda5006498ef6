"""The `openai` engine adapter against a real OpenAI-compatible server.

llama-cpp-python's server (SmolLM2-135M) stands in for a vLLM pod: the adapter
is driven directly and through the real gRPC servicer. What llama.cpp's server
cannot produce (usage in streams, tool-call fragments, 4xx envelopes, 429s) is
replayed from canned vLLM-style responses by a local aiohttp server, which
also records what the adapter sent.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import aclosing
from dataclasses import dataclass, field

import grpc
import pytest
from aiohttp import web
from multidict import CIMultiDict

from modelplex.v1 import common_pb2, text_pb2
from modelplex_kit.errors import ServiceError
from modelplex_text.adapters.openai_http import OpenAIHttpEngine
from modelplex_text.servicer import merge_delta
from modelplex_text.settings import OpenAISettings
from tests.support.llama_server import llama_server
from tests.support.ports import free_port
from tests.support.text_service import text_service

pytestmark = pytest.mark.integration

API_KEY = "sk-upstream-test"
MAX_TOKENS = 16


# -- fixtures -------------------------------------------------------------------
@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    # interrupt_requests is off in every test server (tests/support/llama_server.py): a queued
    # request must not end a running stream, so only the adapter closing its response can free it early.
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with llama_server(log, api_key=API_KEY) as server:
        yield server


def settings_for(llama, **overrides) -> OpenAISettings:
    values = {
        "engine": "openai",
        "upstream_url": llama.base_url,
        "upstream_model": llama.model,
        "upstream_api_key": API_KEY,
        "upstream_timeout_seconds": 60.0,
    }
    return OpenAISettings(**(values | overrides))


@pytest.fixture(scope="session")
async def engine(llama):
    engine = OpenAIHttpEngine(settings_for(llama))
    yield engine
    await engine.close()


@pytest.fixture(scope="session")
async def stub(engine):
    async with text_service(engine) as stub:
        yield stub


def chat(text: str, max_tokens: int = MAX_TOKENS, **fields) -> text_pb2.GenerateRequest:
    message = text_pb2.ChatMessage(role="user", content=[text_pb2.ContentPart(text=text)])
    return text_pb2.GenerateRequest(
        model="smollm2",
        chat=text_pb2.ChatInput(messages=[message]),
        sampling=text_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
        **fields,
    )


async def collect(engine, request) -> list:
    async with aclosing(engine.stream(request)) as events:
        return [event async for event in events]


def assert_usage(usage: common_pb2.Usage, max_tokens: int = MAX_TOKENS) -> None:
    # llama.cpp's server ignores stream_options, so usage is the adapter's chunk count.
    assert 0 < usage.completion_tokens <= max_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


# -- against llama.cpp's server ---------------------------------------------------
async def test_adapter_streams_chat_deltas_then_usage(engine):
    events = await collect(engine, chat("Say hello to the world."))
    *deltas, usage = events
    assert isinstance(usage, common_pb2.Usage)
    assert all(isinstance(d, text_pb2.ChoiceDelta) and d.index == 0 for d in deltas)
    assert "".join(d.text for d in deltas).strip()
    assert [d.finish_reason for d in deltas if d.finish_reason] == [deltas[-1].finish_reason]
    assert deltas[-1].finish_reason in (text_pb2.FINISH_REASON_STOP, text_pb2.FINISH_REASON_LENGTH)
    assert_usage(usage)


async def test_generate_over_grpc(stub):
    response = await stub.Generate(chat("What is the capital of France?"))
    (choice,) = response.choices
    assert choice.text.strip()
    assert choice.finish_reason in (text_pb2.FINISH_REASON_STOP, text_pb2.FINISH_REASON_LENGTH)
    assert_usage(response.usage)


async def test_generate_stream_over_grpc(stub):
    messages = [m async for m in stub.GenerateStream(chat("Tell me a short story about a cat."))]
    *chunks, last = messages
    text = "".join(d.text for m in chunks for d in m.deltas)
    assert len(chunks) >= 3 and text.strip()
    assert not last.deltas and last.HasField("usage")
    assert not any(m.HasField("usage") for m in chunks)
    assert chunks[-1].deltas[-1].finish_reason != text_pb2.FINISH_REASON_UNSPECIFIED
    assert_usage(last.usage)


async def test_legacy_completion_with_logprobs(stub):
    request = text_pb2.GenerateRequest(
        model="smollm2",
        completion=text_pb2.CompletionInput(prompt="Once upon a time"),
        sampling=text_pb2.SamplingParams(max_tokens=8, temperature=0.0),
        logprobs=True,
        top_logprobs=2,
    )
    response = await stub.Generate(request)
    (choice,) = response.choices
    assert choice.text
    assert choice.finish_reason == text_pb2.FINISH_REASON_LENGTH
    assert "".join(lp.token for lp in choice.logprobs) == choice.text
    assert all(lp.logprob <= 0 and lp.top_logprobs for lp in choice.logprobs)
    assert_usage(response.usage, max_tokens=8)


async def test_chat_logprobs(engine):
    events = await collect(engine, chat("Say hi.", max_tokens=4, logprobs=True, top_logprobs=2))
    logprobs = [lp for e in events if isinstance(e, text_pb2.ChoiceDelta) for lp in e.logprobs]
    assert logprobs and all(lp.token and lp.token_bytes and len(lp.top_logprobs) >= 2 for lp in logprobs)


async def failure_of(llama, **settings) -> ServiceError:
    """The error a chat request gets from an engine configured with ``settings``."""
    engine = OpenAIHttpEngine(settings_for(llama, **settings))
    try:
        with pytest.raises(ServiceError) as caught:
            await collect(engine, chat("hi"))
    finally:
        await engine.close()
    return caught.value


async def test_rejected_credentials_are_unavailable_not_the_clients_fault(llama):
    error = await failure_of(llama, upstream_api_key="sk-wrong")
    assert error.status == grpc.StatusCode.UNAVAILABLE
    assert "credentials" in error.message


async def test_unknown_upstream_route_is_not_found(llama):
    error = await failure_of(llama, upstream_url=llama.base_url.replace("/v1", "/nowhere/v1"))
    assert error.status == grpc.StatusCode.NOT_FOUND


async def test_closed_port_is_unavailable_over_grpc(llama):
    engine = OpenAIHttpEngine(settings_for(llama, upstream_url=f"http://127.0.0.1:{free_port()}/v1"))
    try:
        async with text_service(engine) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Generate(chat("hi"))
    finally:
        await engine.close()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "Traceback" not in caught.value.details()


async def test_silently_truncated_stream_is_unavailable(stub):
    # llama.cpp's server answers 200 and then ends the stream without [DONE] when the
    # prompt overflows its context; the adapter must not pass that off as a success.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.GenerateStream(chat("word " * 2500, max_tokens=4)):
            pass
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_unary_context_overflow_is_the_clients_400(stub):
    # Unary calls go upstream without streaming, where the server can still answer 400.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(chat("word " * 2500, max_tokens=4))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context" in caught.value.details()


LONG = "Write a very long essay about the history of the world."


async def assert_upstream_aborted(llama, engine, disconnects_before: int) -> None:
    # llama.cpp's server logs the client's disconnect: proof the adapter closed its response.
    for _ in range(100):
        if llama.disconnects() > disconnects_before:
            break
        await asyncio.sleep(0.1)
    assert llama.disconnects() == disconnects_before + 1
    # ...and its only slot is free again: without the abort this would wait for 1500 tokens.
    started = time.monotonic()
    events = await collect(engine, chat("Say hi.", max_tokens=4))
    assert isinstance(events[-1], common_pb2.Usage)
    assert time.monotonic() - started < 20


async def test_aclose_aborts_the_upstream_generation(llama, engine):
    before = llama.disconnects()
    async with aclosing(engine.stream(chat(LONG, max_tokens=1500))) as events:
        assert isinstance(await anext(events), text_pb2.ChoiceDelta)
    await assert_upstream_aborted(llama, engine, before)


async def test_grpc_cancellation_aborts_the_upstream_generation(llama, engine, stub):
    before = llama.disconnects()
    call = stub.GenerateStream(chat(LONG, max_tokens=1500))
    assert (await call.read()).deltas
    call.cancel()  # the client went away: the servicer's stream is cancelled, then the adapter's
    await assert_upstream_aborted(llama, engine, before)


# -- canned vLLM responses ----------------------------------------------------------
def sse(*events) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


@dataclass
class Received:
    url: str
    headers: CIMultiDict
    content: bytes
    peer: tuple  # the client's address and port: the same twice means one reused connection


@dataclass
class Canned:
    """A vLLM stand-in that answers every POST with ``body`` and records each request."""

    url: str
    status: int = 200
    body: bytes = b""
    pause: float = 0.0  # before the answer and between its events
    drops: int = 0  # requests to answer by closing the connection instead
    seen: list[Received] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(
            Received(
                str(request.url),
                request.headers.copy(),
                await request.read(),
                request.transport.get_extra_info("peername"),
            )
        )
        if self.drops:
            self.drops -= 1
            request.transport.close()  # what a server closing an idle keep-alive connection looks like
            return web.Response()
        response = web.StreamResponse(status=self.status, headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        *events, tail = self.body.split(b"\n\n")
        for piece in [e + b"\n\n" for e in events] + ([tail] if tail else []):  # a write per event, as vLLM does
            await asyncio.sleep(self.pause)
            await response.write(piece)
        await asyncio.sleep(max(self.pause, 0.01))  # the body's end comes apart from [DONE], as from vLLM
        await response.write_eof()
        return response


@pytest.fixture
async def upstream():
    port = free_port()
    server = Canned(f"http://127.0.0.1:{port}/v1")
    app = web.Application()
    app.router.add_post("/{path:.*}", server.handle)
    # handler_cancellation: like vLLM, stop answering when the client goes away.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield server
    await runner.cleanup()


def canned(upstream: Canned, status: int, body: bytes, **settings) -> OpenAIHttpEngine:
    upstream.status, upstream.body = status, body
    values = {"engine": "openai", "upstream_url": upstream.url, "upstream_api_key": "sk-op"}
    return OpenAIHttpEngine(OpenAISettings(**(values | settings)))


async def test_request_translation_and_tool_call_fragments(upstream):
    call_chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]},
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": ""},
                            }
                        ]
                    },
                }
            ]
        },
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {
            "choices": [],
            "usage": {
                "prompt_tokens": 40,
                "completion_tokens": 9,
                "total_tokens": 49,
                "prompt_tokens_details": {"cached_tokens": 32},
            },
        },
    ]
    engine = canned(upstream, 200, sse(*call_chunks, "[DONE]"))
    request = text_pb2.GenerateRequest(
        model="qwen-7b",
        chat=text_pb2.ChatInput(
            messages=[
                text_pb2.ChatMessage(
                    role="user",
                    content=[
                        text_pb2.ContentPart(text="Weather here?"),
                        text_pb2.ContentPart(image=text_pb2.ImageInput(url="data:image/png;base64,AA==", detail="low")),
                    ],
                ),
                text_pb2.ChatMessage(
                    role="assistant", tool_calls=[text_pb2.ToolCall(id="c0", name="f", arguments="{}")]
                ),
                text_pb2.ChatMessage(role="tool", tool_call_id="c0", content=[text_pb2.ContentPart(text="42")]),
            ]
        ),
        tools=[text_pb2.Tool(name="get_weather", parameters_json='{"type":"object","properties":{"city":{}}}')],
        tool_choice=text_pb2.ToolChoice(mode=text_pb2.ToolChoice.MODE_AUTO),
        sampling=text_pb2.SamplingParams(max_tokens=20, stop=["\n"]),
        n=2,
    )
    events = await collect(engine, request)
    await engine.close()

    (sent,) = upstream.seen
    body = json.loads(sent.content)
    assert sent.url == f"{upstream.url}/chat/completions"
    assert sent.headers["authorization"] == "Bearer sk-op"
    assert sent.headers["content-type"] == "application/json"
    assert body["model"] == "qwen-7b"  # no upstream_model: the catalog's id
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 20 and body["stop"] == ["\n"] and body["n"] == 2
    assert "temperature" not in body and "top_p" not in body and "presence_penalty" not in body
    user, assistant, tool = body["messages"]
    image = {"url": "data:image/png;base64,AA==", "detail": "low"}
    assert user["content"] == [{"type": "text", "text": "Weather here?"}, {"type": "image_url", "image_url": image}]
    assert assistant["tool_calls"] == [{"id": "c0", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    assert tool == {"role": "tool", "content": "42", "tool_call_id": "c0"}
    assert body["tools"][0]["function"]["parameters"]["properties"] == {"city": {}}
    assert body["tool_choice"] == "auto"  # an optional call is left to vLLM's tool parser

    *deltas, usage = events
    choice = text_pb2.Choice()
    for delta in deltas:  # aggregated the way Generate does
        merge_delta(choice, delta)
    assert (choice.tool_calls[0].id, choice.tool_calls[0].name) == ("call_1", "get_weather")
    assert json.loads(choice.tool_calls[0].arguments) == {"city": "Paris"}
    assert choice.finish_reason == text_pb2.FINISH_REASON_TOOL_CALLS
    # With prefix caching, what was not read from vLLM's cache was written to it: 40 - 32.
    assert usage == common_pb2.Usage(
        prompt_tokens=40, completion_tokens=9, total_tokens=49, cached_prompt_tokens=32, cache_creation_prompt_tokens=8
    )


def plain_chat(**fields) -> text_pb2.GenerateRequest:
    """A chat request with nothing set but what ``fields`` set."""
    message = text_pb2.ChatMessage(role="user", content=[text_pb2.ContentPart(text="hi")])
    return text_pb2.GenerateRequest(model="m", chat=text_pb2.ChatInput(messages=[message]), **fields)


WEATHER = text_pb2.Tool(
    name="get_weather",
    parameters_json='{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}',
)


async def test_only_fields_the_client_set_are_sent(upstream):
    # vLLM refuses a tool_choice without tools (400 "When using `tool_choice`, `tools` must be set."):
    # the adapter used to send tool_choice "auto" on every chat request.
    answer = {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}]}
    engine = canned(upstream, 200, sse(answer, "[DONE]"))
    await collect(engine, plain_chat())
    await collect(engine, text_pb2.GenerateRequest(model="m", completion=text_pb2.CompletionInput(prompt="Once")))
    await engine.close()
    chat, completion = (json.loads(seen.content) for seen in upstream.seen)
    assert set(chat) == {"model", "stream", "stream_options", "messages"}
    assert set(completion) == {"model", "stream", "stream_options", "prompt"}


@pytest.mark.parametrize(
    "choice",
    [
        text_pb2.ToolChoice(mode=text_pb2.ToolChoice.MODE_REQUIRED),
        text_pb2.ToolChoice(mode=text_pb2.ToolChoice.MODE_NAMED, function_name="get_weather"),
    ],
)
@pytest.mark.parametrize("stream", [True, False])
async def test_a_forced_tool_call_is_structured_output_turned_into_tool_calls(upstream, choice, stream):
    """vLLM's tool parsers guarantee no schema-valid call for a forced choice; the call's JSON is asked
    for as structured output and turned into tool_calls here, as the local engine does."""
    content = ['{"name": "get_weather", ', '"arguments": {"city": ', '"Paris"}}']
    if stream:
        chunks = [{"choices": [{"index": 0, "delta": {"content": c}}]} for c in content]
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        engine = canned(upstream, 200, sse(*chunks, "[DONE]"))
    else:
        message = {"role": "assistant", "content": "".join(content)}
        answer = {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": {}}
        engine = canned(upstream, 200, json.dumps(answer).encode())
    request = plain_chat(tools=[WEATHER], tool_choice=choice)
    events = await collect(engine, request) if stream else [e async for e in engine.stream(request, incremental=False)]
    await engine.close()

    body = json.loads(upstream.seen[0].content)
    assert body["tool_choice"] == "none" and body["tools"][0]["function"]["name"] == "get_weather"
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["name"] == {"const": "get_weather"}
    assert schema["properties"]["arguments"]["required"] == ["city"]
    result = text_pb2.Choice()
    for delta in events[:-1]:
        merge_delta(result, delta)
    assert not result.text
    (call,) = result.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")
    assert result.finish_reason == text_pb2.FINISH_REASON_TOOL_CALLS


@pytest.mark.parametrize(
    ("status", "body", "code", "param", "error_code"),
    [
        (
            400,
            {
                "error": {
                    "message": "temperature too high",
                    "type": "BadRequestError",
                    "param": "temperature",
                    "code": 400,
                }
            },
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
            None,
        ),
        (
            400,
            {"object": "error", "message": "bad", "type": "BadRequestError", "param": None, "code": 400},
            grpc.StatusCode.INVALID_ARGUMENT,
            None,
            None,
        ),
        (  # vLLM's answer to max_tokens beyond what the context leaves: a 400 naming max_tokens, not a 503
            400,
            {
                "error": {
                    "message": "'max_tokens' or 'max_completion_tokens' is too large: 9000. This model's maximum "
                    "context length is 8192 tokens and your request has 20 input tokens (9000 > 8192 - 20).",
                    "type": "BadRequestError",
                    "param": None,
                    "code": 400,
                }
            },
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_tokens",
            None,
        ),
        (
            422,
            {"detail": [{"loc": ["body", "max_tokens"], "msg": "must be an int"}]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_tokens",
            None,
        ),
        (413, {}, grpc.StatusCode.INVALID_ARGUMENT, None, None),
        (401, {"error": {"message": "Unauthorized"}}, grpc.StatusCode.UNAVAILABLE, None, None),
        (403, {}, grpc.StatusCode.UNAVAILABLE, None, None),
        (
            404,
            {"error": {"message": "The model `x` does not exist.", "code": 404}},
            grpc.StatusCode.NOT_FOUND,
            "model",
            "model_not_found",
        ),
        (429, {"error": {"message": "slow down"}}, grpc.StatusCode.RESOURCE_EXHAUSTED, None, None),
        (
            500,
            {"error": {"message": "Traceback (most recent call last):\n  File ..."}},
            grpc.StatusCode.UNAVAILABLE,
            None,
            None,
        ),
        (503, {}, grpc.StatusCode.UNAVAILABLE, None, None),
    ],
)
async def test_upstream_error_mapping(upstream, status, body, code, param, error_code):
    engine = canned(upstream, status, json.dumps(body).encode())
    with pytest.raises(ServiceError) as caught:
        await collect(engine, chat("hi"))
    await engine.close()
    error = caught.value
    assert (error.status, error.param, error.code) == (code, param, error_code)
    assert "Traceback" not in error.message
    if status in (400, 429):
        assert error.message == (body.get("error") or body)["message"]


async def test_error_event_inside_the_stream(upstream):
    chunk = {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}
    engine = canned(upstream, 200, sse(chunk, {"error": {"message": "prompt too long", "code": 400}}))
    async with aclosing(engine.stream(chat("hi"))) as events:
        assert (await anext(events)).text == "Hi"
        with pytest.raises(ServiceError) as caught:
            await anext(events)
    await engine.close()
    assert caught.value.status == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message == "prompt too long"


async def test_unary_is_one_non_streaming_call(upstream):
    answer = {
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }
    engine = canned(upstream, 200, json.dumps(answer).encode())
    async with aclosing(engine.stream(chat("hi"), incremental=False)) as events:
        (delta, usage) = [event async for event in events]
    await engine.close()
    body = json.loads(upstream.seen[0].content)
    assert body["stream"] is False and "stream_options" not in body
    assert (delta.tool_calls[0].id, delta.tool_calls[0].name) == ("call_1", "f")
    assert delta.finish_reason == text_pb2.FINISH_REASON_TOOL_CALLS
    expected = common_pb2.Usage(prompt_tokens=5, completion_tokens=3, total_tokens=8, cache_creation_prompt_tokens=5)
    assert usage == expected


async def test_stream_framing(upstream):
    # CRLF line ends (sse-starlette's), pings, an event far beyond aiohttp's 128 KiB line cap
    # (echoed prompt logprobs get that big), and a last [DONE] without its blank line.
    big = "x" * 300_000
    body = (
        f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': big}}]})}\r\n\r\n"
        ": ping\r\n\r\ndata: [DONE]\r\n"
    ).encode()
    engine = canned(upstream, 200, body)
    *deltas, usage = await collect(engine, chat("hi"))
    await engine.close()
    assert [d.text for d in deltas] == [big]
    assert usage.completion_tokens == 1


async def test_finished_streams_reuse_their_connection(upstream):
    engine = canned(upstream, 200, sse({"choices": [{"index": 0, "delta": {"content": "Hi"}}]}, "[DONE]"))
    for _ in range(2):
        await collect(engine, chat("hi"))
    async with aclosing(engine.stream(chat("hi"))) as events:
        await anext(events)  # left early: that connection must be closed, never reused
    await collect(engine, chat("hi"))
    await engine.close()
    first, second, early, after = (r.peer for r in upstream.seen)
    assert first == second == early != after


async def test_a_connection_closed_before_answering_is_retried_once(upstream):
    engine = canned(upstream, 200, sse({"choices": [{"index": 0, "delta": {"content": "Hi"}}]}, "[DONE]"))
    await collect(engine, chat("hi"))
    upstream.drops = 1  # the server drops the pooled connection as the next request arrives
    *deltas, _ = await collect(engine, chat("hi"))
    assert [d.text for d in deltas] == ["Hi"]
    upstream.drops = 2  # ...but only once: a second failure is the server's
    with pytest.raises(ServiceError) as caught:
        await collect(engine, chat("hi"))
    await engine.close()
    assert caught.value.status == grpc.StatusCode.UNAVAILABLE
    assert len(upstream.seen) == 5


async def test_timeout_bounds_silence_not_the_whole_stream(upstream):
    # Gaps far apart from the timeout, so a loaded machine's scheduling delays cannot blur them:
    # 0.1 s between bytes, 2.1 s in all, against a 1 s timeout; then 5 s of silence.
    chunks = [{"choices": [{"index": 0, "delta": {"content": str(i % 10)}}]} for i in range(20)]
    upstream.pause = 0.1
    engine = canned(upstream, 200, sse(*chunks, "[DONE]"), upstream_timeout_seconds=1.0)
    started = time.monotonic()
    *deltas, _ = await collect(engine, chat("hi"))
    assert time.monotonic() - started > 2.0  # the stream outlasted the timeout
    assert "".join(d.text for d in deltas) == "01234567890123456789"
    upstream.pause = 5.0
    with pytest.raises(ServiceError) as caught:
        await collect(engine, chat("hi"))
    await engine.close()
    assert caught.value.status == grpc.StatusCode.UNAVAILABLE
    assert "timed out" in caught.value.message


async def test_ready_follows_the_upstream(llama):
    """The backend's readiness probe: ready against the live server, not against a closed port or a wrong key."""
    live = OpenAIHttpEngine(settings_for(llama))
    closed = OpenAIHttpEngine(settings_for(llama, upstream_url=f"http://127.0.0.1:{free_port()}/v1"))
    wrong_key = OpenAIHttpEngine(settings_for(llama, upstream_api_key="sk-wrong"))
    try:
        assert await live.ready() is True
        assert await closed.ready() is False
        assert await wrong_key.ready() is False  # a 401 cannot serve anything either
    finally:
        for engine in (live, closed, wrong_key):
            await engine.close()


@pytest.mark.parametrize(("health", "ready"), [(200, True), (503, False), (404, True)])
async def test_ready_follows_vllms_health(health, ready):
    """vLLM's /health answers 503 once its engine died, while /v1/models still answers: not ready.
    A server without /health (404) is judged by /v1/models alone."""
    async def health_check(_: web.Request) -> web.Response:
        return web.Response(status=health)

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m"}]})

    app = web.Application()
    app.router.add_get("/health", health_check)
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    engine = OpenAIHttpEngine(OpenAISettings(engine="openai", upstream_url=f"http://127.0.0.1:{port}/v1"))
    try:
        assert await engine.ready() is ready
    finally:
        await engine.close()
        await runner.cleanup()
