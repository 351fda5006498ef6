"""The text modality on a real Triton: our vLLM backend (deploy/triton/backends/vllm/model.py) running
the real vLLM, behind the Triton adapter, driven directly and through the edge with the openai SDK.

Three layers, each against the session's tritonserver (this folder's conftest):
- the vLLM backend's contract itself, over Triton's gRPC API with tritonclient;
- the adapter class (TritonEngine), as tests/integration/test_triton_adapter.py drives it against
  the stand-in (tests/support/triton_server.py);
- the whole stack, from docs/examples/catalog-triton.yaml's text entry.

Where an assertion is about plumbing, sampling is greedy (temperature 0), so the outcome is fixed by
construction. The test that unloads the model runs last: it reloads it, which takes a while.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import jsonschema
import numpy as np
import openai
import pytest
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import np_to_triton_dtype

from modelplex.v1 import common_pb2, text_pb2
from modelplex_kit.errors import ServiceError
from modelplex_text.adapters.triton import TritonEngine
from modelplex_text.engine import Progress
from modelplex_text.settings import TritonSettings
from tests.e2e.test_chat import TIME_TOOL, WEATHER_TOOL
from tests.support.real_triton import TritonServer
from tests.support.text_service import text_service
from tests.support.until import wait_until
from tests.triton.conftest import example_model, start_stack

pytestmark = pytest.mark.triton

MODEL = "smollm2"  # Triton's name for it
TEXT_MODEL = "smollm2-135m-instruct"  # the catalog's
DEV_KEY = "sk-modelplex-triton-text"
# The gauge our vLLM backend keeps on Triton's metrics port: vLLM's unfinished requests.
IN_FLIGHT = "vllm:num_requests_unfinished"
PROMPT = "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n"
EXTRAS = (
    "return_finish_reason",
    "return_cumulative_logprob",
    "return_logprobs",
    "return_num_input_tokens",
    "return_num_output_tokens",
)
OUTPUTS = ("text_output", "finish_reason", "cumulative_logprob", "logprobs", "num_input_tokens", "num_output_tokens")


# -- the vLLM backend's contract, over Triton's gRPC API ---------------------------------------------
def _tensor(name: str, values: list, dtype: Any) -> InferInput:
    array = np.array(values, dtype=dtype)
    tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    return tensor


async def infer(
    triton: TritonServer,
    sampling: dict | str,
    *,
    stream: bool,
    exclude_input: bool | None = True,
    extras: tuple[str, ...] = (),
    outputs: tuple[str, ...] = ("text_output",),
    prompt: str = PROMPT,
) -> list[dict[str, Any]]:
    """One request on a ModelStreamInfer stream: each response's outputs (and ``final``), or ``error``."""
    text = sampling if isinstance(sampling, str) else json.dumps(sampling)
    inputs = [
        _tensor("text_input", [prompt.encode()], np.object_),
        _tensor("stream", [stream], np.bool_),
        _tensor("sampling_parameters", [text.encode()], np.object_),
        *(_tensor(flag, [True], np.bool_) for flag in extras),
    ]
    if exclude_input is not None:
        inputs.append(_tensor("exclude_input_in_output", [exclude_input], np.bool_))
    request = {"model_name": MODEL, "inputs": inputs, "outputs": [InferRequestedOutput(o) for o in outputs]}

    async def one() -> AsyncIterator[dict]:
        yield request

    responses = []
    async with InferenceServerClient(triton.grpc_target) as client:
        async for result, error in client.stream_infer(inputs_iterator=one(), stream_timeout=120):
            if error is not None:
                return [*responses, {"error": error.message()}]
            final = result.get_response().parameters["triton_final_response"].bool_param
            responses.append({name: result.as_numpy(name) for name in outputs} | {"final": final})
            if final:
                return responses
    raise AssertionError("the stream ended without a final response")


async def test_a_non_streamed_request_gets_one_final_response_with_every_output_asked_for(triton):
    (response,) = await infer(
        triton, {"max_tokens": 6, "temperature": 0, "logprobs": 2}, stream=False, extras=EXTRAS, outputs=OUTPUTS
    )
    assert response["final"]
    assert response["finish_reason"].tolist() == [b"length"]
    assert response["num_output_tokens"].tolist() == [6] and response["num_input_tokens"].tolist() == [13]
    positions = json.loads(response["logprobs"][0])
    assert len(positions) == 6
    sampled = [next(iter(position.values())) for position in positions]  # the sampled token comes first
    assert "".join(entry["decoded_token"] for entry in sampled) == response["text_output"][0].decode()
    assert all(entry["rank"] == 1 for entry in sampled)  # greedy
    assert all(1 <= len(position) <= 3 for position in positions)  # the sampled one, and the top 2
    cumulative = float(response["cumulative_logprob"][0])
    assert math.isclose(cumulative, sum(entry["logprob"] for entry in sampled), rel_tol=1e-4)


async def test_a_streamed_request_sends_deltas_then_a_final_one(triton):
    sampling = {"max_tokens": 8, "temperature": 0, "logprobs": 0}
    whole = (await infer(triton, sampling, stream=False))[0]["text_output"][0].decode()
    responses = await infer(triton, sampling, stream=True, extras=EXTRAS, outputs=OUTPUTS)
    assert [r["final"] for r in responses] == [False] * (len(responses) - 1) + [True]
    assert "".join(r["text_output"][0].decode() for r in responses) == whole
    # Each response carries what is new since the last: one token each here, never re-sent.
    assert sum(int(r["num_output_tokens"][0]) for r in responses) == 8
    assert sum(len(json.loads(r["logprobs"][0])) for r in responses) == 8
    assert [r["finish_reason"][0] for r in responses] == [b"None"] * (len(responses) - 1) + [b"length"]


async def test_the_prompt_is_echoed_unless_excluded(triton):
    sampling = {"max_tokens": 4, "temperature": 0}
    (echoed,) = await infer(triton, sampling, stream=False, exclude_input=False)
    (plain,) = await infer(triton, sampling, stream=False, exclude_input=None)  # the default: echoed
    (excluded,) = await infer(triton, sampling, stream=False, exclude_input=True)
    generated = excluded["text_output"][0].decode()
    assert echoed["text_output"][0].decode() == plain["text_output"][0].decode() == PROMPT + generated


@pytest.mark.parametrize(
    ("sampling", "stream", "exclude_input", "wording"),
    [
        ("{not json", True, True, "sampling_parameters is not valid JSON"),
        ({"max_tokens": 4, "no_such_field": 1}, True, True, "Unexpected keyword argument 'no_such_field'"),
        ({"max_tokens": 4, "top_p": 0}, True, True, "(parameter=top_p"),
        ({"max_tokens": 4}, True, False, "When streaming, `exclude_input_in_output` = False is not allowed."),
        ({"max_tokens": 4, "lora_name": "x"}, False, True, "LoRA feature is not enabled."),
    ],
)
async def test_a_bad_request_is_refused_in_band_and_ends_the_request(triton, sampling, stream, exclude_input, wording):
    responses = await infer(triton, sampling, stream=stream, exclude_input=exclude_input)
    assert responses == [{"error": responses[-1]["error"]}]
    assert responses[0]["error"].startswith("Error generating stream: ") and wording in responses[0]["error"]


@pytest.mark.parametrize(
    ("guide", "allowed"),
    [({"choice": ["apple", "pear"]}, {"apple", "pear"}), ({"regex": "[0-9]{3}"}, None)],
)
async def test_structured_outputs_constrain_the_text(triton, guide, allowed):
    # A JSON string inside the JSON: vLLM's StructuredOutputsParams.
    sampling = {"max_tokens": 8, "temperature": 0, "structured_outputs": json.dumps(guide)}
    (response,) = await infer(triton, sampling, stream=False)
    text = response["text_output"][0].decode()
    assert text in allowed if allowed else (len(text) == 3 and text.isdigit())


async def test_string_valued_sampling_parameters_are_converted(triton):
    # Upstream's own samples send numbers as strings.
    (as_strings,) = await infer(triton, {"max_tokens": "4", "temperature": "0"}, stream=False)
    (as_numbers,) = await infer(triton, {"max_tokens": 4, "temperature": 0}, stream=False)
    assert as_strings["text_output"].tolist() == as_numbers["text_output"].tolist()


# -- the adapter class, against the real server ---------------------------------------------------
def chat(text: str, max_tokens: int = 16, **fields) -> text_pb2.GenerateRequest:
    message = text_pb2.ChatMessage(role="user", content=[text_pb2.ContentPart(text=text)])
    sampling = text_pb2.SamplingParams(max_tokens=max_tokens, temperature=0)
    return text_pb2.GenerateRequest(
        model=TEXT_MODEL, chat=text_pb2.ChatInput(messages=[message]), sampling=sampling, **fields
    )


def settings(address: str, model: str = MODEL, flavor: str = "vllm") -> TritonSettings:
    return TritonSettings(
        engine="triton", upstream_url=address, upstream_model=model, triton_flavor=flavor, context_length=2048
    )


@pytest.fixture(scope="module")
async def engine(triton):
    engine = TritonEngine(settings(triton.grpc_target))
    yield engine
    await engine.close()


async def collected(stream) -> list:
    return [event async for event in stream if not isinstance(event, Progress)]


async def test_adapter_streams_deltas_then_usage_counted_like_the_backend(engine, triton):
    events = await collected(engine.stream(chat("What is the capital of France?", max_tokens=24)))
    deltas, usage = events[:-1], events[-1]
    assert isinstance(usage, common_pb2.Usage) and all(isinstance(d, text_pb2.ChoiceDelta) for d in deltas)
    assert len([d for d in deltas if d.text]) >= 2 and "Paris" in "".join(d.text for d in deltas)
    assert 0 < usage.completion_tokens <= 24 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_adapter_counts_tokens_as_the_backend_does(engine, triton):
    # A legacy completion sends the prompt as it is: the backend's own counts of the same request.
    request = text_pb2.GenerateRequest(
        model=TEXT_MODEL,
        completion=text_pb2.CompletionInput(prompt=PROMPT),
        sampling=text_pb2.SamplingParams(max_tokens=12, temperature=0),
    )
    events = await collected(engine.stream(request))
    text, usage = "".join(e.text for e in events[:-1]), events[-1]
    (response,) = await infer(
        triton,
        {"max_tokens": 12, "temperature": 0},
        stream=False,
        extras=("return_num_input_tokens", "return_num_output_tokens"),
        outputs=("text_output", "num_input_tokens", "num_output_tokens"),
    )
    assert text == response["text_output"][0].decode()
    assert usage.prompt_tokens == int(response["num_input_tokens"][0])
    assert usage.completion_tokens == int(response["num_output_tokens"][0])


async def test_adapter_max_tokens_reached_is_length(engine):
    events = await collected(engine.stream(chat("Count from one to one hundred.", max_tokens=5)))
    assert events[-2].finish_reason == text_pb2.FINISH_REASON_LENGTH and events[-1].completion_tokens == 5


async def test_adapter_logprobs_come_with_each_delta(engine):
    async with text_service(engine) as stub:
        stream = stub.GenerateStream(chat("Name a fruit.", max_tokens=8, logprobs=True, top_logprobs=3))
        deltas = [delta async for message in stream for delta in message.deltas]
    scored = [lp for delta in deltas for lp in delta.logprobs]
    assert len(scored) == 8 and "".join(lp.token for lp in scored) == "".join(d.text for d in deltas)
    for lp in scored:
        assert len(lp.top_logprobs) == 3 and lp.token_bytes == lp.token.encode()
        assert (lp.top_logprobs[0].token, lp.top_logprobs[0].logprob) == (lp.token, lp.logprob)  # greedy
        assert sum(math.exp(t.logprob) for t in lp.top_logprobs) <= 1.0 + 1e-6


async def test_adapter_forced_tool_call_is_schema_valid(engine):
    tool = text_pb2.Tool(
        name="get_weather",
        description=WEATHER_TOOL["function"]["description"],
        parameters_json=json.dumps(WEATHER_TOOL["function"]["parameters"]),
    )
    request = chat(
        "What is the weather in Paris?",
        max_tokens=64,
        tools=[tool],
        tool_choice=text_pb2.ToolChoice(mode=text_pb2.ToolChoice.MODE_REQUIRED),
    )
    async with text_service(engine) as stub:
        response = await stub.Generate(request, timeout=120)
    (choice,) = response.choices
    assert choice.finish_reason == text_pb2.FINISH_REASON_TOOL_CALLS
    (call,) = choice.tool_calls
    jsonschema.validate(json.loads(call.arguments), WEATHER_TOOL["function"]["parameters"])


async def test_adapter_vllm_refusal_is_invalid_argument_naming_the_parameter(engine):
    request = chat("Hi", max_tokens=4)
    request.sampling.top_p = 0  # OpenAI's range allows it; vLLM's SamplingParams do not
    with pytest.raises(ServiceError) as caught:
        await collected(engine.stream(request))
    assert caught.value.status == grpc.StatusCode.INVALID_ARGUMENT and caught.value.param == "top_p"


async def test_adapter_flavor_mismatch_is_a_server_error_naming_the_input(triton):
    # A TRT-LLM layout sent to a vLLM-backend model: Triton refuses the inputs (in-band, by name).
    engine = TritonEngine(settings(triton.grpc_target, flavor="trtllm"))
    try:
        with pytest.raises(ServiceError) as caught:
            await collected(engine.stream(chat("Hi")))
        # Real Triton names one of the unexpected inputs, not necessarily the first sent (the stand-in's).
        assert caught.value.status == grpc.StatusCode.INTERNAL
        assert "unexpected inference input" in caught.value.message
    finally:
        await engine.close()


async def test_adapter_unknown_model_is_unavailable_and_not_ready(triton, engine):
    missing = TritonEngine(settings(triton.grpc_target, model="no-such-model"))
    try:
        assert await engine.ready() is True and await missing.ready() is False
        with pytest.raises(ServiceError) as caught:
            await collected(missing.stream(chat("Hi")))
        assert caught.value.status == grpc.StatusCode.UNAVAILABLE and "no-such-model" in caught.value.message
    finally:
        await missing.close()


# -- through the edge, with the openai SDK -----------------------------------------------------------
@pytest.fixture(scope="module")
def stack(triton, tmp_path_factory):
    running = start_stack(tmp_path_factory.mktemp("triton-text-stack"), [example_model(TEXT_MODEL, triton)], DEV_KEY)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=DEV_KEY, max_retries=0, timeout=300)


def test_chat_stream_with_usage(client):
    stream = client.chat.completions.create(
        model=TEXT_MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text and chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage.prompt_tokens > 10 and 0 < usage.completion_tokens <= 24
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons in (["stop"], ["length"])


def test_required_tool_choice_is_one_schema_valid_call(client):
    completion = client.chat.completions.create(
        model=TEXT_MODEL,
        messages=[{"role": "user", "content": "What's the weather in Paris, in celsius?"}],
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice="required",
        temperature=0,
        max_tokens=96,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    tool = {"get_weather": WEATHER_TOOL, "get_time": TIME_TOOL}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_named_tool_choice_calls_that_tool_with_valid_arguments(client):
    completion = client.chat.completions.create(
        model=TEXT_MODEL,
        messages=[{"role": "user", "content": "Weather in Rome?"}],
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0,
        max_tokens=64,
    )
    (call,) = completion.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), TIME_TOOL["function"]["parameters"])


def test_json_schema_response_format(client):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "sunny": {"type": "boolean"}},
        "required": ["city", "sunny"],
        "additionalProperties": False,
    }
    completion = client.chat.completions.create(
        model=TEXT_MODEL,
        messages=[{"role": "user", "content": "Is it sunny in Paris? Answer as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema, "strict": True}},
        temperature=0,
        max_tokens=64,
    )
    jsonschema.validate(json.loads(completion.choices[0].message.content), schema)


def test_logprobs_and_top_logprobs(client):
    completion = client.chat.completions.create(
        model=TEXT_MODEL,
        messages=[{"role": "user", "content": "Name a fruit."}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    choice = completion.choices[0]
    entries = choice.logprobs.content
    assert len(entries) == completion.usage.completion_tokens
    assert "".join(e.token for e in entries) == choice.message.content
    for entry in entries:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token  # greedy
        assert entry.logprob <= 0 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_stop_ends_generation_before_the_stop_text(client):
    completion = client.chat.completions.create(
        model=TEXT_MODEL,
        messages=[{"role": "user", "content": "Count from 1 to 20 separated by commas."}],
        max_tokens=60,
        temperature=0,
        stop=["5"],
    )
    content = completion.choices[0].message.content
    assert "4" in content and "5" not in content
    assert completion.choices[0].finish_reason == "stop" and completion.usage.completion_tokens < 60


def test_seed_reaches_vllm(client):
    ask = dict(
        model=TEXT_MODEL, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=16, temperature=1.0
    )
    # vLLM seeds a generator per request: the same seed samples the same tokens, whatever ran before.
    first = client.chat.completions.create(**ask, seed=1234).choices[0].message.content
    assert client.chat.completions.create(**ask, seed=1234).choices[0].message.content == first
    assert client.chat.completions.create(**ask, seed=99).choices[0].message.content != first


def test_n_returns_independent_choices(client):
    completion = client.chat.completions.create(
        model=TEXT_MODEL,
        messages=[{"role": "user", "content": "Say a word."}],
        max_tokens=6,
        n=3,
        temperature=0,
    )
    assert [c.index for c in completion.choices] == [0, 1, 2]
    # Each choice is its own Triton request; greedy, they agree, and usage counts all three.
    assert len({c.message.content for c in completion.choices}) == 1 and completion.choices[0].message.content
    assert completion.usage.completion_tokens % 3 == 0 and completion.usage.completion_tokens <= 18


def test_a_parameter_vllm_refuses_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=TEXT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, top_p=0
        )
    assert caught.value.status_code == 400 and caught.value.body["param"] == "top_p"


def test_client_disconnect_cancels_the_triton_request(client, triton):
    wait_until(lambda: triton.metric(IN_FLIGHT, MODEL) == 0, 60)  # idle before the test
    stream = client.chat.completions.create(
        model=TEXT_MODEL,
        messages=[{"role": "user", "content": "Count from 1 to 1000, separated by commas."}],
        max_tokens=1500,
        temperature=0,
        stream=True,
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert triton.metric(IN_FLIGHT, MODEL) == 1
    stream.close()
    # The edge cancels the backend's call, the adapter cancels its Triton stream, the backend aborts vLLM's request.
    wait_until(lambda: triton.metric(IN_FLIGHT, MODEL) == 0, 30)
    wait_until(lambda: triton.metric("nv_inference_pending_request_count", MODEL) == 0, 30)


def _state(triton: TritonServer) -> str:
    index = httpx.post(f"{triton.http_url}/v2/repository/index", timeout=10).json()
    return next(entry.get("state", "") for entry in index if entry["name"] == MODEL)


def test_model_unloaded_is_a_503_then_served_again_once_loaded(client, triton):
    # Runs last, after every kind of request above (refusals, cancellations...): none of them may keep
    # Triton from unloading the model (a cancelled call that Triton never completes does).
    ask = dict(model=TEXT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    triton.unload(MODEL)
    wait_until(lambda: _state(triton) == "UNAVAILABLE", 120)  # unloaded, not stuck UNLOADING
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(**ask)
        assert caught.value.status_code == 503
    finally:
        triton.load(MODEL)  # blocks until loaded: vLLM starts again (its compile cached)
    # The text backend's health check sees it back within its probe interval; until then, 503s.
    assert wait_until(lambda: _answered(client, ask), 60).choices[0].message.content


def _answered(client: openai.OpenAI, ask: dict):
    try:
        return client.chat.completions.create(**ask)
    except openai.InternalServerError as exc:
        if exc.status_code != 503:
            raise
        return None
