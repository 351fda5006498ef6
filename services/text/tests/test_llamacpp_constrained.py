"""Constrained decoding through the llama.cpp adapter, with the real SmolLM2 model."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import jsonschema
import pytest

from modelplex.v1 import catalog_pb2, text_pb2
from modelplex_kit.errors import ServiceError
from modelplex_text.adapters.llamacpp import LlamaCppEngine
from modelplex_text.servicer import check, merge_delta
from modelplex_text.settings import LlamaCppSettings

# A loaded model: kept out of `make test-fast`.
pytestmark = pytest.mark.integration

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
TIME = {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer"},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["name", "age", "hobbies"],
}


@pytest.fixture(scope="module")
def engine():
    engine = LlamaCppEngine(LlamaCppSettings(context_length=2048, max_queue=4))
    yield engine
    asyncio.run(engine.close())


def chat(text: str, *, max_tokens: int = 80, seed: int = 7, **fields) -> text_pb2.GenerateRequest:
    message = text_pb2.ChatMessage(role="user", content=[text_pb2.ContentPart(text=text)])
    request = text_pb2.GenerateRequest(chat=text_pb2.ChatInput(messages=[message]), **fields)
    request.sampling.max_tokens = max_tokens
    request.sampling.seed = seed
    return request


def json_schema(schema: dict) -> text_pb2.ResponseFormat:
    return text_pb2.ResponseFormat(type=text_pb2.ResponseFormat.TYPE_JSON_SCHEMA, schema_json=json.dumps(schema))


def tool(name: str, parameters: dict) -> text_pb2.Tool:
    return text_pb2.Tool(name=name, parameters_json=json.dumps(parameters))


async def generate(engine: LlamaCppEngine, request: text_pb2.GenerateRequest) -> text_pb2.Choice:
    """What the servicer does for one choice: the checks, then the engine's events merged."""
    await check(request, catalog_pb2.Capabilities(text=engine.capabilities))
    choice = text_pb2.Choice(index=0)
    async for event in engine.stream(request, incremental=False):
        if isinstance(event, text_pb2.ChoiceDelta):  # not the Usage, nor the running Progress
            merge_delta(choice, event)
    return choice


async def test_json_schema_output_is_valid_with_keys_in_schema_order(engine):
    for seed in (1, 2, 3):
        choice = await generate(engine, chat("Invent a person.", seed=seed, response_format=json_schema(PERSON)))
        data = json.loads(choice.text)
        jsonschema.validate(data, PERSON)
        assert list(data) == ["name", "age", "hobbies"]
        assert choice.finish_reason == text_pb2.FINISH_REASON_STOP


@pytest.mark.parametrize("seed", [1, 2])
async def test_a_forced_call_is_a_valid_call_to_one_of_the_tools(engine, seed):
    request = chat(
        "What's the weather in Paris in celsius?",
        seed=seed,
        tools=[tool("get_weather", WEATHER), tool("get_time", TIME)],
        tool_choice=text_pb2.ToolChoice(mode=text_pb2.ToolChoice.MODE_REQUIRED),
    )
    choice = await generate(engine, request)
    assert choice.finish_reason == text_pb2.FINISH_REASON_TOOL_CALLS
    call = choice.tool_calls[0]
    jsonschema.validate(json.loads(call.arguments), {"get_weather": WEATHER, "get_time": TIME}[call.name])


async def test_auto_tool_choice_gives_prose_or_a_valid_call(engine):
    for seed in (1, 2):
        request = chat("What's the weather in Rome? Use the tool.", seed=seed, tools=[tool("get_weather", WEATHER)])
        choice = await generate(engine, request)
        if choice.tool_calls:
            jsonschema.validate(json.loads(choice.tool_calls[0].arguments), WEATHER)
        else:
            assert choice.text and not choice.text.startswith("<")


async def test_json_object_output_is_an_object(engine):
    fmt = text_pb2.ResponseFormat(type=text_pb2.ResponseFormat.TYPE_JSON_OBJECT)
    finished = 0
    for seed in (1, 2, 3):
        request = chat("A cat as JSON with name and color.", seed=seed, max_tokens=300, response_format=fmt)
        choice = await generate(engine, request)
        assert choice.text.lstrip().startswith("{")
        if choice.finish_reason == text_pb2.FINISH_REASON_STOP:  # a length cut may end mid-object
            assert isinstance(json.loads(choice.text), dict)
            finished += 1
    assert finished >= 1


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"x": {"type": "string", "pattern": "^a{0,2000}$"}}, "required": ["x"]},
        {"type": "string", "maxLength": 100000},
        {"type": "object", "properties": {"x": {"type": "string", "pattern": "^(a|aa)*{1000}b$"}}, "required": ["x"]},
    ],
    ids=["crash", "crash-maxlength", "freeze"],
)
async def test_the_issues_schemas_are_a_400_and_the_engine_still_answers(engine, schema):
    with pytest.raises(ServiceError) as caught:
        await generate(engine, chat("hi", response_format=json_schema(schema)))
    assert caught.value.status == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.param == "response_format.json_schema.schema"
    started = time.perf_counter()
    choice = await generate(engine, chat("Say hi.", max_tokens=8))
    assert choice.text and time.perf_counter() - started < 30


async def test_a_pathological_pattern_within_the_limits_generates_in_bounded_time(engine):
    # (a+)+$ made llama.cpp's grammar code raise; llguidance enforces it like any regex.
    schema = {"type": "object", "properties": {"x": {"type": "string", "pattern": "^(a+)+$"}}, "required": ["x"]}
    started = time.perf_counter()
    choice = await generate(engine, chat("Write some a's.", max_tokens=20, response_format=json_schema(schema)))
    assert time.perf_counter() - started < 30
    if choice.finish_reason == text_pb2.FINISH_REASON_STOP:
        jsonschema.validate(json.loads(choice.text), schema)
    else:  # ran out of tokens inside the string: still only a's
        assert choice.text.startswith('{"x": "') and set(choice.text[len('{"x": "') :]) <= {"a"}


async def test_a_mask_over_its_budget_ends_the_request_with_a_400_not_a_hang(engine):
    # Within the stated limits, but llguidance runs out of fuel building its lexer mid-generation.
    schema = {"type": "string", "pattern": "^(a|aa){256}$"}
    started = time.perf_counter()
    with pytest.raises(ServiceError) as caught:
        await generate(engine, chat("Write a's.", max_tokens=30, response_format=json_schema(schema)))
    assert time.perf_counter() - started < 30
    assert caught.value.status == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.param == "response_format.json_schema.schema"
    assert "too complex" in caught.value.message
    choice = await generate(engine, chat("Say hi.", max_tokens=8))
    assert choice.text
