"""pocketsphinx with its bundled en-us acoustic model, language model and dictionary (no download).

Audio is recognised as it is decoded: a voice-activity endpointer cuts the
stream into utterances (and cuts continuous speech every
``max_utterance_seconds``), each is recognised on its own and becomes one
segment, so a long file streams segment by segment and its samples are never
all in memory. Decoders are not thread-safe and take a second to load: a
fixed pool, one per worker thread.
"""

from __future__ import annotations

import asyncio
import queue
import re
import threading
import zlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from pocketsphinx import Decoder, Endpointer

from modelplex.v1 import catalog_pb2, transcription_pb2
from modelplex_transcription.decode import SAMPLE_RATE, AudioSource
from modelplex_transcription.engine import EngineEvent, Finished
from modelplex_transcription.settings import PocketsphinxSettings

_FRAMES_PER_SECOND = 100  # pocketsphinx's default frame rate (-frate)
_FILLERS = re.compile(r"^(<s>|</s>|<sil>|\[\w+\]|\+\w+\+)$")
_ALTERNATE = re.compile(r"\(\d+\)$")  # "read(2)": the dictionary's second pronunciation


class PocketsphinxEngine:
    def __init__(self, settings: PocketsphinxSettings) -> None:
        self.capabilities = catalog_pb2.TranscriptionCapabilities(
            languages=["en"], word_timestamps=True, max_audio_seconds=settings.max_audio_seconds
        )
        self._max_utterance = settings.max_utterance_seconds
        self._workers = ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="pocketsphinx")
        self._decoders: queue.SimpleQueue[Decoder] = queue.SimpleQueue()
        for _ in range(settings.max_concurrency):
            self._decoders.put(Decoder(samprate=SAMPLE_RATE, loglevel="FATAL"))

    async def transcribe(
        self, request: transcription_pb2.TranscribeRequest, audio: AudioSource, *, incremental: bool = False
    ) -> AsyncIterator[EngineEvent]:
        # Segments are timed and yielded as recognised either way: `incremental` changes nothing here.
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def emit(event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        work = loop.run_in_executor(self._workers, self._run, request, audio, emit, stop)
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait((getter, work), return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():  # the worker ended (or failed) with nothing more queued
                    getter.cancel()
                    await work  # raises the worker's ServiceError, if any
                    while not events.empty():
                        yield events.get_nowait()
                    return
                yield getter.result()
        finally:
            stop.set()

    def _run(self, request, audio: AudioSource, emit, stop: threading.Event) -> None:
        decoder = self._decoders.get()
        try:
            _Recognition(decoder, request.word_timestamps, self._max_utterance, emit, stop).run(audio)
            emit(Finished(language="english", duration_seconds=audio.seconds))
        finally:
            self._decoders.put(decoder)

    async def close(self) -> None:
        self._workers.shutdown(wait=True, cancel_futures=True)


class _Recognition:
    """One file: endpointing, then one recognition per utterance."""

    def __init__(self, decoder: Decoder, words: bool, max_utterance: float, emit, stop: threading.Event) -> None:
        self.decoder, self.words, self.emit, self.stop = decoder, words, emit, stop
        self.endpointer = Endpointer(sample_rate=SAMPLE_RATE)
        self.max_frames = int(max_utterance / self.endpointer.frame_length)
        self.utterance: list[bytes] = []
        self.start = 0.0
        self.segments = 0

    def run(self, audio: AudioSource) -> None:
        pending = b""
        size = self.endpointer.frame_bytes
        for pcm in audio.chunks():
            if self.stop.is_set():
                return
            pending += pcm.tobytes()
            whole = len(pending) - len(pending) % size
            for offset in range(0, whole, size):
                self._frame(self.endpointer.process(pending[offset : offset + size]))
            pending = pending[whole:]
        if pending:  # a partial last frame (end_stream refuses an empty one)
            self._frame(self.endpointer.end_stream(pending))
        self._flush()

    def _frame(self, speech: bytes | None) -> None:
        if speech is not None:
            if not self.utterance:
                self.start = self.endpointer.speech_start
            self.utterance.append(speech)
        if self.utterance and (not self.endpointer.in_speech or len(self.utterance) >= self.max_frames):
            self._flush()

    def _flush(self) -> None:
        if not self.utterance:
            return
        pcm, start = b"".join(self.utterance), self.start
        self.utterance, self.start = [], start + len(pcm) / 2 / SAMPLE_RATE
        self.decoder.start_utt()
        self.decoder.process_raw(pcm, False, True)
        self.decoder.end_utt()
        hypothesis = self.decoder.hyp()
        text = hypothesis.hypstr.strip() if hypothesis is not None else ""
        if not text:
            return
        end = start + len(pcm) / 2 / SAMPLE_RATE
        self.emit(self._segment(text, start, end))
        if self.words:
            for word in self.decoder.seg():
                if not _FILLERS.match(word.word):
                    self.emit(
                        transcription_pb2.TranscriptWord(
                            word=_ALTERNATE.sub("", word.word),
                            start=start + word.start_frame / _FRAMES_PER_SECOND,
                            end=start + (word.end_frame + 1) / _FRAMES_PER_SECOND,
                        )
                    )

    def _segment(self, text: str, start: float, end: float) -> transcription_pb2.TranscriptSegment:
        # No avg_logprob / no_speech_prob: pocketsphinx has no per-token probabilities comparable to Whisper's.
        segment = transcription_pb2.TranscriptSegment(
            id=self.segments,
            seek=int(start * _FRAMES_PER_SECOND),
            start=start,
            end=end,
            text=(" " if self.segments else "") + text,
            compression_ratio=len(text.encode()) / len(zlib.compress(text.encode())),
        )
        self.segments += 1
        return segment
