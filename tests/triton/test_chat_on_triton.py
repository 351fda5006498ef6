"""The e2e chat acceptance tests, unchanged, against the text model served by a real Triton.

Every test of tests/e2e/test_chat.py runs here as it stands; only the fixtures differ: the same
model ids, routed to the Triton adapter (flavor vllm, docs/examples/catalog-triton.yaml) in front of
a real tritonserver whose vLLM backend runs the real vLLM.
"""

from __future__ import annotations

import openai
import pytest

from tests.e2e.test_chat import *  # noqa: F403 - the same tests, collected again here
from tests.triton.conftest import example_model, start_stack

pytestmark = pytest.mark.triton

DEV_KEY = "sk-modelplex-triton-chat"
TEXT_MODEL = "smollm2-135m-instruct"


def text_models(server) -> list[dict]:
    """The e2e suite's text models, served through Triton instead of llama.cpp."""
    smollm2 = example_model(TEXT_MODEL, server)
    # The same backend, listed with `chat` only: what the edge does for a model lacking a capability.
    chat_only = {k: smollm2[k] for k in ("modality", "backend", "engine", "created")} | {
        "id": "chat-only",
        "capabilities": ["chat"],
    }
    return [smollm2, chat_only]


@pytest.fixture(scope="module")
def stack(triton, tmp_path_factory):
    running = start_stack(tmp_path_factory.mktemp("triton-chat-stack"), text_models(triton), DEV_KEY)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=DEV_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def aclient(stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.base_url, api_key=DEV_KEY, max_retries=0, timeout=300)
