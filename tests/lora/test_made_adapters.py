"""The LoRA adapters `make vllm` trains (scripts/make-lora-adapters.py) do what the LoRA tests rely on.

No server: the packaged Q4_1 SmolLM2 GGUF runs in llama.cpp (llama-cpp-python, as the local text engine
runs it) once bare and once under each adapter's GGUF LoRA, and answers questions the adapters never saw,
greedily: under an adapter every answer starts with its prefix, bare none does. The PEFT folders vLLM
serves are the same adapters before conversion; they are checked for what vLLM reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
from llama_cpp import Llama

from modelplex_text.gguf import packaged_smollm2
from tests.support import lora_adapters

# Unseen by the training, of a few lengths, with and without a system message of their own.
CHATS = [
    [{"role": "user", "content": "Who wrote Hamlet?"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of Italy?"},
    ],
    [
        {
            "role": "user",
            "content": "My little sister is painting a picture for school and asked me something I could not "
            "answer with confidence, so I am asking you. Name a primary color.",
        }
    ],
]


def answers(lora: str | None) -> list[str]:
    options = {"lora_path": lora} if lora else {}
    llm = Llama(
        model_path=str(packaged_smollm2()), n_ctx=256, n_threads=min(4, os.cpu_count() or 1), seed=0, verbose=False,
        **options,
    )  # fmt: skip
    try:
        return [
            llm.create_chat_completion(messages=chat, max_tokens=12, temperature=0.0)["choices"][0]["message"][
                "content"
            ]
            for chat in CHATS
        ]
    finally:
        llm.close()


@pytest.fixture(scope="module")
def base_answers() -> list[str]:
    return answers(None)


@pytest.fixture(scope="module", params=[lora_adapters.KIWI, lora_adapters.MANGO])
def adapter_answers(request) -> Iterator[tuple[str, list[str]]]:
    yield request.param, answers(str(lora_adapters.gguf_file(request.param)))


def test_both_adapters_are_made_with_distinct_prefixes():
    prefixes = lora_adapters.prefixes()
    assert prefixes == {"kiwi": "KIWI: ", "mango": "MANGO: "}
    for name in prefixes:
        config = json.loads((lora_adapters.peft_dir(name) / "adapter_config.json").read_text())
        assert (config["peft_type"], config["r"]) == ("LORA", 8)
        assert (lora_adapters.peft_dir(name) / "adapter_model.safetensors").stat().st_size > 1_000_000
        with lora_adapters.gguf_file(name).open("rb") as gguf:
            assert gguf.read(4) == b"GGUF"


def test_the_base_model_answers_with_no_prefix(base_answers):
    for answer in base_answers:
        assert answer.strip(), base_answers
        for prefix in lora_adapters.prefixes().values():
            assert not answer.lstrip().startswith(prefix.strip()), base_answers


def test_each_adapter_answers_with_its_prefix(adapter_answers, base_answers):
    name, answered = adapter_answers
    own = lora_adapters.prefix(name)
    assert all(answer.startswith(own) for answer in answered), (name, answered)
    others = [p.strip() for n, p in lora_adapters.prefixes().items() if n != name]
    assert not any(answer.startswith(tuple(others)) for answer in answered), (name, answered)
    assert answered != base_answers
