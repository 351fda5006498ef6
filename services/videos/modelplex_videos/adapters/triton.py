"""triton: a text-to-video pipeline served by Triton (or any KServe v2 gRPC server).

The served model's contract (one request per job):

    inputs   prompt BYTES[1], width INT32[1], height INT32[1], seconds INT32[1], fps INT32[1], seed INT64[1]
    output   video BYTES[1]: the clip, encoded (MP4; H.264 for browsers)

The backend decodes the returned clip with PyAV to check it and to cut the
thumbnail and spritesheet. The job's lease is kept by the worker's heartbeat
while the (single, long) call runs.
"""

from __future__ import annotations

import asyncio

import av
import grpc
import numpy as np

from modelplex_kit.errors import ServiceError
from modelplex_kit.kserve_v2 import tensor
from modelplex_kit.pools.triton import TritonPool
from modelplex_videos import media
from modelplex_videos.engine import Progress, VideoArtifacts, VideoSpec
from modelplex_videos.settings import VideosSettings

OUTPUT = "video"


def video_inputs(spec: VideoSpec, fps: int) -> list:
    return [
        tensor("prompt", spec.prompt.encode(), np.object_),
        tensor("width", spec.width, np.int32),
        tensor("height", spec.height, np.int32),
        tensor("seconds", spec.seconds, np.int32),
        tensor("fps", fps, np.int32),
        tensor("seed", spec.seed % 2**63, np.int64),
    ]


def artifacts_of(video: bytes, model: str) -> VideoArtifacts:
    try:
        frames = media.decode_frames(video)
    except (av.FFmpegError, ValueError) as exc:
        raise ServiceError(grpc.StatusCode.INTERNAL, f"Model `{model}` returned no decodable video: {exc}") from None
    if not frames:
        raise ServiceError(grpc.StatusCode.INTERNAL, f"Model `{model}` returned a video without frames.")
    return VideoArtifacts(video, media.thumbnail(frames[len(frames) // 2]), media.spritesheet(frames))


class TritonVideosEngine:
    def __init__(self, settings: VideosSettings) -> None:
        if not settings.upstream_url or not settings.upstream_model:
            raise SystemExit("videos: engine triton needs upstream_url and upstream_model")
        self._model, self._timeout, self._fps = settings.upstream_model, settings.upstream_timeout_seconds, settings.fps
        self._pool = TritonPool("videos", settings, self._model)

    async def generate(self, spec: VideoSpec, progress: Progress) -> VideoArtifacts:
        result = await self._pool.infer(self._model, video_inputs(spec, self._fps), client_timeout=self._timeout)
        output = result.as_numpy(OUTPUT)
        if output is None or output.dtype != np.object_:
            raise ServiceError(grpc.StatusCode.INTERNAL, f"Model `{self._model}` returned no `{OUTPUT}` bytes.")
        artifacts = await asyncio.to_thread(artifacts_of, output.reshape(-1)[0], self._model)
        await progress(1.0)
        return artifacts

    async def ready(self) -> bool:
        return await self._pool.ready()

    async def close(self) -> None:
        await self._pool.close()
