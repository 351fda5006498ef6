"""Deterministic procedural frames, drawn from a prompt and a seed.

No text-to-video weights can run on a CPU box, so the local default animates a
composition: a drifting gradient and shapes on Lissajous paths whose colours,
sizes and speeds come from a hash of the prompt's words and the seed. Same
prompt and seed, same frames. An input reference image, when given, is the
first frame's backdrop and fades out over the first second.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from modelplex_videos.engine import VideoSpec


@dataclass(frozen=True, slots=True)
class _Sprite:
    colour: tuple[int, int, int]
    radius: float  # fraction of the shorter side
    freq: tuple[float, float]
    phase: tuple[float, float]


def _rng(spec: VideoSpec, salt: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{spec.seed}\x00{spec.prompt}\x00{salt}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


class FrameRenderer:
    def __init__(self, spec: VideoSpec, fps: int) -> None:
        self.spec, self.fps = spec, fps
        self.frame_count = spec.seconds * fps
        palette = _rng(spec, "palette").integers(0, 256, size=(2, 3)).astype(np.float32)
        # A gradient twice as wide as the frame: each frame shows a slice of it, drifting.
        ramp = np.abs(np.linspace(-1.0, 1.0, 2 * spec.width, dtype=np.float32))[None, :, None]
        row = (palette[0] * (1 - ramp) + palette[1] * ramp).astype(np.uint8)
        self._backdrop = np.repeat(row, spec.height, axis=0)
        words = spec.prompt.lower().split() or [spec.prompt]
        self._sprites = [self._sprite(word, i) for i, word in enumerate((words * 6)[: max(6, len(words))])]
        self._reference = self._load_reference(spec.input_reference)

    def _sprite(self, word: str, i: int) -> _Sprite:
        rng = _rng(self.spec, f"sprite{i}\x00{word}")
        return _Sprite(
            colour=tuple(int(c) for c in rng.integers(0, 256, size=3)),
            radius=float(rng.uniform(0.04, 0.15)),
            freq=tuple(float(f) for f in rng.uniform(0.1, 0.6, size=2)),
            phase=tuple(float(p) for p in rng.uniform(0, 2 * np.pi, size=2)),
        )

    def _load_reference(self, data: bytes) -> np.ndarray | None:
        if not data:
            return None
        image = Image.open(io.BytesIO(data)).convert("RGB").resize((self.spec.width, self.spec.height))
        return np.asarray(image, dtype=np.float32)

    def frame(self, index: int) -> np.ndarray:
        t = index / self.fps
        width, height = self.spec.width, self.spec.height
        shift = int(t * width / 8) % width
        pixels = self._backdrop[:, shift : shift + width]
        if self._reference is not None and t < 1.0:
            pixels = (self._reference * (1 - t) + pixels * t).astype(np.uint8)
        image = Image.fromarray(np.ascontiguousarray(pixels))
        draw = ImageDraw.Draw(image)
        side = min(width, height)
        for sprite in self._sprites:
            x = (0.5 + 0.4 * np.sin(2 * np.pi * sprite.freq[0] * t + sprite.phase[0])) * width
            y = (0.5 + 0.4 * np.sin(2 * np.pi * sprite.freq[1] * t + sprite.phase[1])) * height
            r = sprite.radius * side
            draw.ellipse((x - r, y - r, x + r, y + r), fill=sprite.colour)
        return np.asarray(image)
