"""Hostile JSON schemas and tools, through HTTP: a 400 naming the parameter, then the API still answers."""

from __future__ import annotations

import time

import openai
import pytest

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
HELLO = [{"role": "user", "content": "Hello"}]
BOUND_S = 20.0


def string_property(pattern: str) -> dict:
    return {"type": "object", "properties": {"x": {"type": "string", "pattern": pattern}}, "required": ["x"]}


def ref_chain(hops: int) -> dict:
    defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(hops)}
    return {"$ref": "#/$defs/d0", "$defs": {**defs, f"d{hops}": {"type": "string"}}}


def nested(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


SCHEMAS = {
    "crash: a{0,2000}": string_property("^a{0,2000}$"),
    "crash: maxLength 100000": {"type": "string", "maxLength": 100000},
    "freeze: (a|aa)*{1000}": string_property("^(a|aa)*{1000}b$"),
    "huge enum": {"enum": list(range(5000))},
    "deep $ref chain": ref_chain(500),
    "anyOf explosion": {
        "allOf": [
            {"anyOf": [{"type": "object", "properties": {f"k{g}{w}": {"type": "integer"}}} for w in range(8)]}
            for g in range(40)
        ]
    },
    "deep nesting": nested(40),
}


def assert_still_answers(client: openai.OpenAI) -> None:
    started = time.perf_counter()
    completion = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5)
    assert completion.choices[0].message.content is not None
    assert time.perf_counter() - started < BOUND_S


@pytest.mark.parametrize("schema", SCHEMAS.values(), ids=SCHEMAS.keys())
def test_hostile_response_format_is_a_400(client, schema):
    started = time.perf_counter()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "evil", "schema": schema}},
        )
    assert time.perf_counter() - started < BOUND_S
    assert caught.value.param == "response_format.json_schema.schema"
    assert_still_answers(client)


def test_a_hostile_tool_is_a_400_naming_it(client):
    tools = [
        {"type": "function", "function": {"name": "fine", "parameters": {"type": "object", "properties": {}}}},
        {"type": "function", "function": {"name": "evil", "parameters": string_property("^(a|aa)*{1000}b$")}},
    ]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, tools=tools)
    assert caught.value.param == "tools[1].function.parameters"
    assert_still_answers(client)
