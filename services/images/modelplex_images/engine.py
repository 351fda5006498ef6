"""The engine protocol every images adapter implements.

An engine turns one :class:`ImageSpec` into pixels. The servicer owns request
checks, the ``n`` loop, encoding (Pillow: png, jpeg, webp), usage and the gRPC
surface; adapters own nothing but the rendering runtime.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from PIL import Image


@dataclass(frozen=True, slots=True)
class ImageSpec:
    prompt: str
    width: int
    height: int
    #: Always set: the servicer draws one when the request has none (and derives one per image of ``n``).
    seed: int
    quality: str = "auto"
    style: str = ""
    #: transparent, opaque or auto.
    background: str = "auto"
    negative_prompt: str = ""
    #: Intermediate renders wanted before the final image (0: none).
    partial_images: int = 0


@dataclass(frozen=True, slots=True)
class Rendered:
    image: Image.Image
    #: False for an intermediate step, True for the finished image (always the last).
    final: bool
    #: The prompt the engine actually used, where it rewrote it ("" otherwise).
    revised_prompt: str = ""


class ImagesEngine(Protocol):
    #: Sizes and limits this engine really serves; requests beyond them get a 400.
    max_partial_images: int

    def render(self, spec: ImageSpec) -> AsyncIterator[Rendered]:
        """Renders one image, yielding steps as the engine produces them.

        Streaming contract:
        - at most ``min(spec.partial_images, max_partial_images)`` intermediate
          steps (``final=False``), coarse to fine, then exactly one final step;
        - the final image is exactly ``width`` x ``height``; RGBA when
          ``background == "transparent"``, RGB otherwise;
        - the same spec (seed included) gives the same pixels, where the
          runtime is deterministic (the procedural renderer is);
        - a spec the engine cannot serve raises ``ServiceError`` before the
          first step; an engine gone away raises ``unavailable`` at any point;
        - if the consumer stops early (``aclose()``, cancellation), the engine
          stops working on the image promptly.
        """
        ...

    async def close(self) -> None:
        """Releases the engine's connections and threads."""
        ...
