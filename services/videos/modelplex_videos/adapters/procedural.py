"""procedural-video: frames drawn on the CPU (modelplex_videos.procedural), encoded to H.264 with PyAV."""

from __future__ import annotations

import asyncio

import numpy as np

from modelplex_videos import media
from modelplex_videos.engine import Progress, VideoArtifacts, VideoSpec
from modelplex_videos.procedural import FrameRenderer
from modelplex_videos.settings import VideosSettings


class ProceduralVideoEngine:
    def __init__(self, settings: VideosSettings) -> None:
        self._fps = settings.fps

    async def generate(self, spec: VideoSpec, progress: Progress) -> VideoArtifacts:
        renderer = FrameRenderer(spec, self._fps)
        writer = media.Mp4Writer(spec.width, spec.height, self._fps)
        kept: list[np.ndarray] = []  # every fps-th frame, for the previews
        try:
            # One second of frames per step, off the event loop; progress (and so a
            # deleted job or a lost claim) is noticed between steps.
            for start in range(0, renderer.frame_count, self._fps):
                frames = await asyncio.to_thread(_render, renderer, start, self._fps)
                await asyncio.to_thread(writer.add, frames)
                kept.append(frames[0])
                await progress(min(1.0, (start + self._fps) / renderer.frame_count))
            video = await asyncio.to_thread(writer.finish)
        except BaseException:
            writer.abandon()
            raise
        thumbnail = await asyncio.to_thread(media.thumbnail, kept[len(kept) // 2])
        sheet = await asyncio.to_thread(media.spritesheet, kept)
        return VideoArtifacts(video=video, thumbnail=thumbnail, spritesheet=sheet)

    async def close(self) -> None:
        return None


def _render(renderer: FrameRenderer, start: int, count: int) -> list[np.ndarray]:
    return [renderer.frame(i) for i in range(start, min(start + count, renderer.frame_count))]
