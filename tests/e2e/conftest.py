"""The whole local stack as real processes, driven through the official openai SDK."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import yaml

from tests.support import stacks
from tests.support.ports import free_port

DEV_KEY = "sk-modelplex-e2e"
MAX_BODY = 256 * 1024
# Read timeouts for slow clients (headers, body), short so the tests that trip them stay fast.
SLOW_CLIENT_SECONDS = 2
# The whole body's deadline, for the test that trickles one byte at a time (each gap within the above).
BODY_DEADLINE_SECONDS = 5


def _catalog(tmp: Path) -> Path:
    llamacpp = {"kind": "llamacpp", "settings": {"context_length": 2048}}
    text_caps = ["chat", "completions", "tool_use", "json_schema", "prompt_caching", "logprobs", "multiple_choices"]
    smollm2_backend = f"127.0.0.1:{free_port()}"
    models = [
        {
            "id": "smollm2-135m-instruct",
            "aliases": ["smollm2"],
            "modality": "text",
            "backend": smollm2_backend,
            "engine": llamacpp,
            "capabilities": text_caps,
            "context_length": 2048,
            "owned_by": "huggingfacetb",
            "created": 1730419200,
        },
        # The same backend, listed with `chat` only: what the edge does for a model lacking a capability.
        {
            "id": "chat-only",
            "modality": "text",
            "backend": smollm2_backend,
            "engine": llamacpp,
            "capabilities": ["chat"],
            "created": 1730419200,
        },
        # Its own backend process, which test_stream_lifecycle.py kills mid-stream: no other test uses it.
        {
            "id": "doomed",
            "modality": "text",
            "backend": f"127.0.0.1:{free_port()}",
            "engine": llamacpp,
            "capabilities": ["chat"],
            "created": 1730419200,
        },
        # Another modality: chat requests naming it are refused.
        {
            "id": "minilm",
            "modality": "embeddings",
            "backend": f"127.0.0.1:{free_port()}",
            "engine": {"kind": "external"},
            "capabilities": {"dimensions": 384},
            "created": 1730419200,
        },
        # Routed to a port nobody listens on: the engine is unavailable.
        {
            "id": "offline",
            "modality": "text",
            "backend": f"127.0.0.1:{free_port()}",
            "engine": {"kind": "external"},
            "capabilities": ["chat"],
            "created": 1730419200,
        },
    ]
    path = stacks.write_catalog(tmp, models)
    return path


# Package scope: the stack (three model processes) is gone before the integration tests start theirs.
@pytest.fixture(scope="package")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stack")
    catalog = _catalog(tmp)
    env = {
        "MODELPLEX_DEV_API_KEY": DEV_KEY,
        "MODELPLEX_EDGE_MAX_BODY_BYTES": str(MAX_BODY),
        "MODELPLEX_TEXT_MAX_QUEUE": "16",
        "MODELPLEX_EDGE_BODY_TIMEOUT_SECONDS": str(SLOW_CLIENT_SECONDS),
        "MODELPLEX_EDGE_HEADER_TIMEOUT_SECONDS": str(SLOW_CLIENT_SECONDS),
        "MODELPLEX_EDGE_BODY_DEADLINE_SECONDS": str(BODY_DEADLINE_SECONDS),
        "MODELPLEX_LOG_LEVEL": "info",
    }
    running = stacks.start_stack(catalog, tmp, env=env)
    running.logs = tmp  # type: ignore[attr-defined]
    running.targets = {m["id"]: m["backend"] for m in yaml.safe_load(catalog.read_text())["models"]}  # type: ignore[attr-defined]
    yield running
    running.stop()


@pytest.fixture(scope="package")
def client(stack) -> openai.OpenAI:
    # No retries: the tests assert on the first answer.
    return openai.OpenAI(base_url=stack.base_url, api_key=DEV_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="package")
def aclient(stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.base_url, api_key=DEV_KEY, max_retries=0, timeout=120)
