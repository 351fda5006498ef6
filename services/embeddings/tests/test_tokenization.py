"""The work spent on a refused request is bounded: over-long inputs are found before everything is tokenized."""

from __future__ import annotations

import random

import pytest

from modelplex.v1 import embeddings_pb2 as pb
from modelplex_embeddings.tokenization import CHUNK_INPUTS, WINDOW_CHARS, InputTokenizer, packaged_minilm
from modelplex_kit.errors import ServiceError

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()  # noqa: SIM905


class CountingTokenizer:
    """The real tokenizer, counting the characters it is given to encode."""

    def __init__(self, real) -> None:
        self._real = real
        self.chars = 0
        self.longest = 0  # the longest text encoded in one call

    def encode_batch(self, texts):
        self.chars += sum(len(t) for t in texts)
        self.longest = max([self.longest, *map(len, texts)])
        return self._real.encode_batch(texts)

    def encode(self, text, add_special_tokens=True):
        self.chars += len(text)
        self.longest = max(self.longest, len(text))
        return self._real.encode(text, add_special_tokens=add_special_tokens)

    def post_process(self, encoding):
        return self._real.post_process(encoding)


def tokenizer(max_tokens: int = 256) -> tuple[InputTokenizer, CountingTokenizer]:
    prepared = InputTokenizer(packaged_minilm() / "tokenizer.json", max_tokens)
    counting = CountingTokenizer(prepared._tokenizer)
    prepared._tokenizer = counting
    return prepared, counting


def prose(words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def test_a_request_of_2048_over_long_inputs_is_refused_after_one_chunk():
    # The hostile request: 2048 inputs of 600 words (7.6 MB). Before, all 2048 were
    # tokenized (~200 MB of tokenizer output) before the first one was refused.
    inputs = [pb.EmbedInput(text=prose(600, seed=i)) for i in range(2048)]
    prepared, counting = tokenizer()
    with pytest.raises(ServiceError) as refused:
        prepared.prepare(inputs)
    assert refused.value.param == "input[0]" and refused.value.code == "context_length_exceeded"
    one_chunk = sum(len(i.text) for i in inputs[:CHUNK_INPUTS])
    assert counting.chars <= one_chunk


def test_an_over_long_input_in_a_later_chunk_is_named_by_its_index_in_the_request():
    inputs = [pb.EmbedInput(text="fine") for _ in range(150)]
    inputs[130] = pb.EmbedInput(text=prose(600))
    with pytest.raises(ServiceError) as refused:
        tokenizer()[0].prepare(inputs)
    assert refused.value.param == "input[130]"
    assert "input[130]' is 6" in refused.value.message  # the exact count: 600 words and more


def test_one_huge_input_is_refused_after_a_window_not_encoded_whole():
    huge = "a " * 4_000_000  # 8 MB, 4 million tokens: one Encoding of it was ~500 MB
    prepared, counting = tokenizer()
    with pytest.raises(ServiceError) as refused:
        prepared.prepare([pb.EmbedInput(text="short"), pb.EmbedInput(text=huge)])
    assert refused.value.param == "input[1]"
    assert "is at least 4098 tokens" in refused.value.message  # the first window's count, [CLS]/[SEP] included
    assert "maximum input length is 256" in refused.value.message
    assert counting.chars <= len("short") + WINDOW_CHARS


def test_windows_add_up_to_the_exact_ids_and_count():
    text = prose(4000, seed=7)  # ~21 000 characters: three windows
    assert len(text) > 2 * WINDOW_CHARS
    prepared_wide, counting = tokenizer(10**6)
    whole = counting._real.encode(text).ids
    assert prepared_wide.prepare([pb.EmbedInput(text=text)])[0].ids == whole  # windows joined: the same ids
    exact = len(whole)
    # Exactly at the limit: accepted (the windows' sum is not over it).
    assert tokenizer(exact)[0].prepare([pb.EmbedInput(text=text)])[0].tokens == exact
    # One below: refused by the window count, which reached exactly the whole text's count.
    with pytest.raises(ServiceError) as refused:
        tokenizer(exact - 1)[0].prepare([pb.EmbedInput(text=text)])
    assert f"is at least {exact} tokens" in refused.value.message


def test_a_long_text_of_few_tokens_is_accepted_with_its_exact_count():
    text = " " * (3 * WINDOW_CHARS) + "hello world" + "\n" * WINDOW_CHARS
    items = tokenizer()[0].prepare([pb.EmbedInput(text=text)])
    assert items[0].tokens == 4  # [CLS] hello world [SEP]



def test_a_long_legal_text_is_encoded_by_windows_never_whole():
    # 8 MB of spaces is 3 tokens, a legal input; encoded whole it took 30 s and a 476 MB peak.
    prepared, counting = tokenizer()
    items = prepared.prepare([pb.EmbedInput(text=" " * 8_000_000 + "hello")])
    assert items[0].tokens == 3 and items[0].ids == counting._real.encode("hello").ids
    assert counting.longest <= WINDOW_CHARS
