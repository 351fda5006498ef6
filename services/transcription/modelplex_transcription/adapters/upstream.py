"""What the remote engines (openai, triton) share: their capabilities, and the local decode before the call.

The file is decoded here even though the upstream decodes it again: a corrupt file
is a 400 naming ``file`` (not whatever the upstream says), ``max_audio_seconds``
and the decode timeout hold whatever the upstream checks, and the seconds metered
are measured, not taken from the upstream's report (vLLM rounds them; Triton has none).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from modelplex.v1 import catalog_pb2
from modelplex_transcription.decode import AudioSource
from modelplex_transcription.settings import UpstreamSettings


def upstream_capabilities(settings: UpstreamSettings) -> catalog_pb2.TranscriptionCapabilities:
    return catalog_pb2.TranscriptionCapabilities(
        translate=settings.upstream_translates,
        languages=settings.language_list(),
        word_timestamps=settings.upstream_word_timestamps,
        max_audio_seconds=settings.max_audio_seconds,
    )


class Decoding:
    """Bounded decoding on a pool of ``max_concurrency`` threads (FFmpeg releases the GIL)."""

    def __init__(self, settings: UpstreamSettings, name: str) -> None:
        self._pool = ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix=name)

    async def measure(self, audio: AudioSource) -> float:
        return await asyncio.get_running_loop().run_in_executor(self._pool, audio.measure)

    async def samples(self, audio: AudioSource) -> np.ndarray:
        """The whole file as 16 kHz mono int16 PCM."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, audio.decode_all)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
