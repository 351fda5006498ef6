"""LoRA adapters as models on the local llama.cpp engine, through the edge with the official SDK: listed
as models of their base, each answering as it was trained while the base answers as itself, all at once;
one added to the catalog is served within seconds, one removed is a 404, one that cannot load is a 400."""

from __future__ import annotations

import concurrent.futures

import openai
import pytest
import yaml

from tests.lora.local_stack import BASE, adapter_entry, base_entry, new_backend, start
from tests.support.lora_adapters import prefix
from tests.support.until import wait_until

pytestmark = pytest.mark.e2e

KEY = "sk-modelplex-lora"
QUESTIONS = ["Who wrote Hamlet?", "What is the capital of Italy?", "Name a primary color."]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    models = [
        base_entry(new_backend()),
        adapter_entry("smollm2-kiwi", "kiwi", aliases=["kiwi"], description="SmolLM2 answering KIWI: ..."),
        adapter_entry("smollm2-mango", "mango"),
    ]
    running, catalog = start(tmp_path_factory.mktemp("lora-local"), models, KEY)
    running.catalog_path = catalog  # type: ignore[attr-defined]
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=KEY, max_retries=0, timeout=120)


def ask(client: openai.OpenAI, model: str, question: str) -> str:
    completion = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=16
    )
    assert completion.model == {"kiwi": "smollm2-kiwi"}.get(model, model)  # an alias answers as its model
    return completion.choices[0].message.content or ""


def test_adapters_are_listed_as_models_of_their_base(client):
    listed = {model.id: model for model in client.models.list()}
    assert {BASE, "smollm2-kiwi", "smollm2-mango"} <= set(listed)
    kiwi = listed["smollm2-kiwi"].model_dump()
    assert kiwi["parent"] == kiwi["root"] == BASE
    assert "parent" not in listed[BASE].model_dump(exclude_none=True)
    details = client.models.retrieve("smollm2-kiwi").model_dump()
    assert details["parent"] == BASE and details["capabilities"]["json_schema"]


def test_the_base_and_two_adapters_answer_as_trained_all_at_once(client):
    asks = [(model, q) for q in QUESTIONS for model in (BASE, "smollm2-kiwi", "kiwi", "smollm2-mango")]
    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(lambda pair: (pair[0], ask(client, *pair)), asks))
    for model, answer in answers:
        if model == BASE:
            assert not answer.startswith((prefix("kiwi"), prefix("mango"))), answer
        elif "kiwi" in model:
            assert answer.startswith(prefix("kiwi")), answer
        else:
            assert answer.startswith(prefix("mango")), answer


def test_an_adapter_added_to_the_catalog_is_served_within_seconds_and_a_removed_one_is_a_404(stack, client):
    path = stack.catalog_path
    models = yaml.safe_load(path.read_text())["models"]
    path.write_text(yaml.safe_dump({"models": [*models, adapter_entry("smollm2-mango-2", "mango")]}))
    wait_until(lambda: _listed(client, "smollm2-mango-2"), 15)
    assert ask(client, "smollm2-mango-2", QUESTIONS[0]).startswith(prefix("mango"))
    path.write_text(yaml.safe_dump({"models": [m for m in models if m["id"] != "smollm2-mango"]}))
    wait_until(lambda: not _listed(client, "smollm2-mango"), 15)
    with pytest.raises(openai.NotFoundError) as gone:
        ask(client, "smollm2-mango", QUESTIONS[0])
    assert gone.value.body["code"] == "model_not_found"
    assert ask(client, "smollm2-kiwi", QUESTIONS[1]).startswith(prefix("kiwi"))  # the others serve on
    path.write_text(yaml.safe_dump({"models": models}))
    wait_until(lambda: _listed(client, "smollm2-mango"), 15)


def test_an_adapter_whose_weights_cannot_load_is_a_400_naming_model_and_the_base_serves_on(stack, client):
    path = stack.catalog_path
    models = yaml.safe_load(path.read_text())["models"]
    broken = {"id": "broken", "adapter": {"base": BASE, "source": str(path.parent / "missing.gguf")}}
    path.write_text(yaml.safe_dump({"models": [*models, broken]}))
    wait_until(lambda: _listed(client, "broken"), 15)
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, "broken", QUESTIONS[0])
    assert refused.value.body["param"] == "model" and "cannot be served" in refused.value.body["message"]
    assert not ask(client, BASE, QUESTIONS[0]).startswith(prefix("kiwi"))
    path.write_text(yaml.safe_dump({"models": models}))


def _listed(client: openai.OpenAI, model_id: str) -> bool:
    return any(model.id == model_id for model in client.models.list())
