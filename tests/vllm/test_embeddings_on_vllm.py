"""The e2e embeddings acceptance tests, unchanged, against all-MiniLM-L6-v2 served by vLLM as a pooling model.

The e2e module's own ``client`` and ``http`` fixtures are reused; only ``stack`` is replaced by
one whose models use the openai adapter in front of vLLM.
"""

from __future__ import annotations

import pytest

from tests.e2e.test_embeddings import *  # noqa: F403 - the same tests, collected again here
from tests.e2e.test_embeddings import KEY, MODEL
from tests.support.ports import free_port
from tests.vllm.conftest import example_model, start_stack

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def stack(vllm_embeddings, tmp_path_factory):
    minilm = example_model(MODEL, vllm_embeddings) | {"aliases": ["minilm"]}
    # The same backend, listed with a lower per-request limit: the catalog's limit is enforced.
    small_batches = minilm | {"id": "minilm-small-batches", "aliases": []}
    small_batches["capabilities"] = {**minilm["capabilities"], "max_inputs": 4}
    # A text model nobody calls: embeddings requests naming it are refused before routing.
    chat_model = {
        "id": "some-chat-model",
        "modality": "text",
        "backend": f"127.0.0.1:{free_port()}",
        "engine": {"kind": "external"},
        "capabilities": ["chat"],
        "created": 1730419200,
    }
    running = start_stack(tmp_path_factory.mktemp("vllm-embeddings-stack"), [minilm, small_batches, chat_model], KEY)
    yield running
    running.stop()
