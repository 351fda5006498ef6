"""The images and videos Triton adapters against KServe's Python ModelServer (a real KServe v2 gRPC server).

The server hosts small models wrapping the procedural renderers (tests/support/kserve_visual_models.py) in
its own process, on loopback.
"""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from modelplex.v1 import catalog_pb2, common_pb2, images_pb2, videos_pb2
from modelplex_images.adapters.triton import TritonImagesEngine
from modelplex_images.servicer import ImagesServicer
from modelplex_images.settings import ImagesSettings
from modelplex_kit.errors import ServiceError
from modelplex_kit.objectstore import open_object_store
from modelplex_videos import media
from modelplex_videos.adapters.triton import TritonVideosEngine
from modelplex_videos.content import VideoContent
from modelplex_videos.engine import VideoSpec
from modelplex_videos.jobs import Limits, SQLiteJobStore
from modelplex_videos.servicer import VideosServicer
from modelplex_videos.settings import VideosSettings
from modelplex_videos.worker import WorkerPool
from tests.support.kserve_visual import KServeVisual

pytestmark = pytest.mark.integration
SIZES = ["256x256", "512x256"]


@pytest.fixture(scope="module")
def kserve():
    server = KServeVisual().start()
    yield server
    server.stop()


def images_servicer(kserve, model: str) -> tuple[ImagesServicer, TritonImagesEngine]:
    engine = TritonImagesEngine(ImagesSettings(engine="triton", upstream_url=kserve.address, upstream_model=model))
    caps = catalog_pb2.ImagesCapabilities(sizes=SIZES, max_n=4, output_formats=["png", "jpeg", "webp"])
    return ImagesServicer(engine, caps), engine


def image_request(**fields) -> images_pb2.GenerateImagesRequest:
    base = {"model": "m", "prompt": "a harbour", "n": 1, "width": 256, "height": 256, "output_format": "png"}
    return images_pb2.GenerateImagesRequest(**(base | fields))


@pytest.mark.parametrize("model", ["procedural-image", "procedural-image-png"])
async def test_images_through_kserve(kserve, model):
    servicer, engine = images_servicer(kserve, model)
    try:
        response = await servicer.GenerateImages(image_request(n=2, seed=4, width=512, output_format="webp"), None)
        again = await servicer.GenerateImages(image_request(n=2, seed=4, width=512, output_format="webp"), None)
    finally:
        await engine.close()
    assert len(response.images) == 2
    images = [Image.open(io.BytesIO(item.data)) for item in response.images]
    assert all(image.format == "WEBP" and image.size == (512, 256) for image in images)
    assert response.images[0].data != response.images[1].data  # seed + index per image
    assert [i.data for i in again.images] == [i.data for i in response.images]  # the seed reaches the model


async def test_images_unknown_model_is_unavailable(kserve):
    servicer, engine = images_servicer(kserve, "no-such-model")
    try:
        with pytest.raises(ServiceError) as caught:
            await servicer.GenerateImages(image_request(), None)
    finally:
        await engine.close()
    assert caught.value.status.name == "UNAVAILABLE"


async def test_images_partials_are_refused_by_the_triton_engine(kserve):
    servicer, engine = images_servicer(kserve, "procedural-image")
    try:
        with pytest.raises(ServiceError) as caught:
            await anext(servicer.StreamImages(image_request(partial_images=1), None))
    finally:
        await engine.close()
    assert caught.value.param == "partial_images"


def video_settings(kserve, tmp_path, model: str = "procedural-video") -> VideosSettings:
    return VideosSettings(
        engine="triton", upstream_url=kserve.address, upstream_model=model, fps=4, data_dir=str(tmp_path),
        poll_seconds=0.05,
    )


async def test_video_engine_returns_a_decodable_clip(kserve, tmp_path):
    engine = TritonVideosEngine(video_settings(kserve, tmp_path))
    reported: list[float] = []

    async def progress(fraction: float) -> None:
        reported.append(fraction)

    try:
        artifacts = await engine.generate(VideoSpec("a kite", 1280, 720, 4, seed=9), progress)
    finally:
        await engine.close()
    frames = media.decode_frames(artifacts.video)
    assert len(frames) == 16 and frames[0].shape == (720, 1280, 3)
    assert Image.open(io.BytesIO(artifacts.thumbnail)).format == "WEBP"
    assert Image.open(io.BytesIO(artifacts.spritesheet)).format == "JPEG"
    assert reported == [1.0]


async def test_video_job_completes_through_the_worker_pool(kserve, tmp_path):
    settings = video_settings(kserve, tmp_path)
    engine = TritonVideosEngine(settings)
    store = SQLiteJobStore(settings.sqlite_path, 3600)
    content = VideoContent(open_object_store(settings, default_dir=settings.content_dir))
    pool = WorkerPool(store, content, engine, settings)
    caps = catalog_pb2.VideosCapabilities(sizes=["1280x720"], seconds=[4])
    servicer = VideosServicer(store, content, caps, Limits(8, 8), on_queued=pool.wake)
    meta = common_pb2.RequestMeta(principal_id="p1")
    pool.start()
    try:
        job = await servicer.CreateVideo(
            videos_pb2.CreateVideoRequest(meta=meta, model="m", prompt="a kite", width=1280, height=720, seconds=4),
            None,
        )
        for _ in range(600):
            job = await servicer.GetVideo(videos_pb2.GetVideoRequest(meta=meta, video_id=job.id), None)
            if job.status in (videos_pb2.VIDEO_STATUS_COMPLETED, videos_pb2.VIDEO_STATUS_FAILED):
                break
            await asyncio.sleep(0.1)
        assert job.status == videos_pb2.VIDEO_STATUS_COMPLETED, job.error_message
        chunks = [c async for c in servicer.DownloadVideoContent(
            videos_pb2.DownloadVideoContentRequest(meta=meta, video_id=job.id), None)]
        assert len(media.decode_frames(b"".join(c.data for c in chunks))) == 16
    finally:
        await pool.stop()
        await engine.close()
        await store.close()


async def test_video_unknown_model_requeues_the_job(kserve, tmp_path):
    """An upstream that does not serve the model is a deployment problem: the job waits, it is not failed."""
    settings = video_settings(kserve, tmp_path, model="no-such-model")
    engine = TritonVideosEngine(settings)
    with pytest.raises(ServiceError) as caught:
        await engine.generate(VideoSpec("x", 1280, 720, 4, seed=1), lambda f: asyncio.sleep(0))
    await engine.close()
    assert caught.value.status.name == "UNAVAILABLE"


@pytest.mark.parametrize(("model", "ready"), [("procedural-image", True), ("no-such-model", False)])
async def test_images_engine_readiness_through_kserve(kserve, model, ready):
    """The backend's readiness probe asks KServe (Open Inference Protocol) for the server and the model."""
    _servicer, engine = images_servicer(kserve, model)
    try:
        assert await engine.ready() is ready
    finally:
        await engine.close()
