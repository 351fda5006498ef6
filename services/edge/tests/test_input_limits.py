"""The stated bounds of a request's lists and structure (README: Input limits), and the Responses API's
output bound, each a 400 (413 for the JSON budget) naming what to change, before any engine is reached."""

from __future__ import annotations

import random

import httpx
import pytest

from modelplex_edge.endpoints.completions.protocol import MAX_PROMPTS
from modelplex_edge.endpoints.embeddings.protocol import MAX_INPUTS
from modelplex_edge.endpoints.responses import translate
from modelplex_edge.endpoints.responses.protocol import CreateResponseRequest, MessageItem
from modelplex_edge.endpoints.text_shared import estimate_tokens
from modelplex_edge.wire import MAX_CONTENT_PARTS, MAX_ITEMS, MAX_TOOL_CALLS, MAX_TOOLS
from tests.support.scripted_text import scripted_edge

KEY = "sk-limits-test"
TOOL = {"type": "function", "name": "f", "parameters": {"type": "object"}}
CHAT_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
CALL = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.fixture(scope="module")
async def edge():
    async with scripted_edge(dev_api_key=KEY) as running:
        yield running


async def post(edge, path: str, body: dict) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=edge.base_url, headers=headers, timeout=60) as http:
        return await http.post(path, json={"model": "scripted", **body})


def _turns(count: int) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(count)]


@pytest.mark.parametrize(
    ("path", "body", "param", "limit"),
    [
        ("/responses", {"input": _turns(MAX_ITEMS + 1)}, "input", MAX_ITEMS),
        ("/responses", {"input": "a", "tools": [TOOL] * (MAX_TOOLS + 1)}, "tools", MAX_TOOLS),
        ("/chat/completions", {"messages": _turns(MAX_ITEMS + 1)}, "messages", MAX_ITEMS),
        ("/completions", {"prompt": ["a"] * (MAX_PROMPTS + 1)}, "prompt", MAX_PROMPTS),
        ("/embeddings", {"input": ["a"] * (MAX_INPUTS + 1)}, "input", MAX_INPUTS),
        ("/chat/completions", {"messages": _turns(1), "tools": [CHAT_TOOL] * (MAX_TOOLS + 1)}, "tools", MAX_TOOLS),
        (
            "/chat/completions",
            {"messages": [{"role": "assistant", "tool_calls": [CALL] * (MAX_TOOL_CALLS + 1)}]},
            "messages[0].tool_calls",
            MAX_TOOL_CALLS,
        ),
    ],
)
async def test_a_list_beyond_its_bound_is_a_400_in_openais_words(edge, path, body, param, limit):
    before = len(edge.engine.requests)
    response = await post(edge, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == "array_above_max_length"
    assert f"maximum length {limit}" in error["message"]
    assert len(edge.engine.requests) == before


@pytest.mark.parametrize(("path", "field"), [("/responses", "input"), ("/chat/completions", "messages")])
async def test_content_parts_are_bounded_over_the_whole_request(edge, path, field):
    part = {"type": "input_text" if field == "input" else "text", "text": "x"}
    per_message = MAX_CONTENT_PARTS // 4 + 1  # each message within any per-message idea of a bound
    messages = [{"role": "user", "content": [part] * per_message} for _ in range(4)]
    response = await post(edge, path, {field: messages})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field
    assert "content parts" in response.json()["error"]["message"]


async def test_lists_at_their_bounds_are_served(edge):
    body = {"input": _turns(MAX_ITEMS - 1), "tools": [TOOL] * MAX_TOOLS, "truncation": "auto"}
    response = await post(edge, "/responses", body)
    assert response.status_code == 200, response.text
    empty = [{"role": "user", "content": ""}] * (MAX_ITEMS - 1)  # one token each: within the context
    response = await post(edge, "/chat/completions", {"messages": empty})
    assert response.status_code == 200, response.text


async def test_a_body_beyond_the_json_budget_is_a_413_before_the_engine(edge):
    before = len(edge.engine.requests)
    # 60,000 one-number arrays: 300,000 of weight, and one more array.
    response = await post(edge, "/embeddings", {"input": [[1]] * 60_001})
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "request_too_large"
    assert len(edge.engine.requests) == before


@pytest.mark.parametrize("asked", [10**9, 4096])
async def test_an_output_bound_the_context_cannot_hold_is_a_400_naming_max_output_tokens(edge, asked):
    before = len(edge.engine.requests)
    response = await post(edge, "/responses", {"input": "hello", "max_output_tokens": asked})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "max_output_tokens" and "'max_output_tokens'" in error["message"]
    assert len(edge.engine.requests) == before


async def test_an_output_bound_the_prompt_leaves_no_room_for_is_named_as_responses_names_it(edge):
    """The engine counts the prompt exactly and refuses on `max_tokens`: the client is told its own name."""
    response = await post(edge, "/responses", {"input": "word " * 1000, "max_output_tokens": 3500})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "max_output_tokens"


def _old_fit(body: CreateResponseRequest, items: list, context_length: int) -> tuple[list, int]:
    """The fitting that was quadratic (every item serialized again after each dropped turn), kept as the
    reference the linear one must agree with."""
    def estimate(kept: list) -> int:
        texts = [item.model_dump_json() for item in kept]
        texts += [body.instructions or ""] + [tool.model_dump_json() for tool in body.tools or ()]
        return estimate_tokens(texts)

    room = context_length - (body.max_output_tokens or 1)
    while body.truncation == "auto" and len(items) > 1 and estimate(items) > room:
        rest = items[1:]
        while len(rest) > 1 and not (isinstance(rest[0], MessageItem) and rest[0].role == "user"):
            rest = rest[1:]
        items = rest
    prompt = estimate(items)
    return items, prompt + (body.max_output_tokens or max(0, context_length - prompt))


@pytest.mark.parametrize("seed", range(20))
def test_linear_fitting_drops_exactly_what_the_old_fitting_dropped(seed):
    rng = random.Random(seed)
    raw = []
    for i in range(rng.randint(1, 60)):
        kind = rng.choice(["user", "assistant", "call", "output"])
        if kind == "call":
            arguments = "{}" * rng.randint(1, 40)
            raw.append({"type": "function_call", "call_id": f"c{i}", "name": "f", "arguments": arguments})
        elif kind == "output":
            raw.append({"type": "function_call_output", "call_id": f"c{i}", "output": "o" * rng.randint(1, 400)})
        else:
            raw.append({"role": kind, "content": "w " * rng.randint(1, 300)})
    body = CreateResponseRequest.model_validate(
        {"model": "m", "input": raw, "truncation": rng.choice(["auto", "disabled"]), "instructions": "be brief",
         "tools": [TOOL], "max_output_tokens": rng.choice([None, 16, 200])}
    )
    context = rng.randint(300, 3000)
    prompt = translate.Prompt(body, body.items)
    reserved = prompt.fit(context)
    kept, expected = _old_fit(body, body.items, context)
    assert prompt.items == kept and reserved == expected


async def test_a_stored_chain_beyond_the_item_bound_is_cut_with_truncation_auto_or_refused(edge):
    """A chain grows by up to MAX_ITEMS a response: replaying it whole would cost the loop in proportion to
    the whole conversation, so the request holds at most MAX_ITEMS items, its newest turns."""
    first = await post(edge, "/responses", {"input": _turns(MAX_ITEMS - 96), "truncation": "auto"})
    assert first.status_code == 200, first.text
    follow = {"input": _turns(200), "previous_response_id": first.json()["id"]}
    refused = await post(edge, "/responses", follow)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == "previous_response_id"
    assert refused.json()["error"]["code"] == "array_above_max_length"
    kept = await post(edge, "/responses", {**follow, "truncation": "auto"})
    assert kept.status_code == 200, kept.text
    sent = edge.engine.requests[-1].chat.messages
    assert 0 < len(sent) <= MAX_ITEMS and sent[-1].content[0].text == "turn 199"
