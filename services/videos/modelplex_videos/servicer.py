"""The VideosService: job creation (idempotent, bounded), lookups scoped to the caller, and content download."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import AsyncIterator

import grpc

from modelplex.v1 import catalog_pb2, videos_pb2, videos_pb2_grpc
from modelplex_kit.errors import ServiceError, invalid
from modelplex_kit.modalities.videos import check_prompt, check_video_request
from modelplex_videos.content import PUBLIC_VARIANTS, VideoContent
from modelplex_videos.jobs import COMPLETED, FAILED, IN_PROGRESS, QUEUED, Job, JobStore, Limits, body_hash, new_job_id
from modelplex_videos.jobs import not_found as job_not_found

STATUS = {
    QUEUED: videos_pb2.VIDEO_STATUS_QUEUED,
    IN_PROGRESS: videos_pb2.VIDEO_STATUS_IN_PROGRESS,
    COMPLETED: videos_pb2.VIDEO_STATUS_COMPLETED,
    FAILED: videos_pb2.VIDEO_STATUS_FAILED,
}
MAX_LIST = 100


def to_proto(job: Job, deleted: bool = False, replayed: bool = False) -> videos_pb2.VideoJob:
    return videos_pb2.VideoJob(
        id=job.id, model=job.model, status=STATUS[job.status], progress=job.progress, created_at=job.created_at,
        completed_at=job.completed_at, expires_at=job.expires_at, width=job.width, height=job.height,
        seconds=job.seconds, prompt=job.prompt, error_code=job.error_code, error_message=job.error_message,
        principal_id=job.principal, remixed_from_video_id=job.remixed_from, expired=job.expired, deleted=deleted,
        replayed=replayed,
    )


def _principal(request) -> str:
    # The edge always sends one; a call without it could see nobody's jobs.
    if not request.meta.principal_id:
        raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "The request carries no principal.")
    return request.meta.principal_id


def _digest(request) -> str:
    """What makes two creates "the same request" for Idempotency-Key: every field but meta and the key."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("meta")
    copy.idempotency_key = ""
    return body_hash(copy.SerializeToString(deterministic=True))


class VideosServicer(videos_pb2_grpc.VideosServiceServicer):
    def __init__(
        self, store: JobStore, content: VideoContent, capabilities: catalog_pb2.VideosCapabilities, limits: Limits,
        on_queued=lambda: None,
    ) -> None:
        self._store, self._content, self._limits = store, content, limits
        self._capabilities = catalog_pb2.Capabilities(videos=capabilities)
        self._on_queued = on_queued

    async def _create(self, request, job: Job, reference: bytes = b"") -> tuple[Job, bool]:
        principal, key = job.principal, request.idempotency_key
        if key and (earlier := await self._store.reserve(principal, key, _digest(request))) is not None:
            return earlier, True
        try:
            if reference:
                job.has_reference = True
                await self._content.put(job.id, "reference", reference)
            job = await self._store.create(job, self._limits, key)
        except BaseException:
            if key:
                await self._store.unreserve(principal, key)
            await self._content.delete(job.id)
            raise
        self._on_queued()
        return job, False

    async def CreateVideo(self, request, context) -> videos_pb2.VideoJob:
        check_video_request(request, self._capabilities)
        seed = request.seed if request.HasField("seed") else secrets.randbits(62)
        job = Job(
            id=new_job_id(), principal=_principal(request), model=request.model, prompt=request.prompt,
            width=request.width, height=request.height, seconds=request.seconds, seed=seed,
        )
        job, replayed = await self._create(request, job, request.input_reference)
        return to_proto(job, replayed=replayed)

    async def RemixVideo(self, request, context) -> videos_pb2.VideoJob:
        check_prompt(request.prompt, self._capabilities.videos)
        principal = _principal(request)
        source = await self._store.get(principal, request.video_id)
        if source is None:
            raise job_not_found(request.video_id)
        if source.status != COMPLETED:
            raise invalid(f"Video '{source.id}' is {source.status}; only a completed video can be remixed.", "video_id")
        # Same look (the source's seed, size and length), new prompt: the remix is reproducible too.
        seed = int.from_bytes(hashlib.sha256(f"{source.seed}\x00{request.prompt}".encode()).digest()[:7], "big")
        job = Job(
            id=new_job_id(), principal=principal, model=source.model, prompt=request.prompt, width=source.width,
            height=source.height, seconds=source.seconds, seed=seed, remixed_from=source.id,
        )
        job, replayed = await self._create(request, job)
        return to_proto(job, replayed=replayed)

    async def GetVideo(self, request, context) -> videos_pb2.VideoJob:
        job = await self._store.get(_principal(request), request.video_id)
        if job is None:
            raise job_not_found(request.video_id)
        return to_proto(job)

    async def ListVideos(self, request, context) -> videos_pb2.ListVideosResponse:
        if request.order not in ("", "asc", "desc"):
            raise invalid("'order' must be 'asc' or 'desc'.", "order")
        limit = request.limit or 20
        if limit > MAX_LIST:
            raise invalid(f"'limit' must be between 1 and {MAX_LIST}.", "limit")
        jobs, has_more = await self._store.list(_principal(request), request.after, limit, request.order or "desc")
        return videos_pb2.ListVideosResponse(videos=[to_proto(job) for job in jobs], has_more=has_more)

    async def DeleteVideo(self, request, context) -> videos_pb2.VideoJob:
        job = await self._store.delete(_principal(request), request.video_id)
        if job is None:
            raise job_not_found(request.video_id)
        # A worker still rendering it notices at its next progress report and stops.
        await self._content.delete(job.id)
        return to_proto(job, deleted=True)

    async def DownloadVideoContent(self, request, context) -> AsyncIterator[videos_pb2.VideoContentChunk]:
        variant = request.variant or "video"
        if variant not in PUBLIC_VARIANTS:
            raise invalid(f"'variant' must be one of {', '.join(PUBLIC_VARIANTS)}.", "variant")
        job = await self._store.get(_principal(request), request.video_id)
        if job is None:
            raise job_not_found(request.video_id)
        if job.status != COMPLETED:
            raise invalid(f"Video '{job.id}' is {job.status}; its content is available once completed.", "video_id")
        stored = None if job.expired else await self._content.stat(job.id, variant)
        if stored is None:
            raise ServiceError(
                grpc.StatusCode.NOT_FOUND, f"The content of video '{job.id}' has expired.", code="content_expired"
            )
        offset, length = request.offset, request.length
        if request.suffix_length:
            offset, length = max(0, stored.size - request.suffix_length), 0
        header = videos_pb2.VideoContentChunk(
            mime_type=stored.content_type, total_size=stored.size, etag=stored.etag, offset=offset
        )
        if offset >= stored.size and stored.size:
            header.range_not_satisfiable = True
            yield header
            return
        length = min(length or stored.size, stored.size - offset)
        first = True
        async for chunk in self._content.read(job.id, variant, offset, length):
            message = videos_pb2.VideoContentChunk(data=chunk)
            if first:
                header.data = chunk
                message, first = header, False
            yield message
        if first:
            yield header
