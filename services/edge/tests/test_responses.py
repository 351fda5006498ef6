"""POST /v1/responses and stored responses, through the official SDK, over a scripted text backend
(tests/support/scripted_text.py): every body and streamed event validated against OpenAI's spec."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.support.openapi import validate, validate_event
from tests.support.scripted_text import scripted_edge

KEY = "sk-responses-test"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
async def edge():
    async with scripted_edge(dev_api_key=KEY) as running:
        yield running


@pytest.fixture
def client(edge) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=edge.base_url, api_key=KEY, max_retries=0)


def raw(edge) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=edge.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)


def _valid(response) -> dict:
    body = response.model_dump(mode="json", exclude_unset=True, by_alias=True)
    validate(body, "Response")
    return body


async def create(client: openai.AsyncOpenAI, **kwargs):
    """responses.create, with the body as sent validated against the spec (not the SDK's reading of it)."""
    raw_response = await client.responses.with_raw_response.create(**kwargs)
    validate(raw_response.http_response.json(), "Response")
    return raw_response.parse()


async def test_string_input_answers_with_a_valid_response_and_output_text(client):
    response = await create(client, model="scripted", input="hello there", instructions="Be brief.")
    body = _valid(response)
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "completed" and response.output_text == "echo: hello there"
    assert body["instructions"] == "Be brief."
    assert response.usage.input_tokens > 0 and response.usage.output_tokens == 3
    assert response.usage.input_tokens_details.cached_tokens == 0


async def test_instructions_become_the_first_system_message(client, edge):
    await client.responses.create(model="scripted", input="hi", instructions="Be brief.")
    messages = edge.engine.requests[-1].chat.messages
    assert [m.role for m in messages] == ["system", "user"] and messages[0].content[0].text == "Be brief."


async def test_max_output_tokens_makes_the_response_incomplete(client):
    response = await client.responses.create(
        model="scripted",
        input="one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen",
        max_output_tokens=16,
    )
    _valid(response)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete" and response.max_output_tokens == 16


async def test_function_call_round_trip(client, edge):
    first = await client.responses.create(
        model="scripted", input="Weather in Paris?", tools=[WEATHER], tool_choice="required"
    )
    _valid(first)
    call = first.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments)
    assert call.id.startswith("fc_") and call.call_id
    second = await client.responses.create(
        model="scripted",
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        ],
        tools=[WEATHER],
    )
    _valid(second)
    assert second.output_text == "echo: sunny"
    sent = edge.engine.requests[-1].chat.messages
    assert [m.role for m in sent] == ["user", "assistant", "tool"]
    assert sent[1].tool_calls[0].id == call.call_id and sent[2].tool_call_id == call.call_id


async def test_streamed_events_are_ordered_numbered_and_name_stable_items(client):
    stream = await client.responses.create(model="scripted", input="stream me please", stream=True)
    events = [event.model_dump(mode="json", exclude_unset=True, by_alias=True) async for event in stream]
    for event in events:
        validate_event(event)
    kinds = [event["type"] for event in events]
    assert kinds[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    item_id = events[2]["item"]["id"]
    assert {event["item_id"] for event in events if "item_id" in event} == {item_id}
    final = events[-1]["response"]
    assert final["output"][0]["id"] == item_id and final["output"][0]["content"][0]["text"] == "echo: stream me please"
    assert events[2]["item"]["content"] == [] and events[3]["part"]["text"] == ""  # as they were then
    assert final["usage"]["output_tokens"] == 4


async def test_stream_helper_accumulates_the_final_response(client):
    async with client.responses.stream(model="scripted", input="helper test") as stream:
        deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == final.output_text == "echo: helper test"


async def test_streamed_function_call_arguments(client):
    stream = await client.responses.create(
        model="scripted",
        input="Weather?",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        stream=True,
    )
    events = [event.model_dump(mode="json", exclude_unset=True, by_alias=True) async for event in stream]
    for event in events:
        validate_event(event)
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert "".join(deltas) == done["arguments"] == '{"city": "Paris"}' and done["name"] == "get_weather"
    final = events[-1]["response"]
    assert final["output"][0]["id"] == done["item_id"] and final["output"][0]["arguments"] == done["arguments"]


async def test_a_stream_that_breaks_ends_with_error_then_failed(client):
    stream = await client.responses.create(model="scripted", input="please BREAK now", stream=True)
    events = [event.model_dump(mode="json", exclude_unset=True, by_alias=True) async for event in stream]
    for event in events:
        validate_event(event)
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-1]["response"]["status"] == "failed" and events[-1]["response"]["error"]["message"]


async def test_logprobs_are_requested_and_rendered(client, edge):
    response = await client.responses.create(
        model="scripted", input="a b", include=["message.output_text.logprobs"], top_logprobs=2
    )
    _valid(response)
    sent = edge.engine.requests[-1]
    assert sent.logprobs and sent.top_logprobs == 2
    logprobs = response.output[0].content[0].logprobs
    assert [lp.token for lp in logprobs] == ["echo:", " a", " b"] and len(logprobs[0].top_logprobs) == 2


async def test_image_parts_reach_a_vision_model_in_order(client, edge):
    image = "data:image/png;base64,iVBORw0KGgo="
    await client.responses.create(
        model="scripted",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is this?"},
                    {"type": "input_image", "image_url": image, "detail": "low"},
                ],
            }
        ],
    )
    parts = edge.engine.requests[-1].chat.messages[0].content
    assert parts[0].text == "What is this?" and (parts[1].image.url, parts[1].image.detail) == (image, "low")


async def test_json_schema_format_reaches_the_engine(client, edge):
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    response = await client.responses.create(
        model="scripted",
        input="x",
        text={"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}},
    )
    _valid(response)
    sent = edge.engine.requests[-1].response_format
    assert sent.schema_name == "person" and json.loads(sent.schema_json) == schema


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": [{"type": "web_search_call", "id": "x"}]}, "input[0].type"),
        ({"input": [{"role": "user", "content": "a"}, {"type": "item_reference", "id": "x"}]}, "input[1].type"),
        ({"input": [{"role": "user", "content": [{"type": "input_file"}]}]}, "input[0].content[0].type"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
        ({"input": [{"role": "wizard", "content": "a"}]}, "input[0].role"),
        ({"input": "a", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "a", "tools": [{"type": "file_search", "vector_store_ids": []}]}, "tools[0].type"),
        ({"input": "a", "tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "tools[0].type"),
        ({"input": "a", "reasoning": {"effort": "high"}}, "reasoning"),
        ({"input": "a", "include": ["file_search_call.results"]}, "include[0]"),
        ({"input": "a", "tool_choice": "required"}, "tool_choice"),
        ({"input": "a", "conversation": "conv_1"}, "conversation"),
        ({"input": "a", "frobnicate": 1}, "frobnicate"),
        ({"input": []}, "input"),
        ({"input": "a", "previous_response_id": "resp_unknown"}, "previous_response_id"),
    ],
)
async def test_bad_input_is_a_400_naming_the_param_and_never_reaches_the_engine(edge, body, param):
    before = len(edge.engine.requests)
    async with raw(edge) as http:
        response = await http.post("/responses", json={"model": "scripted", **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert len(edge.engine.requests) == before


async def test_input_beyond_the_context_is_a_400_naming_input(edge):
    async with raw(edge) as http:
        response = await http.post("/responses", json={"model": "scripted", "input": "word " * 5000})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "input"
    assert response.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,x"}]}]}, "input"),
        ({"tools": [WEATHER]}, "tools"),
    ],
)
async def test_what_a_model_cannot_do_is_a_400_in_responses_terms(edge, body, param):
    before = len(edge.engine.requests)
    async with raw(edge) as http:
        response = await http.post("/responses", json={"model": "plain", "input": "a", **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert len(edge.engine.requests) == before


async def test_wrong_key_is_401_and_unknown_model_404(edge):
    async with httpx.AsyncClient(base_url=edge.base_url, headers={"Authorization": "Bearer nope"}) as http:
        assert (await http.post("/responses", json={"model": "scripted", "input": "a"})).status_code == 401
    async with raw(edge) as http:
        response = await http.post("/responses", json={"model": "nope", "input": "a"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


# -- stored responses -----------------------------------------------------------------------------


async def test_stored_response_is_retrieved_listed_and_deleted(client):
    created = await client.responses.create(model="scripted", input=[{"role": "user", "content": "remember me"}])
    fetched = await client.responses.retrieve(created.id)
    assert _valid(fetched) == _valid(created)
    items = await client.responses.input_items.list(created.id)
    assert [item.content[0].text for item in items.data] == ["remember me"]
    validate(items.model_dump(mode="json", exclude_unset=True), "ResponseItemList")
    await client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(created.id)


async def test_previous_response_id_continues_without_carrying_instructions(client, edge):
    first = await client.responses.create(model="scripted", input="my name is Ada", instructions="Pirate voice.")
    second = await client.responses.create(model="scripted", input="what is my name?", previous_response_id=first.id)
    _valid(second)
    assert second.previous_response_id == first.id
    sent = edge.engine.requests[-1].chat.messages
    assert [(m.role, m.content[0].text) for m in sent] == [
        ("user", "my name is Ada"),
        ("assistant", "echo: my name is Ada"),
        ("user", "what is my name?"),
    ]


async def test_store_false_is_never_retrievable(client):
    created = await client.responses.create(model="scripted", input="forget me", store=False)
    assert created.store is False
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(created.id)


async def test_a_streamed_response_is_stored_with_its_final_state(client):
    stream = await client.responses.create(model="scripted", input="stored stream", stream=True)
    events = [event async for event in stream]
    final = events[-1].response
    fetched = await client.responses.retrieve(final.id)
    assert fetched.output_text == "echo: stored stream" and fetched.output[0].id == final.output[0].id


async def test_input_items_paginate_as_openai(client):
    created = await client.responses.create(
        model="scripted", input=[{"role": "user", "content": f"m{i}"} for i in range(5)]
    )
    page = await client.responses.input_items.list(created.id, limit=2, order="asc")
    assert [item.content[0].text for item in page.data] == ["m0", "m1"] and page.has_more
    rest = await client.responses.input_items.list(created.id, after=page.last_id, order="asc")
    assert [item.content[0].text for item in rest.data] == ["m2", "m3", "m4"] and not rest.has_more
    newest = await client.responses.input_items.list(created.id, limit=1)
    assert newest.data[0].content[0].text == "m4"


async def test_chains_beyond_the_depth_bound_are_refused():
    async with scripted_edge(dev_api_key=KEY, responses_max_chain_depth=2) as small:
        client = openai.AsyncOpenAI(base_url=small.base_url, api_key=KEY, max_retries=0)
        first = await client.responses.create(model="scripted", input="one")
        second = await client.responses.create(model="scripted", input="two", previous_response_id=first.id)
        before = len(small.engine.requests)
        with pytest.raises(openai.BadRequestError) as refused:
            await client.responses.create(model="scripted", input="three", previous_response_id=second.id)
        assert refused.value.body["param"] == "previous_response_id"
        assert len(small.engine.requests) == before


async def test_chains_beyond_the_token_bound_are_refused():
    async with scripted_edge(dev_api_key=KEY, responses_max_chain_tokens=1) as small:
        client = openai.AsyncOpenAI(base_url=small.base_url, api_key=KEY, max_retries=0)
        first = await client.responses.create(model="scripted", input="one")
        assert first.usage.total_tokens > 1
        before = len(small.engine.requests)
        with pytest.raises(openai.BadRequestError) as refused:
            await client.responses.create(model="scripted", input="two", previous_response_id=first.id)
        assert refused.value.body["param"] == "previous_response_id"
        assert f"its last turn used {first.usage.total_tokens} tokens" in refused.value.body["message"]
        assert len(small.engine.requests) == before  # refused before the engine is called
        # a conversation started anew is served
        assert (await client.responses.create(model="scripted", input="two")).output_text


async def test_stored_responses_are_visible_to_their_project_only(tmp_path, monkeypatch):
    from modelplex_gatekeeper.keys import KeyRecord, KeysFile

    keys = KeysFile()
    keys.add("sk-ada-1", KeyRecord(name="ada-1", hash="", project="alpha"))
    keys.add("sk-ada-2", KeyRecord(name="ada-2", hash="", project="alpha"))
    keys.add("sk-bob-1", KeyRecord(name="bob-1", hash="", project="beta"))
    keys.save(tmp_path / "keys.yaml")
    monkeypatch.setenv("MODELPLEX_KEYS_FILE", str(tmp_path / "keys.yaml"))
    monkeypatch.setenv("MODELPLEX_GATEKEEPER_USAGE_FILE", str(tmp_path / "usage.jsonl"))
    async with scripted_edge(gatekeeper_target="embedded") as gated:

        def as_key(key: str) -> openai.AsyncOpenAI:
            return openai.AsyncOpenAI(base_url=gated.base_url, api_key=key, max_retries=0)

        created = await as_key("sk-ada-1").responses.create(model="scripted", input="alpha's secret")
        same_project = as_key("sk-ada-2")
        assert (await same_project.responses.retrieve(created.id)).output_text == "echo: alpha's secret"
        await same_project.responses.create(model="scripted", input="more", previous_response_id=created.id)
        other = as_key("sk-bob-1")
        with pytest.raises(openai.NotFoundError):
            await other.responses.retrieve(created.id)
        with pytest.raises(openai.NotFoundError):
            await other.responses.input_items.list(created.id)
        with pytest.raises(openai.NotFoundError):
            await other.responses.delete(created.id)
        before = len(gated.engine.requests)
        with pytest.raises(openai.BadRequestError) as refused:
            await other.responses.create(model="scripted", input="steal", previous_response_id=created.id)
        assert refused.value.body["param"] == "previous_response_id" and len(gated.engine.requests) == before
        assert (await same_project.responses.retrieve(created.id)).id == created.id  # bob deleted nothing


async def test_truncation_auto_drops_the_oldest_turns_and_disabled_refuses(client, edge):
    long = "word " * 2500  # about 3100 tokens by the edge's estimate, 2500 by the engine's count
    first = await client.responses.create(model="scripted", input=long + "first")
    refused = await raw_create(edge, {"input": long + "second", "previous_response_id": first.id})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "input"
    kept = await client.responses.create(
        model="scripted", input=long + "second", previous_response_id=first.id, truncation="auto"
    )
    assert kept.status == "completed" and kept.truncation == "auto"
    sent = edge.engine.requests[-1].chat.messages
    assert len(sent) == 1 and sent[0].content[0].text.endswith("second")


async def raw_create(edge, body: dict) -> httpx.Response:
    async with raw(edge) as http:
        return await http.post("/responses", json={"model": "scripted", **body})


@pytest.mark.parametrize("streamed", [False, True])
async def test_an_openai_agents_sdk_agent_calls_its_tool_and_answers(edge, streamed):
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # the SDK would export traces to OpenAI
    calls = []

    @function_tool
    def get_weather(city: str) -> str:
        """Weather of a city."""
        calls.append(city)
        return f"sunny in {city}"

    model = OpenAIResponsesModel(
        model="scripted", openai_client=openai.AsyncOpenAI(base_url=edge.base_url, api_key=KEY)
    )
    agent = Agent(
        name="weather",
        instructions="Answer with the weather.",
        tools=[get_weather],
        model=model,
        model_settings=ModelSettings(tool_choice="required"),  # reset to auto after the call (the SDK's default)
    )
    if streamed:
        result = Runner.run_streamed(agent, "Weather in Paris?", max_turns=3)
        async for _ in result.stream_events():
            pass
    else:
        result = await Runner.run(agent, "Weather in Paris?", max_turns=3)
    assert calls == ["Paris"]
    assert result.final_output == "echo: sunny in Paris"
