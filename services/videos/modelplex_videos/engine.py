"""The engine protocol every videos adapter implements.

An engine turns one :class:`VideoSpec` into a finished MP4 and its previews.
The job machinery (queue, leases, retries, progress, content store) lives in
``jobs``/``worker``; adapters own nothing but the rendering runtime.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

#: Called with the fraction done (0..1). It raises (e.g. ``JobGone``) when the job
#: was deleted or its claim lost: the engine must let that propagate and stop.
Progress = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class VideoSpec:
    prompt: str
    width: int
    height: int
    seconds: int
    seed: int
    #: Optional first-frame guide image, as uploaded (b"" when none).
    input_reference: bytes = b""


@dataclass(frozen=True, slots=True)
class VideoArtifacts:
    #: H.264 in an MP4 container.
    video: bytes
    #: One still (WebP).
    thumbnail: bytes
    #: A grid of frames (JPEG).
    spritesheet: bytes


class VideosEngine(Protocol):
    async def generate(self, spec: VideoSpec, progress: Progress) -> VideoArtifacts:
        """Renders the whole clip.

        Contract:
        - calls ``progress`` now and then with a growing fraction (and lets
          whatever it raises propagate: the job is gone or no longer ours);
        - the same spec gives the same video where the runtime is
          deterministic (the procedural renderer is);
        - raises ``ServiceError`` for a spec it cannot serve (the job fails
          with that message) and ``unavailable`` when its runtime went away
          (the job is retried);
        - cancellation stops the work promptly.
        """
        ...

    async def close(self) -> None: ...
