"""Legacy completions and the models endpoints, with the openai SDK."""

from __future__ import annotations

import json

import openai
import pytest

from tests.support.openapi import validate

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"


def test_completion_of_a_string_prompt(client):
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="The capital of France is", max_tokens=8)
    validate(json.loads(raw.text), "CreateCompletionResponse")
    completion = raw.parse()
    assert completion.object == "text_completion"
    assert completion.choices[0].text.strip()
    assert 0 < completion.usage.completion_tokens <= 8


def test_completion_default_max_tokens_is_openais_16(client):
    completion = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0)
    assert completion.usage.completion_tokens == 16 and completion.choices[0].finish_reason == "length"


def test_completion_of_a_list_of_prompts(client):
    completion = client.completions.create(model=MODEL, prompt=["1, 2, 3,", "a, b, c,"], max_tokens=4, n=2)
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    assert completion.usage.prompt_tokens > 0


def test_completion_echo_prepends_the_prompt(client):
    completion = client.completions.create(model=MODEL, prompt="Roses are red,", max_tokens=4, echo=True)
    assert completion.choices[0].text.startswith("Roses are red,")
    assert len(completion.choices[0].text) > len("Roses are red,")  # and the generation follows


def test_completion_stream(client):
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=["Hello", "Bonjour"],
            max_tokens=5,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    # The spec gives chunks the response's shape, where finish_reason is a
    # string; like OpenAI's API we send null until a choice finishes.
    finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    for chunk in finished:
        validate(chunk.model_dump(exclude_unset=True), "CreateCompletionResponse")
    assert len(finished) == 4
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1, 2, 3}  # prompt p, choice i: p * n + i
    assert chunks[-1].usage.completion_tokens > 0


def test_completion_with_token_prompt_is_a_clear_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=4)
    assert err.value.body["param"] == "prompt"


def test_list_models(client):
    raw = client.models.with_raw_response.list()
    validate(json.loads(raw.text), "ListModelsResponse")
    ids = [m.id for m in raw.parse().data]
    assert MODEL in ids and "smollm2" not in ids  # aliases resolve but are not listed


def test_retrieve_model_by_id_and_alias(client):
    assert client.models.retrieve(MODEL).id == MODEL
    assert client.models.retrieve("smollm2").id == MODEL


def test_retrieve_unknown_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-17")
    assert err.value.code == "model_not_found"


@pytest.mark.parametrize(("prompt", "max_tokens", "param"), [([], 4, "prompt"), ("Hello", 0, "max_tokens")])
def test_empty_prompt_lists_and_zero_max_tokens_are_400(client, prompt, max_tokens, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens)
    assert err.value.param == param


def test_special_tokens_in_a_raw_prompt_stay_text(client):
    # As control tokens "<|im_start|><|im_end|>" would be 2 tokens; as text it is many more.
    completion = client.completions.create(model=MODEL, prompt="<|im_start|><|im_end|>", max_tokens=1)
    assert completion.usage.prompt_tokens > 4
