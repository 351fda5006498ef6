"""A bounded pool of workers rendering claimed jobs, and the sweeper that expires content."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import grpc

from modelplex_kit.errors import ServiceError
from modelplex_videos.content import VideoContent
from modelplex_videos.engine import VideosEngine, VideoSpec
from modelplex_videos.jobs import Job, JobStore
from modelplex_videos.settings import VideosSettings

log = logging.getLogger(__name__)


class JobGone(Exception):
    """The job was deleted, or its lease passed to another worker: stop rendering it."""


class _Claim:
    """A claimed job's lease, renewed on progress and by a heartbeat."""

    def __init__(self, store: JobStore, job: Job, worker: str, lease_seconds: float) -> None:
        self.store, self.job, self.worker, self.lease = store, job, worker, lease_seconds
        self.progress = 0

    async def report(self, fraction: float) -> None:
        percent = min(99, int(fraction * 100))  # 100 only once the content is stored
        if percent > self.progress:
            self.progress = percent
            await self.renew()

    async def renew(self) -> None:
        if not await self.store.renew(self.job.id, self.worker, self.progress, self.lease):
            raise JobGone(self.job.id)

    async def heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            await self.renew()


class WorkerPool:
    def __init__(self, store: JobStore, content: VideoContent, engine: VideosEngine, settings: VideosSettings) -> None:
        self._store, self._content, self._engine, self._settings = store, content, engine, settings
        self.worker_id = f"{uuid.uuid4().hex[:12]}"
        self._tasks: list[asyncio.Task] = []
        self._wake = asyncio.Event()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(i)) for i in range(self._settings.workers)]
        self._tasks.append(asyncio.create_task(self._sweep()))

    def wake(self) -> None:
        """A job was queued: idle workers look now instead of at their next poll."""
        self._wake.set()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _work(self, index: int) -> None:
        worker = f"{self.worker_id}-{index}"
        while True:
            job = await self._store.claim(worker, self._settings.lease_seconds)
            if job is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._settings.poll_seconds)
                continue
            try:
                engine_unavailable = await self._run(_Claim(self._store, job, worker, self._settings.lease_seconds))
                if engine_unavailable:
                    await asyncio.sleep(self._settings.unavailable_backoff_seconds)
            except Exception:  # the store itself failed: keep the worker alive, the lease will expire
                log.exception("video job bookkeeping failed", extra={"video_id": job.id})
                await asyncio.sleep(self._settings.poll_seconds)

    async def _run(self, claim: _Claim) -> bool:
        """Renders one claimed job; True when the engine was unavailable and the job went back to the queue."""
        job = claim.job
        log.info("rendering video", extra={"video_id": job.id, "attempt": job.attempts})
        reference = await self._content.read_all(job.id, "reference") if job.has_reference else b""
        spec = VideoSpec(job.prompt, job.width, job.height, job.seconds, job.seed, reference)
        render = asyncio.create_task(self._engine.generate(spec, claim.report))
        heartbeat = asyncio.create_task(claim.heartbeat())
        try:
            await asyncio.wait((render, heartbeat), return_when=asyncio.FIRST_COMPLETED)
            if not render.done():  # the heartbeat found the job gone
                render.cancel()
                log.info("video job gone; rendering stopped", extra={"video_id": job.id})
                return False
            artifacts = render.result()
        except JobGone:
            log.info("video job gone; rendering stopped", extra={"video_id": job.id})
            return False
        except ServiceError as exc:
            if exc.status == grpc.StatusCode.UNAVAILABLE:
                await self._store.release(job.id, claim.worker)
                return True
            await self._store.fail(job.id, claim.worker, exc.code or "invalid_request", exc.message)
            return False
        except Exception:
            log.exception("video generation failed", extra={"video_id": job.id})
            await self._store.fail(job.id, claim.worker, "internal_error", "Video generation failed.")
            return False
        finally:
            heartbeat.cancel()
            render.cancel()
            # A failed render's Task holds its exception, whose traceback holds this frame, which
            # holds the Task: a cycle that kept the spec (a 24 MB input_reference) until Python's
            # rare full collection, ~15 MB more resident per failed job. Dropping the Task breaks it.
            render = heartbeat = None
        await self._publish(claim, artifacts)
        return False

    async def _publish(self, claim: _Claim, artifacts) -> None:
        job = claim.job
        # The objects carry the job's expiry too, so a store listing shows when they go.
        expires_at = int(time.time()) + self._settings.content_ttl_seconds
        for variant in ("video", "thumbnail", "spritesheet"):
            await self._content.put(job.id, variant, getattr(artifacts, variant), expires_at)
        if not await self._store.complete(job.id, claim.worker, expires_at):
            await self._content.delete(job.id)  # deleted while rendering
        else:
            log.info("video completed", extra={"video_id": job.id, "bytes": len(artifacts.video)})

    async def _sweep(self) -> None:
        while True:
            await self.sweep_once()
            await asyncio.sleep(self._settings.sweep_seconds)

    async def sweep_once(self) -> list[str]:
        expired = await self._store.expire_due(int(time.time()))
        for job_id in expired:
            await self._content.delete(job_id)
        if expired:
            log.info("video content expired", extra={"count": len(expired)})
        return expired
