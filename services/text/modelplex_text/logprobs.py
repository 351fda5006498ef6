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
    """Log-probabilities over the vocabulary, in float64 so the probabilities sum to 1 within rounding."""
    values = logits.astype(np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise ValueError("no token is allowed")
    peak = finite.max()
    return values - (peak + np.log(np.exp(values - peak).sum()))


def token_logprob(logits: np.ndarray, chosen: int, top: int, piece: Callable[[int], bytes]) -> text_pb2.TokenLogprob:
    """The chosen token's logprob and the ``top`` most likely allowed tokens' (best first).

    ``piece`` gives a token's bytes; ``token`` is their UTF-8 text (a token that ends
    mid-character shows U+FFFD there; ``token_bytes`` keeps the exact bytes).
    """
    logprobs = log_softmax(logits)
    entry = _scored(text_pb2.TokenLogprob, chosen, logprobs[chosen], piece)
    for token in _most_likely(logprobs, top):
        entry.top_logprobs.append(_scored(text_pb2.TopLogprob, token, logprobs[token], piece))
    return entry


def _most_likely(logprobs: np.ndarray, top: int) -> list[int]:
    top = min(top, logprobs.size)
    if top <= 0:
        return []
    candidates = np.argpartition(-logprobs, top - 1)[:top]
    # Best first; ties by token id, so the order is deterministic.
    ordered = sorted(candidates.tolist(), key=lambda token: (-logprobs[token], token))
    return [token for token in ordered if np.isfinite(logprobs[token])]


#: OpenAI's stand-in for "very unlikely"; also keeps -inf out of JSON.
_FLOOR = -9999.0


def _scored(kind, token: int, logprob: float, piece: Callable[[int], bytes]):
    raw = piece(token)
    return kind(token=raw.decode("utf-8", errors="replace"), logprob=max(float(logprob), _FLOOR), token_bytes=raw)
