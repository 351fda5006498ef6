"""espeak-ng, in process, from the ``espeakng-loader`` wheel (library and voice data; no system package).

espeak-ng keeps one global synthesiser per process, so syntheses run one at a
time on a single worker thread. In synchronous mode it calls back with ~100 ms
of audio at a time while it speaks; the callback hands each piece to the event
loop at once, so the first audio leaves long before the text is spoken, and
returns "abort" once the consumer has gone.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import espeakng_loader
import numpy as np

from modelplex.v1 import catalog_pb2
from modelplex_kit.errors import unavailable
from modelplex_speech.audio import Tempo
from modelplex_speech.settings import EspeakSettings

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_BUFFER_MS = 100
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE = 1  # espeakRATE, words per minute
_NORMAL_WPM, _MIN_WPM, _MAX_WPM = 175, 80, 450
_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


def split_speed(speed: float) -> tuple[int, float]:
    """espeak's words-per-minute for ``speed``, and the tempo factor left for FFmpeg beyond espeak's range."""
    wpm = round(min(_MAX_WPM, max(_MIN_WPM, _NORMAL_WPM * speed)))
    return wpm, speed * _NORMAL_WPM / wpm


class EspeakEngine:
    def __init__(self, settings: EspeakSettings) -> None:
        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self._lib.espeak_Initialize.restype = ctypes.c_int
        rate = self._lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS, espeakng_loader.get_data_path().encode(), 0
        )
        if rate <= 0:
            raise RuntimeError("espeak-ng failed to initialise (voice data missing?)")
        self.sample_rate = rate
        self._check_voices(settings.voice_list())
        self.capabilities = catalog_pb2.SpeechCapabilities(
            voices=settings.voice_list(), voice_aliases=settings.alias_map(), max_input_chars=settings.max_input_chars
        )
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="espeak")
        self._current: _Job | None = None
        # Kept referenced: espeak holds a raw pointer to it.
        self._callback = _Callback(self._on_audio)
        self._lib.espeak_SetSynthCallback(self._callback)

    def _check_voices(self, voices: list[str]) -> None:
        for voice in voices:  # a typo in the settings fails at startup, not on the first request
            if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise RuntimeError(f"espeak-ng has no voice {voice!r}")

    async def synthesize(self, text: str, *, voice: str, speed: float, instructions: str) -> AsyncIterator[np.ndarray]:
        job = _Job(asyncio.get_running_loop())
        done = asyncio.get_running_loop().run_in_executor(self._worker, self._speak, job, text, voice, speed or 1.0)
        try:
            while (chunk := await job.queue.get()) is not None:
                yield chunk
            await done
        finally:
            job.cancelled.set()  # stops espeak at its next callback if we left early

    def _speak(self, job: _Job, text: str, voice: str, speed: float) -> None:
        wpm, residual = split_speed(speed)
        job.tempo = Tempo(residual, self.sample_rate) if abs(residual - 1.0) > 0.01 else None
        try:
            if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise unavailable(f"espeak-ng could not load voice {voice!r}")
            self._lib.espeak_SetParameter(_RATE, wpm, 0)
            data = text.encode()
            self._current = job
            self._lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            if job.tempo is not None:
                job.put(job.tempo.process(None))
        finally:
            self._current = None
            job.put(None)

    def _on_audio(self, wav, count: int, events) -> int:
        job = self._current
        if job is None or job.cancelled.is_set():
            return 1  # abort synthesis
        if count > 0:
            pcm = np.ctypeslib.as_array(wav, shape=(count,)).copy()
            job.put(job.tempo.process(pcm) if job.tempo is not None else pcm)
        return 0

    async def close(self) -> None:
        if self._current is not None:
            self._current.cancelled.set()
        self._worker.shutdown(wait=True, cancel_futures=True)
        self._lib.espeak_Terminate()


class _Job:
    """One synthesis: the queue its audio goes to, and the flag that stops it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[np.ndarray | None] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.tempo: Tempo | None = None

    def put(self, chunk: np.ndarray | None) -> None:
        if chunk is None or len(chunk):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, chunk)
