"""The engine protocol every speech adapter implements.

Adapters turn text into raw audio; the servicer owns the request check,
sentence splitting, resampling and encoding (PyAV), so every engine gets
every output format and streaming for free.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import numpy as np

from modelplex.v1 import catalog_pb2


class SpeechEngine(Protocol):
    #: Voices, aliases and limits this engine really has; requests beyond them get a 400.
    capabilities: catalog_pb2.SpeechCapabilities
    #: Sample rate of the PCM that ``synthesize`` yields.
    sample_rate: int

    def synthesize(self, text: str, *, voice: str, speed: float, instructions: str) -> AsyncIterator[np.ndarray]:
        """Speaks ``text`` (one sentence or a few) and yields mono int16 PCM as it is produced.

        Streaming contract:
        - zero or more non-empty int16 arrays at ``sample_rate``, in order; the
          first should leave as soon as the engine has it (not after the whole text);
        - ``voice`` is one of ``capabilities.voices`` (aliases are resolved before);
          ``speed`` is in [0.25, 4.0];
        - a request the engine cannot serve raises ``ServiceError`` (400s) before the
          first chunk, or ``unavailable`` at any point when the engine went away;
        - if the consumer stops early (``aclose()``, cancellation) the engine stops
          synthesising promptly.
        """
        ...

    async def close(self) -> None:
        """Releases the engine's connections, threads and memory."""
        ...
