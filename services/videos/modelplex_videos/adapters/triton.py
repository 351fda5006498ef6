"""triton: a text-to-video pipeline served by Triton (or any KServe v2 gRPC server).

The served model's contract (one request per job):

    inputs   prompt BYTES[1], width INT32[1], height INT32[1], seconds INT32[1], fps INT32[1], seed INT64[1];
             input_reference BYTES[1] (the first frame's guide image), sent only when the job has one
    outputs  video BYTES[1]: the clip, encoded (MP4; H.264 for browsers);
             progress FP32[1] (fraction done), from a decoupled model, in the responses before it

A decoupled model (Triton's model config says ``decoupled``; Triton refuses ModelInfer for it) is
called over ModelStreamInfer: each ``progress`` response moves the job's progress (and so renews its
lease, and notices a deleted job: the call is then cancelled, and the model stops), the response
with ``video`` ends it. Any other model answers once over ModelInfer, the job's lease kept by the
worker's heartbeat while that single, long call runs.

The backend decodes the returned clip with PyAV to check it and to cut the thumbnail and spritesheet.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import av
import grpc
import numpy as np
from tritonclient.grpc.aio import InferenceServerClient, InferResult
from tritonclient.utils import InferenceServerException

from modelplex_kit.errors import ServiceError
from modelplex_kit.kserve_v2 import stream_end, tensor, upstream_error
from modelplex_kit.pools.triton import TritonPool
from modelplex_videos import media
from modelplex_videos.engine import Progress, VideoArtifacts, VideoSpec
from modelplex_videos.settings import VideosSettings

OUTPUT = "video"
PROGRESS = "progress"


def signed_int64(value: int) -> int:
    """``value`` as INT64 carries it: unchanged in range (the procedural engine's seed, negative ones
    included), wrapped only beyond it."""
    return (value + 2**63) % 2**64 - 2**63


def video_inputs(spec: VideoSpec, fps: int) -> list:
    inputs = [
        tensor("prompt", spec.prompt.encode(), np.object_),
        tensor("width", spec.width, np.int32),
        tensor("height", spec.height, np.int32),
        tensor("seconds", spec.seconds, np.int32),
        tensor("fps", fps, np.int32),
        tensor("seed", signed_int64(spec.seed), np.int64),
    ]
    if spec.input_reference:
        inputs.append(tensor("input_reference", spec.input_reference, np.object_))
    return inputs


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
        self._decoupled: bool | None = None

    async def generate(self, spec: VideoSpec, progress: Progress) -> VideoArtifacts:
        inputs = video_inputs(spec, self._fps)
        if await self.decoupled():
            video = await self._streamed(inputs, progress)
        else:
            result = await self._pool.call(lambda client: self._infer_on(client, inputs))
            video = _video_of(result, self._model)
        artifacts = await asyncio.to_thread(artifacts_of, video, self._model)
        await progress(1.0)
        return artifacts

    async def decoupled(self) -> bool:
        """Asked once (not kept while the model cannot be asked: it may be loading)."""
        if self._decoupled is None:
            self._decoupled = await self._pool.call(self._read_decoupled)
        return self._decoupled

    async def _read_decoupled(self, client: InferenceServerClient) -> bool:
        try:
            reply = await client.get_model_config(self._model, client_timeout=self._timeout)
        except InferenceServerException as exc:
            if "UNIMPLEMENTED" in str(exc.status() or ""):
                return False  # no model config (KServe's ModelServer): one answer
            raise upstream_error(exc, self._model) from exc
        return reply.config.model_transaction_policy.decoupled

    async def _infer_on(self, client: InferenceServerClient, inputs: list) -> InferResult:
        try:
            return await client.infer(self._model, inputs, client_timeout=self._timeout)
        except InferenceServerException as exc:
            raise upstream_error(exc, self._model) from exc

    async def _streamed(self, inputs: list, progress: Progress) -> bytes:
        videos = [v async for v in self._pool.stream(lambda client: self._stream_on(client, inputs, progress))]
        return videos[-1]

    async def _stream_on(self, client: InferenceServerClient, inputs: list, progress: Progress) -> AsyncIterator[bytes]:
        async def one_request() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": self._model, "inputs": inputs, "request_id": uuid.uuid4().hex}

        responses = client.stream_infer(inputs_iterator=one_request(), stream_timeout=self._timeout)
        try:
            async for result, error in responses:
                if error is not None:  # in-band, and final: the request is over
                    await stream_end(responses)
                    raise upstream_error(error, self._model)
                if result.as_numpy(OUTPUT) is not None:
                    video = _video_of(result, self._model)
                    await stream_end(responses)  # cancelling before Triton ends it can wedge the model
                    yield video
                    return
                done = result.as_numpy(PROGRESS)
                if done is not None:
                    # Raises when the job is gone or no longer ours: the call is cancelled below.
                    await progress(float(done.reshape(-1)[0]))
        except grpc.aio.AioRpcError as exc:  # the stream itself failed: connection, deadline, server
            raise upstream_error(exc, self._model) from exc
        finally:
            responses.cancel()  # ends the call; when the job was left early, Triton cancels the request
        raise ServiceError(grpc.StatusCode.INTERNAL, f"Model `{self._model}` finished without a video.")

    async def ready(self) -> bool:
        return await self._pool.ready()

    async def close(self) -> None:
        await self._pool.close()


def _video_of(result: InferResult, model: str) -> bytes:
    output = result.as_numpy(OUTPUT)
    if output is None or output.dtype != np.object_:
        raise ServiceError(grpc.StatusCode.INTERNAL, f"Model `{model}` returned no `{OUTPUT}` bytes.")
    return output.reshape(-1)[0]
