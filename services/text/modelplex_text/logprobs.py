"""Token log probabilities, from the logits a token was actually chosen from.

The engine hands in the logits after the output constraint masked them and the
penalties were applied, before temperature and nucleus (which shape the draw,
not the model's distribution, as OpenAI and vLLM report it). So a constrained
choice reports probabilities over the tokens it was allowed: masked tokens
(-inf) have probability 0 and never appear among the alternatives.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from modelplex.v1 import text_pb2


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities over the whole vocabulary (what ``token_logprob`` reports a few of)."""
    return logits.astype(np.float64) - _log_sum_exp(logits)


def token_logprob(logits: np.ndarray, chosen: int, top: int, piece: Callable[[int], bytes]) -> text_pb2.TokenLogprob:
    """The chosen token's logprob and the ``top`` most likely allowed tokens' (best first).

    ``piece`` gives a token's bytes; ``token`` is their UTF-8 text (a token that ends
    mid-character shows U+FFFD there; ``token_bytes`` keeps the exact bytes). Only
    the normalizer is computed over the vocabulary: a token costs well under a
    millisecond on a 49k vocabulary, not a float64 copy of it.
    """
    normalizer = _log_sum_exp(logits)
    entry = _scored(text_pb2.TokenLogprob, chosen, float(logits[chosen]) - normalizer, piece)
    for token in _most_likely(logits, top):
        entry.top_logprobs.append(_scored(text_pb2.TopLogprob, token, float(logits[token]) - normalizer, piece))
    return entry


def _log_sum_exp(logits: np.ndarray) -> float:
    peak = float(logits.max())
    if not np.isfinite(peak):
        raise ValueError("no token is allowed")
    # In float64, so the probabilities sum to 1 within 1e-15, not float32's 1e-8 (masked tokens give 0).
    return peak + float(np.log(np.exp(logits.astype(np.float64) - peak).sum()))


def _most_likely(logits: np.ndarray, top: int) -> list[int]:
    top = min(top, logits.size)
    if top <= 0:
        return []
    candidates = np.argpartition(-logits, top - 1)[:top]
    # Best first; ties by token id, so the order is deterministic.
    ordered = sorted(candidates.tolist(), key=lambda token: (-logits[token], token))
    return [token for token in ordered if np.isfinite(logits[token])]


#: OpenAI's stand-in for "very unlikely"; also keeps -inf out of JSON.
_FLOOR = -9999.0


def _scored(kind, token: int, logprob: float, piece: Callable[[int], bytes]):
    raw = piece(token)
    return kind(token=raw.decode("utf-8", errors="replace"), logprob=max(logprob, _FLOOR), token_bytes=raw)
