"""Encoding with PyAV (FFmpeg): H.264 MP4 from frames, and the previews of a clip."""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import av
import numpy as np
from PIL import Image

# Frames in a spritesheet, and its columns / frame width.
SPRITE_FRAMES = 10
SPRITE_COLUMNS = 5
SPRITE_WIDTH = 160


class Mp4Writer:
    """H.264 (libx264, yuv420p) in MP4, with the index up front so players can stream it.

    Frames are added in batches (each batch may run in a worker thread; batches run
    one after another). One encoder thread: x264's output is then reproducible.
    """

    def __init__(self, width: int, height: int, fps: int) -> None:
        # A real file: moving the index to the front (faststart) rewrites it in a second pass.
        self._dir = tempfile.TemporaryDirectory(prefix="modelplex-mp4-")
        self._path = Path(self._dir.name) / "video.mp4"
        self._container = av.open(str(self._path), "w", format="mp4", options={"movflags": "+faststart"})
        self._stream = self._container.add_stream("libx264", rate=fps)
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
        self._stream.codec_context.thread_count = 1
        self._stream.codec_context.options = {"preset": "veryfast", "crf": "23"}

    def add(self, frames: Iterable[np.ndarray]) -> None:
        for pixels in frames:
            for packet in self._stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                self._container.mux(packet)

    def finish(self) -> bytes:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        try:
            return self._path.read_bytes()
        finally:
            self._dir.cleanup()

    def abandon(self) -> None:
        try:
            self._container.close()
        except (av.FFmpegError, ValueError):
            pass
        self._dir.cleanup()


def encode_mp4(frames: Iterable[np.ndarray], width: int, height: int, fps: int) -> bytes:
    writer = Mp4Writer(width, height, fps)
    writer.add(frames)
    return writer.finish()


def decode_frames(mp4: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(mp4)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def thumbnail(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, "WEBP", quality=80)
    return buffer.getvalue()


def spritesheet(frames: Sequence[np.ndarray]) -> bytes:
    """Evenly spaced frames in a grid, as one JPEG."""
    picks = [frames[i] for i in np.linspace(0, len(frames) - 1, min(SPRITE_FRAMES, len(frames))).astype(int)]
    height = max(1, round(SPRITE_WIDTH * picks[0].shape[0] / picks[0].shape[1]))
    rows = -(-len(picks) // SPRITE_COLUMNS)
    sheet = Image.new("RGB", (SPRITE_WIDTH * min(SPRITE_COLUMNS, len(picks)), height * rows))
    for i, frame in enumerate(picks):
        tile = Image.fromarray(frame).resize((SPRITE_WIDTH, height), Image.Resampling.BILINEAR)
        sheet.paste(tile, ((i % SPRITE_COLUMNS) * SPRITE_WIDTH, (i // SPRITE_COLUMNS) * height))
    buffer = io.BytesIO()
    sheet.save(buffer, "JPEG", quality=80)
    return buffer.getvalue()
