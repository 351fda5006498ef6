"""A deterministic procedural picture, drawn from a prompt and a seed.

No text-to-image weights can be installed on a laptop-sized CPU box, so the
local default draws a composition instead: a gradient and shapes whose colours,
positions and sizes come from a hash of the prompt's words and the seed. The
same prompt and seed always give the same pixels; every word changes the
picture. Coarse-to-fine steps (fewer shapes at a lower resolution, scaled up)
stand in for a diffusion model's intermediate images.
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image, ImageDraw

from modelplex_images.engine import ImageSpec

# Shapes drawn per quality level: more detail costs more time, as with a real model.
_SHAPES = {"low": 12, "medium": 24, "standard": 24, "auto": 24, "high": 48, "hd": 48}


def _rng(spec: ImageSpec, salt: str = "") -> np.random.Generator:
    digest = hashlib.sha256(f"{spec.seed}\x00{spec.prompt}\x00{spec.style}\x00{salt}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _palette(spec: ImageSpec, count: int = 6) -> np.ndarray:
    colours = _rng(spec, "palette").integers(0, 256, size=(count, 3))
    if spec.style == "natural":  # muted: pulled towards grey
        colours = (colours * 0.6 + 128 * 0.4).astype(int)
    return colours


def _background(spec: ImageSpec, width: int, height: int, palette: np.ndarray) -> Image.Image:
    if spec.background == "transparent":
        return Image.new("RGBA", (width, height), (0, 0, 0, 0))
    angle = _rng(spec, "angle").uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (np.cos(angle) * xs / max(width, 1) + np.sin(angle) * ys / max(height, 1)) % 1.0
    pixels = palette[0] * (1 - t[..., None]) + palette[1] * t[..., None]
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def _shapes(spec: ImageSpec) -> list[tuple[str, tuple[float, ...], tuple[int, ...]]]:
    """(kind, box in 0..1 coordinates, colour) for every shape: one per word first, then seeded extras."""
    palette = _palette(spec)
    words = spec.prompt.lower().split() or [spec.prompt]
    count = max(_SHAPES.get(spec.quality, 24), len(words))
    shapes = []
    for i in range(count):
        rng = _rng(spec, f"shape{i}\x00{words[i % len(words)]}")
        x, y = rng.uniform(-0.1, 1.0, size=2)
        w, h = rng.uniform(0.05, 0.45, size=2)
        colour = (*tuple(int(c) for c in palette[2 + i % (len(palette) - 2)]), int(rng.integers(140, 256)))
        kind = ("ellipse", "rectangle", "triangle")[int(rng.integers(0, 3))]
        shapes.append((kind, (x, y, x + w, y + h), colour))
    return shapes


def _draw(canvas: Image.Image, shapes: list) -> Image.Image:
    layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    width, height = canvas.size
    for kind, (x0, y0, x1, y1), colour in shapes:
        box = (x0 * width, y0 * height, x1 * width, y1 * height)
        if kind == "ellipse":
            draw.ellipse(box, fill=colour)
        elif kind == "rectangle":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(box[0], box[3]), ((box[0] + box[2]) / 2, box[1]), (box[2], box[3])], fill=colour)
    composed = Image.alpha_composite(canvas.convert("RGBA"), layer)
    return composed if canvas.mode == "RGBA" else composed.convert("RGB")


def render_step(spec: ImageSpec, step: int, steps: int) -> Image.Image:
    """Step ``step`` of ``steps`` (the last is the finished image), always ``width`` x ``height``.

    Earlier steps draw fewer shapes at a coarser resolution, then scale up.
    """
    shapes = _shapes(spec)
    scale = 2 ** (steps - 1 - step)
    width, height = max(1, spec.width // scale), max(1, spec.height // scale)
    drawn = shapes[: max(1, len(shapes) * (step + 1) // steps)]
    image = _draw(_background(spec, width, height, _palette(spec)), drawn)
    if scale > 1:
        image = image.resize((spec.width, spec.height), Image.Resampling.NEAREST)
    return image
