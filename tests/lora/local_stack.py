"""The local stack with LoRA adapters of SmolLM2 as models: the packaged GGUF on the llama.cpp engine, and
the adapters made in the test set-up (scripts/make-lora-adapters.py, converted to GGUF) as catalog entries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelplex_kit.devstack import Stack
from tests.support import stacks
from tests.support.lora_adapters import gguf_file
from tests.support.ports import free_port

BASE = "smollm2-base"
TEXT_CAPS = ["chat", "completions", "tool_use", "json_schema", "prompt_caching", "logprobs", "multiple_choices"]


def base_entry(backend: str, model_id: str = BASE, **extra: Any) -> dict[str, Any]:
    return {
        "id": model_id,
        "modality": "text",
        "backend": backend,
        "engine": {"kind": "llamacpp", "settings": {"context_length": 2048}},
        "capabilities": TEXT_CAPS,
        "context_length": 2048,
        "owned_by": "huggingfacetb",
        "created": 1730419200,
    } | extra


def adapter_entry(model_id: str, adapter: str, base: str = BASE, **extra: Any) -> dict[str, Any]:
    """A catalog entry for one of the adapters made in the set-up (its GGUF, for the llama.cpp engine)."""
    return {"id": model_id, "adapter": {"base": base, "source": str(gguf_file(adapter)), "rank": 8}} | extra


def start(tmp: Path, models: list[dict[str, Any]], key: str) -> tuple[Stack, Path]:
    catalog = stacks.write_catalog(tmp, models)
    env = {"MODELPLEX_DEV_API_KEY": key, "MODELPLEX_LOG_LEVEL": "info"}
    return stacks.start_stack(catalog, tmp, env=env), catalog


def new_backend() -> str:
    return f"127.0.0.1:{free_port()}"
