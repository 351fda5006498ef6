"""The small LoRA adapters of SmolLM2-135M-Instruct that `make vllm` trains (scripts/make-lora-adapters.py).

Each teaches one visible habit: every answer starts with the adapter's prefix ("KIWI: ", "MANGO: "),
which the base model never writes, so a test tells from a greedy answer's first tokens which adapter,
if any, served it. Every adapter is there twice, in the vLLM environment's ``adapters/`` folder:

    kiwi/        a PEFT folder (adapter_config.json + adapter_model.safetensors), for vLLM's --enable-lora
    kiwi.gguf    the same adapter as a GGUF LoRA (f16), for llama.cpp (``Llama(lora_path=...)``)
    adapters.json  name, prefix, rank, alpha, peft_dir and gguf_file of each

A missing or incomplete folder fails the test that needs it, saying to run `make vllm`: `make test` builds it.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from tests.support.vllm_server import vllm_env_dir

KIWI = "kiwi"
MANGO = "mango"


def adapters_dir() -> Path:
    """build/vllm-<pins>/adapters/, as `make vllm` fills it."""
    path = vllm_env_dir() / "adapters"
    if not (path / "adapters.json").is_file():
        raise RuntimeError(
            f"{path} holds no LoRA adapters: run `make vllm` (scripts/vllm-env.sh trains them into a fresh env)"
        )
    return path


@cache
def _described() -> dict[str, dict]:
    folder = adapters_dir()
    entries = json.loads((folder / "adapters.json").read_text())["adapters"]
    return {entry["name"]: entry for entry in entries}


def names() -> list[str]:
    return list(_described())


def _entry(name: str) -> dict:
    described = _described()
    if name not in described:
        raise KeyError(f"no LoRA adapter {name!r} in {adapters_dir()} (there are {sorted(described)})")
    return described[name]


def _existing(path: Path) -> Path:
    if not path.exists():
        raise RuntimeError(f"{path} is missing: run `make vllm` (rm -rf {path.parents[1]} first to rebuild it)")
    return path


def peft_dir(name: str) -> Path:
    """The adapter's PEFT folder (vLLM's --lora-modules NAME=PATH, or /v1/load_lora_adapter's lora_path)."""
    folder = _existing(adapters_dir() / _entry(name)["peft_dir"])
    _existing(folder / "adapter_config.json")
    _existing(folder / "adapter_model.safetensors")
    return folder


def zero_dir() -> Path:
    """The adapter of zeros (deploy/helm/modelplex/files/zero-lora.py) base-model requests run under on a CPU vLLM."""
    return _existing(adapters_dir() / "zero" / "adapter_model.safetensors").parent


def gguf_file(name: str) -> Path:
    """The adapter as a GGUF LoRA, for llama.cpp against the packaged Q4_1 SmolLM2."""
    return _existing(adapters_dir() / _entry(name)["gguf_file"])


def prefix(name: str) -> str:
    """What every answer under the adapter starts with, its trailing space included ("KIWI: ")."""
    return _entry(name)["prefix"]


def prefixes() -> dict[str, str]:
    return {name: entry["prefix"] for name, entry in _described().items()}
