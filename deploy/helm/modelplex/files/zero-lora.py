#!/usr/bin/env python3
"""Writes a LoRA adapter whose weights are all zero for a Hugging Face model: a PEFT folder that vLLM loads.

    zero-lora.py MODEL OUT_DIR      MODEL: a model folder, its config.json, or a Hugging Face repo id

Why: vLLM's CPU path runs a base-model request batched with adapter requests under the adapter in its last
LoRA slot (vllm-project/vllm #48421). The text backend sends base-model requests under this adapter instead
(MODELPLEX_TEXT_ZERO_ADAPTER): every request of a batch then names a real slot, and an adapter of zeros adds
exactly nothing, so the answers are the base model's. Rank 1 on the first layer's q_proj: the smallest
adapter vLLM accepts. Standard library only, but for a repo id (huggingface_hub, in the vLLM image): the
Helm chart runs it as an init container of the vLLM pods (engines.vllm.lora.zeroAdapter), the test set-up
(scripts/vllm-env.sh) beside the adapters it trains.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path


def zero_adapter(config: dict, out: Path) -> None:
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {f"{prefix}.lora_A.weight": (1, hidden), f"{prefix}.lora_B.weight": (heads * head_dim, 1)}
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4 * shape[0] * shape[1]  # float32 zeros
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data to 8 bytes
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "adapter_model.safetensors", "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        file.write(bytes(offset))
    peft = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 1,
        "lora_alpha": 1,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": ["q_proj"],
        "base_model_name_or_path": config.get("_name_or_path", ""),
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(peft, indent=2) + "\n")


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    source = Path(sys.argv[1])
    if source.is_dir():
        config_path = source / "config.json"
    elif source.is_file():
        config_path = source
    else:  # a repo id: its config alone (the weights are vLLM's to fetch)
        from huggingface_hub import hf_hub_download

        config_path = Path(hf_hub_download(sys.argv[1], "config.json"))
    config = json.loads(config_path.read_text())
    config = config.get("text_config", config)  # multimodal models keep the language model's apart
    zero_adapter(config, Path(sys.argv[2]))


if __name__ == "__main__":
    main()
