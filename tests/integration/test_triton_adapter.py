"""The Triton adapter against a server speaking Triton's real gRPC protocol, with SmolLM2 behind it.

Directly on the engine and through the real TextGenerationService (with the
production interceptor, so ServiceErrors become gRPC statuses as in a pod).
"""

from __future__ import annotations

import asyncio
import json
import math

import grpc
import numpy as np
import pytest
from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

from modelplex.v1 import common_pb2, text_pb2
from modelplex_kit.errors import ServiceError
from modelplex_text.adapters.triton import TritonEngine, trtllm_inputs, vllm_inputs, vllm_logprobs
from modelplex_text.engine import Progress
from modelplex_text.prompting import OutputConstraint
from modelplex_text.sampling import SamplingParams
from modelplex_text.settings import TritonSettings
from tests.support.ports import free_port
from tests.support.text_service import text_service
from tests.support.triton_server import TritonStandIn, read_inputs

pytestmark = pytest.mark.integration

WEATHER = text_pb2.Tool(
    name="get_weather",
    description="Get the current weather in a city.",
    parameters_json=json.dumps(
        {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "London"]}},
            "required": ["city"],
        }
    ),
)


def chat(text: str, max_tokens: int = 16, **fields) -> text_pb2.GenerateRequest:
    message = text_pb2.ChatMessage(role="user", content=[text_pb2.ContentPart(text=text)])
    sampling = text_pb2.SamplingParams(max_tokens=max_tokens, temperature=0)
    return text_pb2.GenerateRequest(
        model="smollm2", chat=text_pb2.ChatInput(messages=[message]), sampling=sampling, **fields
    )


def settings(address: str, model: str = "smollm2", flavor: str = "vllm") -> TritonSettings:
    return TritonSettings(engine="triton", upstream_url=address, upstream_model=model, triton_flavor=flavor)


@pytest.fixture(scope="session")
async def triton():
    server = await TritonStandIn().start()
    yield server
    await server.stop()


@pytest.fixture(scope="session")
async def engine(triton):
    engine = TritonEngine(settings(triton.address))
    yield engine
    await engine.close()


@pytest.fixture(scope="session")
async def stub(engine):
    async with text_service(engine) as stub:
        yield stub


def sent_inputs(triton: TritonStandIn) -> dict[str, np.ndarray]:
    """The tensors of the last request the stand-in received."""
    request = triton.requests[-1]
    return read_inputs(request, triton.models[request.model_name])


def decoded(tensor) -> np.ndarray:
    raw = tensor._get_content()
    if tensor.datatype() == "BYTES":
        return deserialize_bytes_tensor(raw).reshape(tensor.shape())
    return np.frombuffer(raw, dtype=triton_to_np_dtype(tensor.datatype())).reshape(tensor.shape())


# -- the engine itself ---------------------------------------------------------------------
async def collected(stream) -> list:
    """The engine's deltas and usage, without the running Progress events between them."""
    return [event async for event in stream if not isinstance(event, Progress)]


async def test_chat_streams_deltas_then_usage(engine, triton):
    events = await collected(engine.stream(chat("What is the capital of France?", max_tokens=24)))
    deltas, usage = events[:-1], events[-1]
    assert isinstance(usage, common_pb2.Usage) and all(isinstance(d, text_pb2.ChoiceDelta) for d in deltas)
    assert len([d for d in deltas if d.text]) >= 2 and "".join(d.text for d in deltas).strip()
    assert [d.finish_reason for d in deltas if d.finish_reason] == [deltas[-1].finish_reason]
    assert usage.prompt_tokens > 10 and 0 < usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # What went over the wire: the chat template applied here, vLLM sampling parameters as JSON.
    inputs = sent_inputs(triton)
    assert inputs["text_input"][0].decode().endswith("<|im_start|>assistant\n")
    assert inputs["stream"][0] and inputs["exclude_input_in_output"][0]
    sampling = json.loads(inputs["sampling_parameters"][0])
    assert sampling["max_tokens"] == 24 and sampling["temperature"] == 0 and "structured_outputs" not in sampling


async def test_max_tokens_reached_is_length(engine):
    events = await collected(engine.stream(chat("Count from one to one hundred.", max_tokens=5)))
    assert events[-2].finish_reason == text_pb2.FINISH_REASON_LENGTH
    assert events[-1].completion_tokens == 5


async def test_logprobs_come_from_the_vllm_backend_with_each_delta(stub, triton):
    stream = stub.GenerateStream(chat("Name a fruit.", max_tokens=8, logprobs=True, top_logprobs=3))
    deltas = [delta async for message in stream for delta in message.deltas]
    scored = [lp for delta in deltas for lp in delta.logprobs]
    assert scored and "".join(lp.token for lp in scored) == "".join(delta.text for delta in deltas)
    for lp in scored:
        assert len(lp.top_logprobs) == 3 and lp.token_bytes == lp.token.encode()
        assert (lp.top_logprobs[0].token, lp.top_logprobs[0].logprob) == (lp.token, lp.logprob)  # greedy
        assert sum(math.exp(t.logprob) for t in lp.top_logprobs) <= 1.0 + 1e-6
    inputs = sent_inputs(triton)
    assert inputs["return_logprobs"][0] and json.loads(inputs["sampling_parameters"][0])["logprobs"] == 3


def test_vllm_logprobs_keep_the_sampled_token_and_rank_the_alternatives():
    # The backend's JSON for two tokens: the sampled one first, whether or not it is among the top 2.
    raw = json.dumps(
        [
            {
                "7": {"logprob": -0.1, "rank": 1, "decoded_token": " a"},
                "9": {"logprob": -2.5, "rank": 2, "decoded_token": "é"},
            },
            {
                "3": {"logprob": -4.0, "rank": 5, "decoded_token": "x"},
                "1": {"logprob": -0.5, "rank": 1, "decoded_token": "y"},
                "2": {"logprob": -1.5, "rank": 2, "decoded_token": "z"},
            },
        ]
    ).encode()
    first, second = vllm_logprobs(raw, top=2)
    assert (first.token, first.logprob, [t.token for t in first.top_logprobs]) == (
        " a",
        pytest.approx(-0.1),
        [" a", "é"],
    )
    assert first.top_logprobs[1].token_bytes == "é".encode()
    assert (second.token, [t.token for t in second.top_logprobs]) == ("x", ["y", "z"])
    assert vllm_logprobs(b"null", top=2) == []


async def test_legacy_completion_with_echo(engine):
    request = text_pb2.GenerateRequest(
        completion=text_pb2.CompletionInput(prompt="1, 2, 3, 4,", echo=True),
        sampling=text_pb2.SamplingParams(max_tokens=8, temperature=0),
    )
    events = await collected(engine.stream(request))
    text = "".join(e.text for e in events[:-1])
    assert text.startswith("1, 2, 3, 4,") and len(text) > len("1, 2, 3, 4,")


async def test_template_bos_is_left_to_the_backend_tokenizer(triton):
    # SmolLM2 adds no BOS; pretend it did (as Llama 3 does): Triton's tokenizer would add it
    # again, so the prompt goes without it, and usage still counts it.
    engine = TritonEngine(settings(triton.address))
    try:
        plain = (await collected(engine.stream(chat("Hi", max_tokens=1))))[-1]
        engine._bos = "<|im_start|>"
        with_bos = (await collected(engine.stream(chat("Hi", max_tokens=1))))[-1]
        assert sent_inputs(triton)["text_input"][0].decode().startswith("system\n")
        assert with_bos.prompt_tokens == plain.prompt_tokens
    finally:
        await engine.close()


async def test_suffix_is_refused_before_calling_triton(engine):
    request = text_pb2.GenerateRequest(completion=text_pb2.CompletionInput(prompt="def f(", suffix=")"))
    with pytest.raises(ServiceError) as caught:
        await anext(engine.stream(request))
    assert caught.value.status == grpc.StatusCode.INVALID_ARGUMENT and caught.value.param == "suffix"


# -- through the gRPC servicer ---------------------------------------------------------------
async def test_generate(stub):
    response = await stub.Generate(chat("Say hello to Paris."), timeout=60)
    (choice,) = response.choices
    assert choice.text.strip() and choice.finish_reason in (text_pb2.FINISH_REASON_STOP, text_pb2.FINISH_REASON_LENGTH)
    assert response.usage.prompt_tokens > 0 and 0 < response.usage.completion_tokens <= 16


async def test_generate_stream(stub):
    responses = [r async for r in stub.GenerateStream(chat("Tell me about the sea.", max_tokens=20), timeout=60)]
    deltas = [d for r in responses for d in r.deltas]
    assert len([d for d in deltas if d.text]) >= 3
    assert deltas[-1].finish_reason != text_pb2.FINISH_REASON_UNSPECIFIED
    assert not responses[-1].deltas and responses[-1].usage.completion_tokens <= 20
    assert responses[-1].usage.prompt_tokens > 0 and len({r.id for r in responses}) == 1


async def test_multiple_choices(stub):
    request = chat("Name a colour.", max_tokens=8, n=2)
    request.sampling.temperature, request.sampling.seed = 0.9, 7
    response = await stub.Generate(request, timeout=60)
    assert [c.index for c in response.choices] == [0, 1]
    assert all(c.text and c.finish_reason for c in response.choices)
    assert response.usage.completion_tokens <= 16


async def test_forced_tool_call_is_valid_json(stub, triton):
    request = chat(
        "What is the weather in Paris?",
        max_tokens=32,
        tools=[WEATHER],
        tool_choice=text_pb2.ToolChoice(mode=text_pb2.ToolChoice.MODE_REQUIRED),
    )
    response = await stub.Generate(request, timeout=60)
    (choice,) = response.choices
    assert choice.finish_reason == text_pb2.FINISH_REASON_TOOL_CALLS and not choice.text
    (call,) = choice.tool_calls
    assert call.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.arguments)["city"] in ("Paris", "London")
    # Enforced by guided decoding: the schema of the call went to the backend.
    guide = json.loads(json.loads(sent_inputs(triton)["sampling_parameters"][0])["structured_outputs"])
    assert guide["json"]["properties"]["name"] == {"const": "get_weather"}


async def test_json_schema_response_format(stub, triton):
    schema = {"type": "object", "properties": {"sunny": {"type": "boolean"}}, "required": ["sunny"]}
    request = chat(
        "Is it sunny in Paris today?",
        max_tokens=32,
        response_format=text_pb2.ResponseFormat(
            type=text_pb2.ResponseFormat.TYPE_JSON_SCHEMA, schema_json=json.dumps(schema)
        ),
    )
    response = await stub.Generate(request, timeout=60)
    assert isinstance(json.loads(response.choices[0].text)["sunny"], bool)
    # The schema reached Triton as vLLM's guided decoding, not just as words in the prompt.
    sampling = json.loads(sent_inputs(triton)["sampling_parameters"][0])
    assert json.loads(sampling["structured_outputs"]) == {"json": schema}


async def test_client_disconnect_aborts_triton_request(stub, triton):
    request = text_pb2.GenerateRequest(
        model="smollm2",
        completion=text_pb2.CompletionInput(prompt="1, 2, 3, 4, 5,"),
        sampling=text_pb2.SamplingParams(max_tokens=400, temperature=0),  # never reached: cancelled
    )
    aborted = triton.aborted
    call = stub.GenerateStream(request, timeout=60)
    first = await call.read()
    assert first.deltas
    call.cancel()
    for _ in range(100):
        if triton.aborted > aborted:
            break
        await asyncio.sleep(0.05)
    assert triton.aborted == aborted + 1


# -- failures ------------------------------------------------------------------------------
async def test_unknown_triton_model_is_unavailable(triton):
    engine = TritonEngine(settings(triton.address, model="no-such-model"))
    try:
        with pytest.raises(ServiceError) as caught:
            await collected(engine.stream(chat("Hi")))
        assert caught.value.status == grpc.StatusCode.UNAVAILABLE and "no-such-model" in caught.value.message
        async with text_service(engine) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as rpc:
                await stub.Generate(chat("Hi"), timeout=30)
        assert rpc.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await engine.close()


async def test_triton_down_is_unavailable():
    engine = TritonEngine(settings(f"127.0.0.1:{free_port()}"))
    try:
        async with text_service(engine) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as rpc:
                async for _ in stub.GenerateStream(chat("Hi"), timeout=30):
                    pass
        assert rpc.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await engine.close()


async def test_flavor_mismatch_is_a_server_error(triton):
    # A TRT-LLM layout sent to a vLLM-backend model: Triton refuses the inputs (in-band, by name).
    engine = TritonEngine(settings(triton.address, model="smollm2", flavor="trtllm"))
    try:
        with pytest.raises(ServiceError) as caught:
            await collected(engine.stream(chat("Hi")))
        assert caught.value.status == grpc.StatusCode.INTERNAL
        assert "unexpected inference input 'max_tokens'" in caught.value.message
    finally:
        await engine.close()


# -- the TRT-LLM flavor --------------------------------------------------------------------
def test_trtllm_inputs():
    params = SamplingParams(
        temperature=0.5, top_p=0.9, max_tokens=32, stop=("\n\n", "END"), seed=-1, frequency_penalty=0.25
    )
    tensors = {t.name(): t for t in trtllm_inputs("Hello", params, OutputConstraint("json_object"))}
    assert {name: (t.datatype(), t.shape()) for name, t in tensors.items()} == {
        "text_input": ("BYTES", [1, 1]),
        "max_tokens": ("INT32", [1, 1]),
        "stream": ("BOOL", [1, 1]),
        "temperature": ("FP32", [1, 1]),
        "top_p": ("FP32", [1, 1]),
        "frequency_penalty": ("FP32", [1, 1]),
        "stop_words": ("BYTES", [1, 2]),
        "random_seed": ("UINT64", [1, 1]),
    }
    assert decoded(tensors["text_input"]).tolist() == [[b"Hello"]]
    assert decoded(tensors["max_tokens"]).tolist() == [[32]]
    assert decoded(tensors["stop_words"]).tolist() == [[b"\n\n", b"END"]]
    assert decoded(tensors["random_seed"]).tolist() == [[2**64 - 1]]
    assert decoded(tensors["temperature"]).tolist() == [[0.5]]


def test_vllm_inputs():
    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=8)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    tensors = {t.name(): t for t in vllm_inputs("Hi", params, OutputConstraint("json_schema", schema))}
    assert {name: (t.datatype(), t.shape()) for name, t in tensors.items()} == {
        "text_input": ("BYTES", [1]),
        "stream": ("BOOL", [1]),
        "sampling_parameters": ("BYTES", [1]),
        "exclude_input_in_output": ("BOOL", [1]),
    }
    sampling = json.loads(decoded(tensors["sampling_parameters"])[0])
    assert "seed" not in sampling and sampling["max_tokens"] == 8
    assert json.loads(sampling["structured_outputs"]) == {"json": schema}


async def test_trtllm_flavor_end_to_end(triton):
    engine = TritonEngine(settings(triton.address, model="ensemble", flavor="trtllm"))
    try:
        assert not engine.capabilities.json_schema and not engine.capabilities.logprobs
        request = chat("What is the capital of France?", max_tokens=12)
        request.sampling.seed = 3
        async with text_service(engine) as stub:
            response = await stub.Generate(request, timeout=60)
        assert response.choices[0].text.strip() and 0 < response.usage.completion_tokens <= 12
        inputs = sent_inputs(triton)
        assert inputs["max_tokens"].tolist() == [[12]] and inputs["random_seed"].tolist() == [[3]]
    finally:
        await engine.close()


async def test_ready_checks_the_server_and_the_model(triton, engine):
    assert await engine.ready() is True
    missing = TritonEngine(settings(triton.address, model="not-loaded"))
    gone = TritonEngine(settings(f"127.0.0.1:{free_port()}"))
    try:
        assert await missing.ready() is False  # the server answers, the model is not loaded
        assert await gone.ready() is False
    finally:
        await missing.close()
        await gone.close()
