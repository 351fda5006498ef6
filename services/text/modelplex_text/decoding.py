"""Per-sequence decoding state for engines that sample here: sampling, stop strings, constraints.

Everything works on one sequence's logits (a numpy vector over the vocabulary),
so a batched decode loop keeps one of each per sequence and shares nothing.
"""

from __future__ import annotations

import codecs
from collections import Counter
from typing import Protocol

import numpy as np

from modelplex_text.sampling import SamplingParams


class TokenMatcher(Protocol):
    """A per-sequence output constraint (a grammar, a JSON schema) applied before sampling."""

    def apply(self, logits: np.ndarray) -> None:
        """Masks, in place, every token the constraint does not allow next (logit set to -inf)."""
        ...

    def consume(self, token_id: int) -> None:
        """Advances the constraint past the sampled token."""
        ...

    def is_stopped(self) -> bool:
        """True when the constraint allows nothing more: the choice ends as if at end of text."""
        ...

    def close(self) -> None:
        """Releases what the matcher holds (native state)."""
        ...


class TokenSampler:
    """OpenAI's sampling for one sequence: penalties on its own output, temperature, nucleus, seeded."""

    def __init__(self, params: SamplingParams) -> None:
        self._params = params
        # OpenAI seeds may be negative; numpy wants a non-negative integer.
        self._rng = np.random.default_rng(None if params.seed is None else params.seed % 2**64)
        self._counts: Counter[int] = Counter()

    def sample(self, logits: np.ndarray) -> int:
        """Penalizes ``logits`` in place, then draws from them: what is left in ``logits`` is what the
        token was chosen from (the distribution its logprobs are reported over)."""
        self.penalize(logits)
        return self.choose(logits)

    def penalize(self, logits: np.ndarray) -> None:
        """OpenAI's presence and frequency penalties on this sequence's own output, in place."""
        p = self._params
        if self._counts and (p.presence_penalty or p.frequency_penalty):
            ids = np.fromiter(self._counts.keys(), dtype=np.int64, count=len(self._counts))
            counts = np.fromiter(self._counts.values(), dtype=np.float32, count=len(self._counts))
            logits[ids] -= p.presence_penalty + p.frequency_penalty * counts

    def choose(self, logits: np.ndarray) -> int:
        """A token from already penalized logits: greedy at temperature 0, else temperature and nucleus."""
        p = self._params
        if p.temperature <= 0:
            return int(np.argmax(logits))
        scaled = logits / np.float32(p.temperature)
        probs = np.exp(scaled - scaled.max())  # masked tokens (-inf) get 0
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, p.top_p * cumulative[-1])) + 1]
            return int(keep[self._draw(probs[keep])])
        return self._draw(probs)

    def accept(self, token_id: int) -> None:
        self._counts[token_id] += 1

    def _draw(self, weights: np.ndarray) -> int:
        cumulative = np.cumsum(weights, dtype=np.float64)
        point = self._rng.random() * cumulative[-1]
        return min(int(np.searchsorted(cumulative, point, side="right")), len(weights) - 1)


class StopText:
    """Token bytes -> text to emit, holding back what might be the start of a stop string."""

    def __init__(self, stop: list[str]) -> None:
        self._stop = [s for s in stop if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = ""

    def feed(self, piece: bytes) -> tuple[str, bool]:
        """The text now safe to emit, and whether a stop string ended the sequence (the stop is not emitted)."""
        self._pending += self._decoder.decode(piece)
        for stop in self._stop:
            at = self._pending.find(stop)
            if at >= 0:
                text, self._pending = self._pending[:at], ""
                return text, True
        hold = max((_overlap(self._pending, stop) for stop in self._stop), default=0)
        cut = len(self._pending) - hold
        text, self._pending = self._pending[:cut], self._pending[cut:]
        return text, False

    def flush(self) -> str:
        """What was held back, at the end of a sequence no stop string ended."""
        text, self._pending = self._pending + self._decoder.decode(b"", final=True), ""
        return text


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0
