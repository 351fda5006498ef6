"""The e2e embeddings acceptance tests, unchanged, against all-MiniLM-L6-v2 served by the real Triton.

The e2e module's own ``client`` and ``http`` fixtures are reused; only ``stack`` is replaced by one
whose models use the Triton adapter in front of tritonserver's ``minilm`` (docs/examples/catalog-triton.yaml).
"""

from __future__ import annotations

import pytest

from tests.e2e.test_embeddings import *  # noqa: F403 - the same tests, collected again here
from tests.e2e.test_embeddings import KEY, MODEL
from tests.support.ports import free_port
from tests.triton.conftest import example_model, start_stack

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def stack(triton, tmp_path_factory):
    minilm = example_model(MODEL, triton) | {"aliases": ["minilm"]}
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
    running = start_stack(tmp_path_factory.mktemp("triton-embeddings-stack"), [minilm, small_batches, chat_model], KEY)
    yield running
    running.stop()
