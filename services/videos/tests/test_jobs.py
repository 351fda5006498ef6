"""The SQLite job store, the worker pool and the servicer, in process with the procedural engine."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from modelplex.v1 import catalog_pb2, common_pb2, videos_pb2
from modelplex_kit.errors import ServiceError
from modelplex_kit.objectstore import open_object_store
from modelplex_videos.adapters.procedural import ProceduralVideoEngine
from modelplex_videos.content import VideoContent
from modelplex_videos.jobs import QUEUED, Job, Limits, SQLiteJobStore, new_job_id
from modelplex_videos.servicer import VideosServicer
from modelplex_videos.settings import VideosSettings
from modelplex_videos.worker import WorkerPool

LIMITS = Limits(max_queue=100, max_queue_per_principal=100)


def job(principal: str = "p1", **fields) -> Job:
    return Job(id=new_job_id(), principal=principal, model="m", prompt="p", width=64, height=64, seconds=1, seed=1,
               **fields)


@pytest.fixture
async def store(tmp_path):
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3", idempotency_ttl_seconds=3600)
    yield store
    await store.close()


async def test_claims_are_fair_across_principals(store):
    busy = [await store.create(job("busy"), LIMITS) for _ in range(5)]
    quiet = await store.create(job("quiet"), LIMITS)
    first = await store.claim("w", 30)
    second = await store.claim("w", 30)
    assert first.id == busy[0].id
    assert second.id == quiet.id  # not after the busy principal's whole backlog
    assert (await store.claim("w", 30)).id == busy[1].id


async def test_queue_limits(store):
    limits = Limits(max_queue=3, max_queue_per_principal=2)
    await store.create(job("a"), limits)
    await store.create(job("a"), limits)
    with pytest.raises(ServiceError) as caught:
        await store.create(job("a"), limits)
    assert caught.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED and "API key" in caught.value.message
    await store.create(job("b"), limits)
    with pytest.raises(ServiceError) as caught:
        await store.create(job("c"), limits)
    assert "server" in caught.value.message


async def test_an_expired_lease_is_claimed_again(store):
    created = await store.create(job(), LIMITS)
    claimed = await store.claim("dead-worker", lease_seconds=0.05)
    assert claimed.id == created.id and await store.claim("w2", 30) is None
    await asyncio.sleep(0.1)
    again = await store.claim("w2", 30)
    assert again.id == created.id and again.attempts == 2
    assert not await store.renew(created.id, "dead-worker", 50, 30)  # the old worker lost it
    assert not await store.complete(created.id, "dead-worker", 0)
    assert await store.complete(created.id, "w2", int(time.time()) + 60)


async def test_restart_requeues_jobs_in_progress(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    first = SQLiteJobStore(path, 3600)
    created = await first.create(job(), LIMITS)
    await first.claim("w", 600)
    await first.close()
    reopened = SQLiteJobStore(path, 3600)
    assert (await reopened.get("p1", created.id)).status == QUEUED
    assert (await reopened.claim("w2", 30)).id == created.id


async def test_idempotency(store):
    assert await store.reserve("p1", "k", "digest-a") is None
    with pytest.raises(ServiceError) as caught:
        await store.reserve("p1", "k", "digest-a")  # still being created
    assert caught.value.http.status == 409
    created = await store.create(job(), LIMITS, key="k")
    assert (await store.reserve("p1", "k", "digest-a")).id == created.id
    with pytest.raises(ServiceError) as caught:
        await store.reserve("p1", "k", "digest-b")
    assert caught.value.http.status == 422
    assert await store.reserve("p2", "k", "digest-b") is None  # keys are per principal


async def test_idempotency_keys_expire(tmp_path):
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3", idempotency_ttl_seconds=1)
    assert await store.reserve("p1", "k", "a") is None
    await store.create(job(), LIMITS, key="k")
    await asyncio.sleep(2.1)
    assert await store.reserve("p1", "k", "b") is None  # a new request after the key's 24 h (here 1 s)


async def test_expiry_marks_rows(store):
    created = await store.create(job(), LIMITS)
    await store.claim("w", 30)
    await store.complete(created.id, "w", expires_at=int(time.time()) - 1)
    assert await store.expire_due(int(time.time())) == [created.id]
    assert (await store.get("p1", created.id)).expired
    assert await store.expire_due(int(time.time())) == []


@pytest.fixture
async def service(tmp_path):
    settings = VideosSettings(data_dir=str(tmp_path), fps=2, poll_seconds=0.02, workers=1, content_ttl_seconds=1,
                              max_queue=2, max_queue_per_principal=2)
    store = SQLiteJobStore(settings.sqlite_path, 3600)
    content = VideoContent(open_object_store(settings, default_dir=settings.content_dir))
    pool = WorkerPool(store, content, ProceduralVideoEngine(settings), settings)
    caps = catalog_pb2.VideosCapabilities(sizes=["1280x720"], seconds=[4])
    servicer = VideosServicer(store, content, caps, Limits(2, 2), on_queued=pool.wake)
    yield servicer, pool, content
    await pool.stop()
    await store.close()


def create(principal: str = "p1", prompt: str = "a fox", **fields) -> videos_pb2.CreateVideoRequest:
    meta = common_pb2.RequestMeta(principal_id=principal)
    return videos_pb2.CreateVideoRequest(meta=meta, model="m", prompt=prompt, width=1280, height=720, seconds=4,
                                         **fields)


async def wait(servicer, video_id: str, principal: str = "p1") -> videos_pb2.VideoJob:
    meta = common_pb2.RequestMeta(principal_id=principal)
    for _ in range(500):
        found = await servicer.GetVideo(videos_pb2.GetVideoRequest(meta=meta, video_id=video_id), None)
        if found.status in (videos_pb2.VIDEO_STATUS_COMPLETED, videos_pb2.VIDEO_STATUS_FAILED):
            return found
        await asyncio.sleep(0.05)
    raise TimeoutError


async def test_full_queue_is_a_429_with_retry_after(service):
    servicer, _, _ = service
    await servicer.CreateVideo(create(), None)
    await servicer.CreateVideo(create(), None)
    with pytest.raises(ServiceError) as caught:
        await servicer.CreateVideo(create(), None)
    assert caught.value.http.status == 429
    # Through the gRPC wire form the edge adds Retry-After.
    class Wire(grpc.RpcError):
        def code(self):
            return caught.value.status

        def details(self):
            return caught.value.message

        def trailing_metadata(self):
            return caught.value.trailing_metadata()

    assert ServiceError.from_rpc_error(Wire()).headers == {"retry-after": "1"}


async def test_content_expires_on_schedule(service):
    servicer, pool, content = service
    pool.start()
    done = await wait(servicer, (await servicer.CreateVideo(create(), None)).id)
    assert done.status == videos_pb2.VIDEO_STATUS_COMPLETED and await content.stat(done.id, "video") is not None
    await asyncio.sleep(1.1)
    assert await pool.sweep_once() == [done.id]
    assert await content.stat(done.id, "video") is None
    meta = common_pb2.RequestMeta(principal_id="p1")
    with pytest.raises(ServiceError) as caught:
        await anext(servicer.DownloadVideoContent(videos_pb2.DownloadVideoContentRequest(meta=meta, video_id=done.id),
                                                  None))
    assert caught.value.code == "content_expired"
    assert (await servicer.GetVideo(videos_pb2.GetVideoRequest(meta=meta, video_id=done.id), None)).expired


async def test_deleting_a_job_in_progress_stops_its_worker(service):
    servicer, pool, content = service
    long = await servicer.CreateVideo(create(prompt="long"), None)
    pool.start()
    meta = common_pb2.RequestMeta(principal_id="p1")
    for _ in range(200):
        state = await servicer.GetVideo(videos_pb2.GetVideoRequest(meta=meta, video_id=long.id), None)
        if state.status == videos_pb2.VIDEO_STATUS_IN_PROGRESS:
            break
        await asyncio.sleep(0.01)
    await servicer.DeleteVideo(videos_pb2.DeleteVideoRequest(meta=meta, video_id=long.id), None)
    nxt = await servicer.CreateVideo(create(prompt="next"), None)
    assert (await wait(servicer, nxt.id)).status == videos_pb2.VIDEO_STATUS_COMPLETED
    assert await content.stat(long.id, "video") is None  # the deleted job's content never appeared


