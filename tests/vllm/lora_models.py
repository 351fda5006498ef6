"""Catalog entries for LoRA adapters on the engine suite's real vLLM (started with --enable-lora, two slots:
tests/vllm/conftest.py), with the adapters made in the test set-up (tests/support/lora_adapters.py)."""

from __future__ import annotations

from typing import Any

from tests.support.lora_adapters import peft_dir, zero_dir
from tests.support.vllm_server import VllmServer
from tests.vllm.conftest import CONTEXT, TEXT_MODEL, example_model

# vLLM's --max-loras of the suite's text server (conftest.chart_entries): what the backend may hold per replica.
MAX_LORAS = 2


def base_model(server: VllmServer, model_id: str = TEXT_MODEL, **extra: Any) -> dict[str, Any]:
    """The suite's SmolLM2 on vLLM, its base-model requests under the adapter of zeros (vllm-project/vllm#48421)."""
    model = example_model(TEXT_MODEL, server)
    settings = model["engine"]["settings"] | {"zero_adapter": str(zero_dir()), "pool_adapter_slots": MAX_LORAS}
    engine = model["engine"] | {"settings": settings}
    return model | {"id": model_id, "engine": engine, "context_length": CONTEXT} | extra


def adapter_model(model_id: str, adapter: str, base: str, **extra: Any) -> dict[str, Any]:
    return {"id": model_id, "adapter": {"base": base, "source": str(peft_dir(adapter)), "rank": 8}} | extra
