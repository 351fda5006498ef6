"""Uploaded file -> 16 kHz mono int16 PCM, streamed and bounded, with PyAV (FFmpeg's demuxers and codecs).

Decoding is where untrusted bytes meet native code, so it is bounded three ways:
the file size (the edge refuses more than 25 MB), the audio length (more than
``max_audio_seconds`` is a 400, noticed from the container's header when it says
so and while decoding when it lies) and the wall-clock time (``decode_timeout``).
PCM is produced in chunks as it is decoded, so an engine that recognises as it
goes (pocketsphinx) never holds the whole file's samples at once.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import av
import numpy as np

from modelplex_kit.errors import ServiceError, invalid

SAMPLE_RATE = 16000
_FFMPEG_ERRORS = (av.error.FFmpegError, ValueError, IndexError, OSError)


@dataclass
class Limits:
    max_audio_seconds: float
    decode_timeout_seconds: float


@dataclass
class AudioSource:
    """One uploaded file. ``chunks`` decodes it (once); ``seconds`` is what has been decoded so far."""

    data: bytes
    filename: str
    limits: Limits
    seconds: float = field(default=0.0, init=False)

    def chunks(self) -> Iterator[np.ndarray]:
        deadline = time.monotonic() + self.limits.decode_timeout_seconds
        max_samples = int(self.limits.max_audio_seconds * SAMPLE_RATE)
        decoded = 0
        try:
            container = av.open(io.BytesIO(self.data), mode="r", metadata_errors="ignore")
        except _FFMPEG_ERRORS:
            raise _not_audio(self.filename) from None
        with container:
            stream = _audio_stream(container, self.filename)
            self._refuse_if_declared_too_long(container)
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            for frame in _frames(container, stream, self.filename):
                for out in resampler.resample(frame) if frame is not None else resampler.resample(None):
                    pcm = out.to_ndarray().reshape(-1)
                    decoded += len(pcm)
                    self.seconds = decoded / SAMPLE_RATE
                    if decoded > max_samples:
                        raise self._too_long()
                    yield pcm
                if time.monotonic() > deadline:
                    raise invalid(
                        f"Decoding 'file' took longer than {self.limits.decode_timeout_seconds:g} seconds.", "file"
                    )
        if decoded == 0:
            raise invalid("'file' contains no audio samples.", "file")

    def decode_all(self) -> np.ndarray:
        """The whole file (for engines that take it at once); bounded by ``max_audio_seconds``."""
        parts = list(self.chunks())
        return np.concatenate(parts) if parts else np.zeros(0, np.int16)

    def measure(self) -> float:
        """Decodes the file only to check it (a 400 if corrupt or too long) and returns its length in seconds.

        Remote engines call it before the upload: the bounds and the seconds metered must not depend on
        what the upstream server happens to check or report."""
        for _ in self.chunks():
            pass
        return self.seconds

    def _refuse_if_declared_too_long(self, container) -> None:
        if container.duration is not None and container.duration / av.time_base > self.limits.max_audio_seconds:
            raise self._too_long()

    def _too_long(self) -> ServiceError:
        return invalid(
            f"'file' is longer than {self.limits.max_audio_seconds:g} seconds of audio, this model's limit.",
            "file",
            code="audio_too_long",
        )


def _audio_stream(container, filename: str):
    if not container.streams.audio:
        raise invalid(f"'{filename or 'file'}' has no audio track.", "file")
    return container.streams.audio[0]


def _frames(container, stream, filename: str) -> Iterator:
    """Decoded frames, then None (the resampler's flush); a broken file is a 400, never a 500."""
    try:
        for packet in container.demux(stream):
            yield from packet.decode()
    except _FFMPEG_ERRORS:
        raise _not_audio(filename) from None
    yield None


def _not_audio(filename: str) -> ServiceError:
    return invalid(
        f"Could not decode '{filename or 'file'}' as audio. Supported formats: flac, m4a, mp3, mp4, mpeg, mpga, "
        "oga, ogg, wav, webm.",
        "file",
        code="invalid_audio",
    )
