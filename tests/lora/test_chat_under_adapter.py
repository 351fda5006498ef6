"""The e2e chat acceptance tests, unchanged, with `model` a LoRA adapter on the local llama.cpp engine.

Every test of tests/e2e/test_chat.py runs here as it stands; only the fixtures differ: the model ids it
names (smollm2-135m-instruct, its alias smollm2, and chat-only) are adapter entries of another base model,
served by the adapter made in the test set-up: streaming, tools, json_schema and logprobs under it.
"""

from __future__ import annotations

import openai
import pytest

from tests.e2e.test_chat import *  # noqa: F403 - the same tests, collected again here
from tests.lora.local_stack import BASE, adapter_entry, base_entry, new_backend, start

KEY = "sk-modelplex-lora-chat"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    models = [
        base_entry(new_backend()),
        adapter_entry("smollm2-135m-instruct", "mango", aliases=["smollm2"]),
        adapter_entry("chat-only", "mango", capabilities=["chat"]),
    ]
    running, _ = start(tmp_path_factory.mktemp("lora-chat"), models, KEY)
    assert BASE not in {"smollm2-135m-instruct", "chat-only"}
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def aclient(stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.base_url, api_key=KEY, max_retries=0, timeout=120)
