"""procedural: the local CPU default, a deterministic renderer (see modelplex_images.procedural)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from modelplex_images.engine import ImageSpec, Rendered
from modelplex_images.procedural import render_step
from modelplex_images.settings import ImagesSettings


class ProceduralEngine:
    max_partial_images = 3

    def __init__(self, settings: ImagesSettings) -> None:
        self._settings = settings

    async def render(self, spec: ImageSpec) -> AsyncIterator[Rendered]:
        steps = min(spec.partial_images, self.max_partial_images) + 1
        for step in range(steps):
            # Off the event loop: a large image takes tens of milliseconds.
            image = await asyncio.to_thread(render_step, spec, step, steps)
            yield Rendered(image, final=step == steps - 1)

    async def close(self) -> None:
        return None
