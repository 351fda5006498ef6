"""Chat completions through edge -> text backend -> llama.cpp, with the openai SDK."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.support.openapi import validate

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]},
    },
}


def test_chat_returns_a_real_answer_that_matches_openais_schema(client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0.2,
        seed=7,
    )
    assert raw.headers["x-request-id"]
    completion = raw.parse()
    validate(json.loads(raw.text), "CreateChatCompletionResponse")
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert completion.model == MODEL
    usage = completion.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # Reported as a number, and never the whole prompt: at least one token is evaluated for the first
    # logits (the engine's reuse stops one short). `>= 0` alone held for any value, even a missing one.
    cached = usage.prompt_tokens_details.cached_tokens
    assert isinstance(cached, int) and 0 <= cached < usage.prompt_tokens
    extra = json.loads(raw.text)["usage"]
    assert extra["cache_read_input_tokens"] == usage.prompt_tokens_details.cached_tokens
    assert extra["cache_read_input_tokens"] + extra["cache_creation_input_tokens"] == usage.prompt_tokens


def test_alias_resolves_to_the_canonical_model(client):
    completion = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert completion.model == MODEL


def test_repeating_a_prompt_reuses_the_prefix_cache(client):
    messages = [{"role": "system", "content": "You are terse. " * 20}, {"role": "user", "content": "Name a color."}]
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    assert again.usage.prompt_tokens_details.cached_tokens > 50


def test_seed_makes_sampling_repeatable(client):
    # Like OpenAI's, the seed is best effort: a prompt evaluated from the prefix
    # cache can get slightly different logits than one evaluated whole. So the
    # compared runs find the cache in the same state, by construction: the exact
    # prompt is evaluated once first (vLLM's block cache then serves both runs from
    # it; on a fresh clone the first run had evaluated it whole and the second from
    # the cache), and each run follows the same other request (llama.cpp's slot
    # reuses the longest cached prefix, which that request leaves the same).
    other = dict(model=MODEL, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=2)
    ask = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=16,
        temperature=1.0,
        seed=1234,
    )
    client.chat.completions.create(**ask)  # the prompt's prefix, cached before either compared run
    runs = []
    for _ in range(2):
        client.chat.completions.create(**other)
        runs.append(client.chat.completions.create(**ask).choices[0].message.content)
    assert runs[0] == runs[1]
    client.chat.completions.create(**other)
    assert client.chat.completions.create(**{**ask, "seed": 99}).choices[0].message.content != runs[0]


def test_stop_sequence_ends_generation(client):
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count from 1 to 20 separated by commas."}],
        max_tokens=60,
        temperature=0,
        stop=["5"],
    )
    content = completion.choices[0].message.content
    assert "4" in content and "5" not in content  # it counted, and stopped where told
    assert completion.choices[0].finish_reason == "stop" and completion.usage.completion_tokens < 60


def test_n_returns_several_choices(client):
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say a word."}], max_tokens=6, n=2, seed=3
    )
    assert [c.index for c in completion.choices] == [0, 1]
    assert all(c.message.content for c in completion.choices)


def test_stream_ends_with_a_usage_chunk(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write one sentence about the sea."}],
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    for chunk in chunks:
        validate(chunk.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, stream=True
        )
    )
    assert chunks and all(c.choices and c.usage is None for c in chunks)
    assert len([c for c in chunks if c.choices[0].finish_reason]) == 1


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_call_has_parseable_arguments(client, tool_choice):
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What's the weather in Paris in celsius?"}],
        tools=[WEATHER_TOOL, TIME_TOOL] if tool_choice == "required" else [WEATHER_TOOL],
        tool_choice=tool_choice,
        max_tokens=60,
        temperature=0,  # greedy: sampled, a 135M model may ramble past the bound mid-string
    )
    validate(completion.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    schema = {"get_weather": WEATHER_TOOL, "get_time": TIME_TOOL}[call.function.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_tool_call_streams_like_openai(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Oslo, in fahrenheit?"}],
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_tokens=100,
        temperature=0,  # greedy: a sampled 135M model may ramble past the bound mid-argument
        stream=True,
    )
    fragments = [tc for chunk in stream if chunk.choices for tc in (chunk.choices[0].delta.tool_calls or [])]
    assert fragments[0].id and fragments[0].function.name == "get_weather" and fragments[0].type == "function"
    assert all(f.id is None and f.function.name is None for f in fragments[1:])
    assert len(fragments) > 2  # the arguments arrive in pieces
    arguments = "".join(f.function.arguments or "" for f in fragments)
    jsonschema.validate(json.loads(arguments), WEATHER_TOOL["function"]["parameters"])


def test_tool_choice_auto_returns_text_or_a_valid_call(client):
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What's the weather in Rome? Use the tool."}],
        tools=[WEATHER_TOOL],
        max_tokens=60,
        temperature=0,
    )
    message = completion.choices[0].message
    assert "<tool_call>" not in (message.content or "")  # a call is never leaked as text
    if message.tool_calls:
        assert completion.choices[0].finish_reason == "tool_calls"
        jsonschema.validate(
            json.loads(message.tool_calls[0].function.arguments), WEATHER_TOOL["function"]["parameters"]
        )
    else:
        assert message.content


def test_tool_results_can_be_sent_back(client):
    completion = client.chat.completions.create(
        model=MODEL,
        max_tokens=20,
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
        ],
        tools=[WEATHER_TOOL],
        tool_choice="none",
    )
    assert completion.choices[0].message.content
    assert completion.choices[0].message.tool_calls is None


def test_json_schema_output_validates(client):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        },
        "required": ["name", "age", "hobbies"],
        "additionalProperties": False,
    }
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Invent a person."}],
        max_tokens=200,
        temperature=0,  # greedy: sampled, a 135M model may ramble past the bound mid-string
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}},
    )
    data = json.loads(completion.choices[0].message.content)
    jsonschema.validate(data, schema)
    assert list(data) == ["name", "age", "hobbies"]  # keys come in schema order


def test_json_object_output_parses(client):
    completion = client.chat.completions.create(
        model=MODEL,
        max_tokens=300,
        temperature=0,
        response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Return a JSON object with the keys name and color of a cat."}],
    )
    assert completion.choices[0].finish_reason == "stop"  # the grammar closed the object
    assert isinstance(json.loads(completion.choices[0].message.content), dict)


def test_sdk_structured_output_parse_helper(client):
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        country: str

    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Name a city."}],
        response_format=City,
        max_tokens=60,
        temperature=0,  # greedy: sampled, a 135M model may ramble past the bound mid-string
    )
    assert isinstance(completion.choices[0].message.parsed, City)


async def test_async_client_streams_concurrently(aclient):
    import asyncio

    async def ask(word: str) -> str:
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Say {word}."}], max_tokens=8, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    answers = await asyncio.gather(*(ask(w) for w in ("red", "green", "blue")))
    assert all(a.strip() for a in answers)


def test_json_schema_falls_back_to_json_object_on_a_model_without_schema_support(client):
    # "chat-only" lists only `chat`: the schema cannot be enforced, a JSON object still is.
    completion = client.chat.completions.create(
        model="chat-only",
        max_tokens=300,
        temperature=0,
        messages=[{"role": "user", "content": "Return a JSON object with the keys name and color of a cat."}],
        response_format={"type": "json_schema", "json_schema": {"name": "dog", "schema": {"type": "object"}}},
    )
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(completion.choices[0].message.content), dict)


def test_max_completion_tokens_bounds_the_answer_as_max_tokens_does(client):
    story = [{"role": "user", "content": "Tell me a very long story about a lighthouse keeper."}]
    completion = client.chat.completions.create(model=MODEL, messages=story, max_completion_tokens=5, temperature=0)
    assert completion.usage.completion_tokens == 5
    assert completion.choices[0].finish_reason == "length"


def test_penalties_make_a_repetitive_answer_less_repetitive_and_are_bounded(client):
    echo = [{"role": "user", "content": "Write the word 'apple' twenty times, separated by spaces."}]

    def tokens(**penalties) -> list[str]:
        completion = client.chat.completions.create(
            model=MODEL, messages=echo, max_tokens=24, temperature=0, logprobs=True, **penalties
        )
        return [entry.token for entry in completion.choices[0].logprobs.content]

    def distinct_share(generated: list[str]) -> float:
        return len(set(generated)) / max(1, len(generated))

    plain = tokens()
    # The penalties act on the generated tokens themselves: a frequency penalty lowers a token's logit by
    # 2.0 for each time it was generated, so greedy decoding repeats fewer of them; a presence penalty is one
    # flat step per token seen (a small model's peaked logits can outweigh it): it changes the answer.
    less_repetitive = tokens(frequency_penalty=2.0)
    assert distinct_share(less_repetitive) > distinct_share(plain), (plain, less_repetitive)
    assert tokens(presence_penalty=2.0) != plain
    with pytest.raises(openai.BadRequestError) as refused:
        tokens(frequency_penalty=2.5)
    assert refused.value.body["param"] == "frequency_penalty"
