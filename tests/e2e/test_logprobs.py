"""Logprobs on chat and legacy completions, served by the local llama.cpp engine, through the openai SDK.

Every body and chunk is validated against the vendored OpenAI spec.
"""

from __future__ import annotations

import codecs
import json
import math

import openai
import pytest

from tests.support.openapi import validate

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "Name a colour."}]


def spelled(entries) -> str:
    """The text a list of ChatCompletionTokenLogprob spells (complete characters only)."""
    return codecs.getincrementaldecoder("utf-8")().decode(bytes(b for entry in entries for b in entry.bytes))


def test_chat_logprobs_with_alternatives(client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=ASK, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3
    )
    body = json.loads(raw.text)
    validate(body, "CreateChatCompletionResponse")
    completion = raw.parse()
    choice = completion.choices[0]
    content = choice.logprobs.content
    assert len(content) == completion.usage.completion_tokens
    assert spelled(content) == choice.message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the likeliest
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1.0 + 1e-6
    assert body["choices"][0]["logprobs"]["refusal"] is None


def test_chat_without_logprobs_has_null_logprobs(client):
    completion = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4)
    assert completion.choices[0].logprobs is None


def test_streamed_chat_chunks_carry_their_tokens_logprobs(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=16,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    entries, text = [], ""
    for chunk in chunks:
        validate(chunk.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.logprobs is not None:
            entries += choice.logprobs.content
            assert all(len(entry.top_logprobs) == 2 for entry in choice.logprobs.content)
        text += choice.delta.content or ""
        assert spelled(entries) == text  # each chunk's logprobs are those of its own tokens
    assert len(entries) == chunks[-1].usage.completion_tokens > 0


def test_constrained_chat_logprobs_stay_on_allowed_tokens(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Is water wet?"}],
        max_tokens=20,
        logprobs=True,
        top_logprobs=20,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    )
    choice = completion.choices[0]
    assert isinstance(json.loads(choice.message.content)["ok"], bool)
    forced = [entry for entry in choice.logprobs.content if len(entry.top_logprobs) == 1]
    assert forced and all(entry.logprob == pytest.approx(0.0) for entry in forced)


def test_completion_logprobs_object(client):
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt="The sky is", max_tokens=8, temperature=0, logprobs=2
    )
    validate(json.loads(raw.text), "CreateCompletionResponse")
    completion = raw.parse()
    choice = completion.choices[0]
    logprobs = choice.logprobs
    count = completion.usage.completion_tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == count
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(count)]
    assert "".join(logprobs.tokens) == choice.text
    for token, logprob, alternatives in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert len(alternatives) <= 3 and alternatives[token] == pytest.approx(logprob)
        assert max(alternatives.values()) == pytest.approx(logprob)  # greedy


def test_completion_logprobs_zero_scores_the_chosen_tokens_only(client):
    completion = client.completions.create(model=MODEL, prompt="One, two,", max_tokens=4, temperature=0, logprobs=0)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == completion.usage.completion_tokens
    assert all(
        list(alternatives) == [token]
        for token, alternatives in zip(logprobs.tokens, logprobs.top_logprobs, strict=True)
    )


def test_echoed_completion_offsets_start_after_the_prompt(client):
    prompt = "Roses are red,"
    completion = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=1, echo=True
    )
    choice = completion.choices[0]
    assert choice.text.startswith(prompt)
    assert choice.logprobs.text_offset[0] == len(prompt)
    assert choice.text[len(prompt) :] == "".join(choice.logprobs.tokens)


def test_streamed_completion_offsets_run_across_chunks(client):
    stream = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0, logprobs=1, stream=True
    )
    text, tokens, offsets = "", [], []
    for chunk in stream:
        body = chunk.model_dump(exclude_unset=True)
        # The spec gives chunks the response's shape, where finish_reason is a string; like OpenAI's API
        # we send null until the choice finishes: everything else, the logprobs object included, must match.
        body["choices"][0]["finish_reason"] = body["choices"][0]["finish_reason"] or "length"
        validate(body, "CreateCompletionResponse")
        choice = chunk.choices[0]
        if choice.logprobs is not None:
            tokens += choice.logprobs.tokens
            offsets += choice.logprobs.text_offset
        text += choice.text
    assert tokens and "".join(tokens) == text
    assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]


@pytest.mark.parametrize(
    ("endpoint", "fields", "param"),
    [
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat", {"top_logprobs": 2}, "top_logprobs"),
        ("completions", {"logprobs": 6}, "logprobs"),
    ],
)
def test_out_of_range_logprobs_are_400s_naming_the_field(client, endpoint, fields, param):
    with pytest.raises(openai.BadRequestError) as err:
        if endpoint == "chat":
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, **fields)
        else:
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, **fields)
    assert err.value.param == param
