"""Videos replicas sharing one Redis queue (a real redis-server): shared work, and a dead worker's job re-run.

Their content on a shared volume (one local directory) or on S3 (moto's real S3-protocol server), where
each replica has a data directory of its own: no shared volume."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import grpc
import pytest

from modelplex.v1 import common_pb2, videos_pb2, videos_pb2_grpc
from modelplex_videos.jobs import Job, Limits, new_job_id
from modelplex_videos.media import decode_frames
from modelplex_videos.redis_store import RedisJobStore
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer
from tests.support.s3_server import S3Server
from tests.support.until import wait_until

pytestmark = pytest.mark.integration
META = common_pb2.RequestMeta(principal_id="key_redis_test")
LIMITS = Limits(100, 100)


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def fresh(redis_server):
    redis_server.client().flushdb()
    return redis_server


def job(principal: str = "p1") -> Job:
    return Job(id=new_job_id(), principal=principal, model="m", prompt="p", width=64, height=64, seconds=1, seed=1)


async def test_store_fairness_and_lease_takeover(fresh):
    store = RedisJobStore(fresh.url, 3600)
    try:
        busy = [await store.create(job("busy"), LIMITS) for _ in range(3)]
        quiet = await store.create(job("quiet"), LIMITS)
        first = await store.claim("w1", lease_seconds=0.3)
        second = await store.claim("w2", lease_seconds=30)
        assert {first.principal, second.principal} == {"busy", "quiet"}  # quiet is not stuck behind busy
        assert first.id in (busy[0].id, quiet.id)
        await asyncio.sleep(0.6)  # w1 stops renewing: its lease runs out; w2 keeps renewing
        assert await store.renew(second.id, "w2", 40, 0.3)
        third = await store.claim("w3", lease_seconds=0.3)  # every replica runs with the same lease
        assert third.id == first.id and third.attempts == 2  # taken over before any new job
        assert not await store.renew(first.id, "w1", 10, 30)
        assert not await store.complete(first.id, "w1", 0)
        assert await store.complete(first.id, "w3", int(time.time()) + 60)
        assert (await store.get(first.principal, first.id)).status == "completed"
        page, more = await store.list("busy", "", 2, "desc")
        assert [j.id for j in page] == [busy[2].id, busy[1].id] and more
        page, more = await store.list("busy", busy[1].id, 2, "desc")
        assert [j.id for j in page] == [busy[0].id] and not more
    finally:
        await store.close()


async def test_store_idempotency_and_limits(fresh):
    store = RedisJobStore(fresh.url, 3600)
    try:
        assert await store.reserve("p1", "k", "a") is None
        with pytest.raises(Exception) as caught:
            await store.reserve("p1", "k", "a")
        assert caught.value.http.status == 409
        created = await store.create(job(), LIMITS, key="k")
        assert (await store.reserve("p1", "k", "a")).id == created.id
        with pytest.raises(Exception) as caught:
            await store.reserve("p1", "k", "b")
        assert caught.value.http.status == 422
        with pytest.raises(Exception) as caught:
            await store.create(job(), Limits(100, 1))
        assert caught.value.http.status == 429
    finally:
        await store.close()


@pytest.fixture(scope="module")
def s3_server():
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture(params=["shared-volume", "s3"])
def content_env(request, tmp_path) -> Callable[[], dict[str, str]]:
    """Each call: the content settings of one more replica."""
    if request.param == "shared-volume":
        return lambda: {"MODELPLEX_VIDEOS_DATA_DIR": str(tmp_path / "data")}
    s3 = request.getfixturevalue("s3_server")
    bucket = s3.new_bucket()
    return lambda: {"MODELPLEX_VIDEOS_DATA_DIR": str(tmp_path / uuid.uuid4().hex),
                    **s3.env("MODELPLEX_VIDEOS_", bucket)}


class Replica:
    def __init__(self, redis_url: str, content_env: dict[str, str], log) -> None:
        self.target = f"127.0.0.1:{free_port()}"
        env = {
            **os.environ, "MODELPLEX_VIDEOS_LISTEN": self.target, "MODELPLEX_VIDEOS_STORE": "redis",
            "MODELPLEX_VIDEOS_REDIS_URL": redis_url, **content_env,
            "MODELPLEX_VIDEOS_WORKERS": "1", "MODELPLEX_VIDEOS_LEASE_SECONDS": "2", "MODELPLEX_VIDEOS_FPS": "6",
            "MODELPLEX_LOG_FORMAT": "text", "MODELPLEX_GRACE_SECONDS": "5",
        }
        self.process = subprocess.Popen([sys.executable, "-m", "modelplex_videos"], env=env, stdout=log,
                                        stderr=subprocess.STDOUT)
        self.channel = grpc.insecure_channel(self.target)
        self.stub = videos_pb2_grpc.VideosServiceStub(self.channel)
        grpc.channel_ready_future(self.channel).result(timeout=60)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # drains: a render in flight may take a while on a loaded machine
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.channel.close()


def create(stub, prompt: str, seconds: int = 8) -> videos_pb2.VideoJob:
    request = videos_pb2.CreateVideoRequest(meta=META, model="procedural-video", prompt=prompt, width=1792,
                                            height=1024, seconds=seconds, seed=3)
    return stub.CreateVideo(request, timeout=10)


def get(stub, video_id: str) -> videos_pb2.VideoJob:
    return stub.GetVideo(videos_pb2.GetVideoRequest(meta=META, video_id=video_id), timeout=10)


def wait_done(stub, video_id: str, timeout: float = 180) -> videos_pb2.VideoJob:
    def finished() -> videos_pb2.VideoJob | None:
        found = get(stub, video_id)
        return found if found.status in (videos_pb2.VIDEO_STATUS_COMPLETED, videos_pb2.VIDEO_STATUS_FAILED) else None

    return wait_until(finished, timeout=timeout, interval=0.2)


def download(stub, video_id: str) -> bytes:
    chunks = stub.DownloadVideoContent(videos_pb2.DownloadVideoContentRequest(meta=META, video_id=video_id), timeout=60)
    return b"".join(chunk.data for chunk in chunks)


def test_two_replicas_share_the_queue_and_finish_a_dead_workers_job(fresh, tmp_path, content_env):
    log = open(tmp_path / "replicas.log", "w")  # noqa: SIM115 - closed below
    first = Replica(fresh.url, content_env(), log)
    second = None
    try:
        # Shared work: one worker per replica, two jobs at once -> each replica renders one.
        second = Replica(fresh.url, content_env(), log)
        jobs = [create(first.stub, "shared a"), create(first.stub, "shared b")]
        done = [wait_done(second.stub, j.id) for j in jobs]
        assert all(d.status == videos_pb2.VIDEO_STATUS_COMPLETED for d in done)
        finishers = {fresh.client().hget(f"modelplex:videos:job:{j.id}", "finished_by").decode().split("-")[0]
                     for j in jobs}
        assert len(finishers) == 2, finishers
        for rendered in jobs:  # one was rendered by the other replica: each serves both
            assert len(decode_frames(download(first.stub, rendered.id))) == 8 * 6
        second.stop()

        # A dead worker's job: only `first` runs it, dies mid-render, and `second` (started after) finishes it.
        long = create(first.stub, "a long take", seconds=12)
        wait_until(lambda: get(first.stub, long.id).progress > 0, timeout=60, interval=0.05)
        first.process.kill()
        first.process.wait()
        second = Replica(fresh.url, content_env(), log)
        finished = wait_done(second.stub, long.id)
        assert finished.status == videos_pb2.VIDEO_STATUS_COMPLETED, finished.error_message
        assert int(fresh.client().hget(f"modelplex:videos:job:{long.id}", "attempts")) == 2
        assert len(decode_frames(download(second.stub, long.id))) == 12 * 6
    finally:
        first.stop()
        if second is not None:
            second.stop()
        log.close()
