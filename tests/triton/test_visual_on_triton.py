"""The images and videos Triton adapters against the real tritonserver's `pictures` and `clips`
(deploy/triton/model_repository/), directly and through the edge.

Each behaviour the KServe stand-in (tests/support/kserve_visual_models.py) did not show is pinned here:
a batching, decoupled image pipeline (ModelInfer refused, [1, 1] inputs, [1, H, W, C] out, partial
images streamed), a decoupled video model streaming progress, the inputs the adapters dropped, the
seeds they wrapped, refusals from the model, and a model unloaded through Triton's model control.
"""

from __future__ import annotations

import asyncio
import io
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from modelplex.v1 import catalog_pb2, common_pb2, videos_pb2
from modelplex_images.adapters.procedural import ProceduralEngine
from modelplex_images.adapters.triton import Layout, TritonImagesEngine, image_inputs
from modelplex_images.engine import ImageSpec
from modelplex_images.settings import ImagesSettings
from modelplex_kit import jobqueue
from modelplex_kit.errors import ServiceError
from modelplex_kit.objectstore import open_object_store
from modelplex_videos.adapters.procedural import ProceduralVideoEngine
from modelplex_videos.adapters.triton import TritonVideosEngine
from modelplex_videos.content import VideoContent
from modelplex_videos.engine import VideoSpec
from modelplex_videos.jobs import Limits, SQLiteJobStore
from modelplex_videos.servicer import VideosServicer
from modelplex_videos.settings import VideosSettings
from modelplex_videos.worker import JobGone, WorkerPool
from tests.support.until import until
from tests.triton.conftest import example_model, start_stack

pytestmark = pytest.mark.triton
KEY = "sk-modelplex-visual-triton"
FPS = 4
# Sizes the backends and the edge let through but the models refuse (sides not multiples of 8 / 16).
ODD_IMAGE, ODD_VIDEO = "100x100", "1000x720"


def image_engine(triton, model: str = "pictures") -> TritonImagesEngine:
    return TritonImagesEngine(ImagesSettings(engine="triton", upstream_url=triton.grpc_target, upstream_model=model))


def video_settings(triton, tmp_path, model: str = "clips") -> VideosSettings:
    return VideosSettings(
        engine="triton", upstream_url=triton.grpc_target, upstream_model=model, fps=FPS, data_dir=str(tmp_path)
    )


def red_card() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (250, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


# -- the adapters, directly


async def test_pictures_layout_comes_from_the_model_config(triton):
    """Regression: the adapter sent [1] tensors over ModelInfer; Triton refuses ModelInfer for a decoupled
    model (UNIMPLEMENTED, a 500) and wants [1, 1] for a batching one (max_batch_size 4)."""
    engine = image_engine(triton)
    try:
        layout = await engine.layout()
    finally:
        await engine.close()
    assert layout.batched and layout.decoupled
    assert {"prompt", "width", "height", "seed", "background", "style", "partial_images"} <= layout.inputs
    shapes = {i.name(): tuple(i.shape()) for i in image_inputs(ImageSpec("x", 8, 8, seed=1), layout)}
    assert set(shapes.values()) == {(1, 1)}


async def test_pictures_are_the_procedural_engines_pixels(triton):
    """Regression: background, style and partial_images never reached the model (no RGBA, no partial
    images: the backend refused the catalog's max_partial_images 3), and a negative seed was wrapped
    into another picture. Now every step is the local engine's, pixel for pixel."""
    spec = ImageSpec(
        "a lighthouse at dusk", 512, 256, seed=-7, style="natural", background="transparent", partial_images=2
    )
    engine = image_engine(triton)
    local = ProceduralEngine(ImagesSettings())
    try:
        served = [step async for step in engine.render(spec)]
    finally:
        await engine.close()
    drawn = [step async for step in local.render(spec)]
    assert [s.final for s in served] == [False, False, True]
    assert all(s.image.mode == "RGBA" and s.image.size == (512, 256) for s in served)
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(served, drawn, strict=True))


async def test_pictures_refusal_names_the_param(triton):
    engine = image_engine(triton)
    try:
        with pytest.raises(ServiceError) as caught:
            [step async for step in engine.render(ImageSpec("a kite", 100, 256, seed=1))]
    finally:
        await engine.close()
    assert caught.value.status.name == "INVALID_ARGUMENT" and caught.value.param == "size"
    assert "width: 100 is not a multiple of 8" in caught.value.message


async def test_clips_stream_progress_and_the_procedural_engines_clip(triton, tmp_path):
    """Regression: input_reference never reached the model, progress came only at the end (the job sat
    at 0% while rendering), and a negative seed was wrapped. Now: progress each second, and the very
    bytes the local engine encodes."""
    spec = VideoSpec("a paper boat", 720, 1280, 4, seed=-9, input_reference=red_card())
    engine = TritonVideosEngine(video_settings(triton, tmp_path))
    reported: list[float] = []

    async def progress(fraction: float) -> None:
        reported.append(fraction)

    try:
        served = await engine.generate(spec, progress)
    finally:
        await engine.close()
    drawn = await ProceduralVideoEngine(video_settings(triton, tmp_path)).generate(spec, lambda _: asyncio.sleep(0))
    assert reported == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert served.video == drawn.video


async def test_clip_job_gone_cancels_the_request(triton, tmp_path):
    """A job deleted mid-render: the adapter stops at the next progress report and cancels the call,
    and the model stops drawing (it logs where)."""
    engine = TritonVideosEngine(video_settings(triton, tmp_path))

    async def gone(fraction: float) -> None:
        raise JobGone("v1")

    started = time.monotonic()
    try:
        with pytest.raises(JobGone):
            await engine.generate(VideoSpec("a long take", 1792, 1024, 12, seed=3), gone)
    finally:
        await engine.close()
    assert time.monotonic() - started < 20
    deadline = time.monotonic() + 20
    while "clips: cancelled after" not in triton.tail(20000):
        assert time.monotonic() < deadline, triton.tail()
        await asyncio.sleep(0.2)


async def test_clips_refusal_is_invalid(triton, tmp_path):
    engine = TritonVideosEngine(video_settings(triton, tmp_path))
    try:
        with pytest.raises(ServiceError) as caught:
            await engine.generate(VideoSpec("x", 1000, 720, 4, seed=1), lambda _: asyncio.sleep(0))
    finally:
        await engine.close()
    assert caught.value.status.name == "INVALID_ARGUMENT"
    assert "width: 1000 is not a multiple of 16" in caught.value.message


async def test_unknown_model_is_unavailable(triton, tmp_path):
    """(Ported from the KServe stand-in.) A model the server lacks is a deployment problem: 503, the job requeued."""
    images = image_engine(triton, "no-such-model")
    videos = TritonVideosEngine(video_settings(triton, tmp_path, "no-such-model"))
    try:
        with pytest.raises(ServiceError) as image_error:
            [step async for step in images.render(ImageSpec("x", 256, 256, seed=1))]
        with pytest.raises(ServiceError) as video_error:
            await videos.generate(VideoSpec("x", 1280, 720, 4, seed=1), lambda _: asyncio.sleep(0))
    finally:
        await images.close()
        await videos.close()
    assert image_error.value.status.name == video_error.value.status.name == "UNAVAILABLE"


@pytest.mark.parametrize(("model", "ready"), [("pictures", True), ("no-such-model", False)])
async def test_images_engine_readiness(triton, model, ready):
    """(Ported from the KServe stand-in.)"""
    engine = image_engine(triton, model)
    try:
        assert await engine.ready() is ready
    finally:
        await engine.close()


def test_layout_defaults_to_every_input_unbatched():
    """A server without Triton's model config (KServe's ModelServer) gets every input, shaped [1]."""
    names = {i.name(): tuple(i.shape()) for i in image_inputs(ImageSpec("x", 8, 8, seed=1), Layout())}
    assert set(names) >= {"prompt", "background", "style", "negative_prompt"} and set(names.values()) == {(1,)}


# -- through the edge


@pytest.fixture(scope="module")
def stack(tmp_path_factory, triton):
    tmp = tmp_path_factory.mktemp("visual-on-triton")
    images = example_model("procedural-image", triton)
    image_sizes = [*images["capabilities"]["sizes"], ODD_IMAGE]
    images["capabilities"] = images["capabilities"] | {"sizes": image_sizes}
    images["engine"]["settings"] = images["engine"]["settings"] | {"sizes": ",".join(image_sizes)}
    videos = example_model("procedural-video", triton)
    video_sizes = [*videos["capabilities"]["sizes"], ODD_VIDEO]
    videos["capabilities"] = videos["capabilities"] | {"sizes": video_sizes}
    videos["engine"]["settings"] = videos["engine"]["settings"] | {
        "sizes": ",".join(video_sizes),
        "fps": FPS,
        "data_dir": str(tmp / "data"),
        "poll_seconds": 0.1,
    }
    running = start_stack(tmp, [images, videos], KEY)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=KEY, max_retries=0, timeout=60)


def _generate(stack, **body) -> httpx.Response:
    body = {"model": "procedural-image", "prompt": "a harbour", "size": "256x256"} | body
    return httpx.post(
        f"{stack.base_url}/images/generations", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    )


def _wait(client, video_id: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while (video := client.videos.retrieve(video_id)).status not in ("completed", "failed"):
        assert time.monotonic() < deadline, video
        time.sleep(0.25)
    return video


def test_model_refusal_is_a_400_naming_the_param(stack):
    """The model's INVALID_ARG (in-band on its stream) comes back as OpenAI's 400, param and all."""
    reply = _generate(stack, size=ODD_IMAGE)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "size" and "multiple of 8" in error["message"]
    assert _generate(stack, size="256x256").status_code == 200


@pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")
def test_model_refusal_fails_the_video_job(client):
    video = client.videos.create(model="procedural-video", prompt="odd", seconds="4", size=ODD_VIDEO)
    done = _wait(client, video.id)
    assert done.status == "failed" and "multiple of 16" in done.error.message


def test_unloaded_model_is_a_503_until_loaded_again(stack, triton):
    triton.unload("pictures")
    try:
        assert not triton.ready("pictures")
        reply = _generate(stack)
        assert reply.status_code == 503, reply.text
    finally:
        triton.load("pictures")
    deadline = time.monotonic() + 60
    while (reply := _generate(stack)).status_code != 200:
        assert reply.status_code == 503 and time.monotonic() < deadline, reply.text
        time.sleep(0.5)


@pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")
def test_unloaded_clips_model_is_a_503_until_loaded_again(client, triton):
    """Creates get 503 once the videos backend's readiness follows Triton's (a job accepted in between
    is test_job_waits_while_the_model_is_not_served's case), and are served again after a reload."""

    def create() -> str | None:
        try:
            return client.videos.create(model="procedural-video", prompt="patience", seconds="4", size="1280x720").id
        except openai.InternalServerError as exc:
            assert exc.status_code == 503, exc
            return None

    triton.unload("clips")
    try:
        deadline = time.monotonic() + 30
        while create() is not None:
            assert time.monotonic() < deadline, "creates were still accepted"
            time.sleep(0.5)
    finally:
        triton.load("clips")
    deadline = time.monotonic() + 60
    while (video_id := create()) is None:
        assert time.monotonic() < deadline, "creates were still refused"
        time.sleep(0.5)
    assert _wait(client, video_id).status == "completed"


async def test_job_waits_while_the_model_is_not_served(triton, tmp_path):
    """(Ported from the KServe stand-in, which only checked the engine's UNAVAILABLE.) The job, not just the
    call: a model the server does not serve is the deployment's problem, so the job waits, not fails."""
    settings = video_settings(triton, tmp_path, "no-such-model").model_copy(
        update={"poll_seconds": 0.05, "unavailable_backoff_seconds": 0.05}
    )
    engine = TritonVideosEngine(settings)
    tries = []
    generate = engine.generate

    async def counted(*args, **kwargs):
        tries.append(1)
        return await generate(*args, **kwargs)

    engine.generate = counted  # type: ignore[method-assign]
    store = SQLiteJobStore(settings.sqlite_path, 3600)
    content = VideoContent(open_object_store(settings, default_dir=settings.content_dir))
    pool = WorkerPool(store, content, engine, settings)
    servicer = VideosServicer(
        store,
        content,
        catalog_pb2.VideosCapabilities(sizes=["1280x720"], seconds=[4]),
        Limits(8, 8),
        on_queued=pool.wake,
    )
    meta = common_pb2.RequestMeta(principal_id="p1")
    pool.start()
    try:
        job = await servicer.CreateVideo(
            videos_pb2.CreateVideoRequest(meta=meta, model="m", prompt="a kite", width=1280, height=720, seconds=4),
            None,
        )
        # Before: failed ('Video generation failed repeatedly.') after MAX_ATTEMPTS such tries, within a second.
        await until(lambda: len(tries) > 2 * jobqueue.MAX_ATTEMPTS, timeout=60, what="the engine tried again and again")
        job = await servicer.GetVideo(videos_pb2.GetVideoRequest(meta=meta, video_id=job.id), None)
    finally:
        await pool.stop()
        await engine.close()
        await store.close()
    assert job.status in (videos_pb2.VIDEO_STATUS_QUEUED, videos_pb2.VIDEO_STATUS_IN_PROGRESS), job.error_message
