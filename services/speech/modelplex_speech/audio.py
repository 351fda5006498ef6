"""Raw PCM -> the response format, incrementally, with PyAV (FFmpeg's codecs and muxers).

Every format is produced as a stream: each ``encode`` returns the bytes the
muxer has written so far, so audio leaves while later sentences are still being
synthesised. Containers are written to a non-seekable sink, as to a socket, so
FFmpeg writes streamable headers (WAV's length fields say "unknown", as
OpenAI's streamed WAV does).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np

# OpenAI's output rate; `pcm` is raw 16-bit little-endian mono at this rate.
OUTPUT_RATE = 24000


@dataclass(frozen=True, slots=True)
class Format:
    mime_type: str
    container: str | None  # None: raw samples, no container
    codec: str


FORMATS: dict[str, Format] = {
    "mp3": Format("audio/mpeg", "mp3", "libmp3lame"),
    "opus": Format("audio/ogg", "ogg", "libopus"),
    "aac": Format("audio/aac", "adts", "aac"),
    "flac": Format("audio/flac", "flac", "flac"),
    "wav": Format("audio/wav", "wav", "pcm_s16le"),
    "pcm": Format("audio/pcm", None, "pcm_s16le"),
}


class _Sink(io.RawIOBase):
    """A write-only, non-seekable file that hands back what was written since the last take()."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


def _frame(pcm: np.ndarray, rate: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = rate
    return frame


class Encoder:
    """Resamples mono int16 PCM at ``input_rate`` to 24 kHz and encodes it as ``response_format``."""

    def __init__(self, response_format: str, input_rate: int) -> None:
        self.format = FORMATS[response_format]
        self._input_rate = input_rate
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=OUTPUT_RATE)
        self._sink = _Sink()
        self._container = None
        self._stream = None
        if self.format.container is not None:
            # Flushed packets (and small Ogg pages): bytes leave per sentence, not at the end.
            options = {"flush_packets": "1"} | ({"page_duration": "100000"} if self.format.container == "ogg" else {})
            self._container = av.open(self._sink, mode="w", format=self.format.container, options=options)
            self._stream = self._container.add_stream(self.format.codec, rate=OUTPUT_RATE, layout="mono")

    def encode(self, pcm: np.ndarray) -> bytes:
        return self._write(self._resampler.resample(_frame(pcm, self._input_rate)))

    def finish(self) -> bytes:
        """Flushes the resampler, the codec and the muxer; the encoder is done afterwards."""
        data = self._write(self._resampler.resample(None))
        if self._container is None:
            return data
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return data + self._sink.take()

    def _write(self, frames: list[av.AudioFrame]) -> bytes:
        if self._container is None:
            return b"".join(frame.to_ndarray().astype("<i2").tobytes() for frame in frames)
        for frame in frames:
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        return self._sink.take()


class Tempo:
    """Changes speed without changing pitch (FFmpeg's atempo), for speeds an engine cannot reach itself."""

    def __init__(self, factor: float, rate: int) -> None:
        self._graph = av.filter.Graph()
        source = self._graph.add_abuffer(format="s16", sample_rate=rate, layout="mono", time_base=f"1/{rate}")
        tempo = self._graph.add("atempo", f"{factor:.6f}")
        sink = self._graph.add("abuffersink")
        source.link_to(tempo)
        tempo.link_to(sink)
        self._graph.configure()
        self._rate = rate
        self._pts = 0

    def process(self, pcm: np.ndarray | None) -> np.ndarray:
        if pcm is None:
            self._graph.push(None)
        else:
            frame = _frame(pcm, self._rate)
            frame.pts, self._pts = self._pts, self._pts + len(pcm)
            self._graph.push(frame)
        out = []
        while True:
            try:
                out.append(self._graph.pull().to_ndarray().reshape(-1))
            except (av.BlockingIOError, av.EOFError):
                break
        return np.concatenate(out).astype(np.int16) if out else np.zeros(0, np.int16)
