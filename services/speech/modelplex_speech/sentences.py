"""Splits input into sentences: the unit the servicer hands an engine.

Sentence by sentence, the first audio leaves after the first sentence even on an
engine that only answers whole texts (a non-decoupled Triton model), and
concurrent requests take turns on a single-threaded engine between sentences.
"""

from __future__ import annotations

import re

# After . ! ? … (optionally closed by a quote or bracket) followed by space; and at blank lines.
_BOUNDARY = re.compile(r"(?<=[.!?…])\s+|(?<=[.!?…][\"'”’)\]])\s+|\n\s*\n")  # noqa: RUF001  (closing quotes)
# Sentences longer than this are cut at the last space before it (a run-on text still streams).
MAX_SENTENCE_CHARS = 400


def sentences(text: str) -> list[str]:
    parts = []
    for sentence in _BOUNDARY.split(text):
        sentence = sentence.strip()
        while len(sentence) > MAX_SENTENCE_CHARS:
            cut = sentence.rfind(" ", 0, MAX_SENTENCE_CHARS)
            cut = cut if cut > 0 else MAX_SENTENCE_CHARS
            parts.append(sentence[:cut])
            sentence = sentence[cut:].strip()
        if sentence:
            parts.append(sentence)
    return parts
