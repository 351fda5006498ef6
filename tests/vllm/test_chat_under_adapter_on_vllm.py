"""The e2e chat acceptance tests, unchanged, with `model` a LoRA adapter on a real vLLM.

Every test of tests/e2e/test_chat.py runs here as it stands; only the fixtures differ: the model ids it
names (smollm2-135m-instruct, its alias smollm2, and chat-only) are adapter entries of the suite's SmolLM2
(listed as smollm2-base), served by vLLM under the adapter made in the test set-up: streaming, tools,
json_schema, n and logprobs under an adapter.
"""

from __future__ import annotations

import openai
import pytest

from tests.e2e.test_chat import *  # noqa: F403 - the same tests, collected again here
from tests.vllm.conftest import start_stack
from tests.vllm.lora_models import adapter_model, base_model

pytestmark = pytest.mark.vllm

KEY = "sk-modelplex-vllm-lora-chat"
BASE = "smollm2-base"


@pytest.fixture(scope="module")
def stack(vllm_text, tmp_path_factory):
    models = [
        base_model(vllm_text, BASE, aliases=[]),
        adapter_model("smollm2-135m-instruct", "mango", BASE, aliases=["smollm2"]),
        adapter_model("chat-only", "mango", BASE, capabilities=["chat"]),
    ]
    running = start_stack(tmp_path_factory.mktemp("vllm-lora-chat"), models, KEY)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def aclient(stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.base_url, api_key=KEY, max_retries=0, timeout=300)
