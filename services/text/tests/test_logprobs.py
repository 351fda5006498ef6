"""Logprobs from logits: a proper distribution, best first, and only over the tokens a constraint allows."""

import math

import numpy as np
import pytest

from modelplex_text.logprobs import log_softmax, token_logprob

PIECES = {0: b"a", 1: b" b", 2: b"\xe2\x82", 3: b"c"}


def piece(token: int) -> bytes:
    return PIECES.get(token, f"<{token}>".encode())


def test_log_softmax_is_a_distribution_even_for_large_logits():
    logits = np.array([1000.0, 999.0, 990.0, -1000.0], dtype=np.float32)
    probs = np.exp(log_softmax(logits))
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)
    assert probs[0] > probs[1] > probs[2] > probs[3]


def test_the_chosen_token_and_its_alternatives_best_first():
    logits = np.array([0.5, 3.0, 1.0, 2.0], dtype=np.float32)
    scored = token_logprob(logits, chosen=1, top=3, piece=piece)
    expected = log_softmax(logits)
    assert (scored.token, scored.token_bytes) == (" b", b" b")
    assert scored.logprob == pytest.approx(expected[1], rel=1e-6)
    assert [t.token_bytes for t in scored.top_logprobs] == [b" b", b"c", b"\xe2\x82"]
    assert [t.logprob for t in scored.top_logprobs] == pytest.approx(sorted(expected, reverse=True)[:3], rel=1e-6)
    assert sum(math.exp(t.logprob) for t in scored.top_logprobs) <= 1.0


def test_a_token_that_ends_mid_character_keeps_its_exact_bytes():
    scored = token_logprob(np.array([0.0, 0.0, 5.0, 0.0]), chosen=2, top=0, piece=piece)
    assert scored.token_bytes == b"\xe2\x82" and scored.token == "\ufffd"
    assert list(scored.top_logprobs) == []


def test_masked_tokens_have_no_probability_and_are_never_alternatives():
    logits = np.array([4.0, -np.inf, 1.0, -np.inf], dtype=np.float32)
    scored = token_logprob(logits, chosen=2, top=4, piece=piece)
    assert [t.token_bytes for t in scored.top_logprobs] == [b"a", b"\xe2\x82"]  # only the two allowed
    assert sum(math.exp(t.logprob) for t in scored.top_logprobs) == pytest.approx(1.0, abs=1e-6)


def test_ties_are_ordered_by_token_id():
    scored = token_logprob(np.zeros(4, dtype=np.float32), chosen=3, top=2, piece=piece)
    assert [t.token_bytes for t in scored.top_logprobs] == [b"a", b" b"]
    assert scored.logprob == pytest.approx(math.log(0.25))
