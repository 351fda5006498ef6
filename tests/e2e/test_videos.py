"""OpenAI's video API through the official openai SDK: the whole job lifecycle, against procedural-video.

Everything runs twice: finished videos in a local directory, and in a bucket of a real S3-protocol
server (moto's server mode).
"""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import av
import grpc
import httpx
import openai
import pytest
import yaml
from PIL import Image

from modelplex.v1 import common_pb2, videos_pb2, videos_pb2_grpc
from tests.e2e.visual_stack import VISUAL_KEY, start_visual_stack
from tests.support.openapi import validate
from tests.support.ports import free_port
from tests.support.s3_server import S3Server

# The SDK warns that OpenAI is retiring its own Sora API; the API shape is what Modelplex serves.
pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")]
MODEL = "procedural-video"
FPS = 4


@dataclass
class ContentStore:
    """Where the videos backend keeps finished videos: a local directory, or a bucket of a real S3 server."""

    kind: str
    directory: Path
    s3: S3Server | None = None
    bucket: str = ""

    def keys(self, video_id: str) -> list[str]:
        prefix = f"videos/{video_id}/"
        if self.s3 is not None:
            listed = self.s3.client().list_objects_v2(Bucket=self.bucket, Prefix=prefix).get("Contents", [])
            return sorted(item["Key"] for item in listed)
        found = (self.directory / prefix).glob("*")
        return sorted(f"{prefix}{path.name}" for path in found if not path.name.endswith(".meta.json"))


@pytest.fixture(scope="module", params=["local", "s3"])
def content_store(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("videos-content")
    if request.param == "local":
        yield ContentStore("local", directory)
        return
    server = S3Server().start()
    yield ContentStore("s3", directory, server, server.new_bucket())
    server.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, content_store):
    tmp = tmp_path_factory.mktemp("videos")
    settings = {"data_dir": str(tmp / "data"), "fps": FPS, "workers": 2, "lease_seconds": 5,
                "object_store_dir": str(content_store.directory)}
    env = content_store.s3.env("MODELPLEX_VIDEOS_", content_store.bucket) if content_store.s3 else {}
    running = start_visual_stack(tmp, env, videos_settings=settings)
    running.start_supervising(interval=0.2)  # as `make run` does: a crashed process comes back
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=VISUAL_KEY, max_retries=0, timeout=60)


def _http(stack, method: str, path: str, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {VISUAL_KEY}", **kw.pop("headers", {})}
    return httpx.request(method, f"{stack.base_url}{path}", headers=headers, timeout=60, **kw)


def _wait(client, video_id: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        video = client.videos.retrieve(video_id)
        if video.status in ("completed", "failed"):
            return video
        time.sleep(0.25)
    raise TimeoutError(video_id)


def _frames(mp4: bytes) -> list:
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]


@pytest.fixture(scope="module")
def finished(client):
    """One completed job, shared by the read-only tests."""
    video = client.videos.create_and_poll(model=MODEL, prompt="a paper boat on a pond", seconds="4", size="720x1280",
                                          poll_interval_ms=250)
    assert video.status == "completed", video.error
    return video


def test_create_and_poll_completes(stack, client, finished):
    assert finished.object == "video" and finished.model == MODEL
    assert (finished.progress, finished.seconds, finished.size) == (100, "4", "720x1280")
    assert finished.completed_at >= finished.created_at and finished.expires_at > finished.completed_at
    assert finished.error is None and finished.remixed_from_video_id is None
    raw = _http(stack, "GET", f"/videos/{finished.id}")
    validate(raw.json(), "VideoResource")


def test_content_lives_in_the_configured_store(content_store, finished):
    assert content_store.keys(finished.id) == [
        f"videos/{finished.id}/{name}" for name in ("spritesheet.jpg", "thumbnail.webp", "video.mp4")]


def test_download_is_a_decodable_h264_mp4(client, finished):
    mp4 = client.videos.download_content(finished.id).read()
    frames = _frames(mp4)
    assert len(frames) == 4 * FPS
    assert frames[0].shape == (1280, 720, 3)
    assert (frames[0] != frames[-1]).any()  # it moves


def test_thumbnail_and_spritesheet(client, finished):
    thumb = Image.open(io.BytesIO(client.videos.download_content(finished.id, variant="thumbnail").read()))
    sheet = Image.open(io.BytesIO(client.videos.download_content(finished.id, variant="spritesheet").read()))
    assert (thumb.format, thumb.size) == ("WEBP", (720, 1280))
    assert sheet.format == "JPEG" and sheet.size[0] > sheet.size[1] / 4


def test_range_and_etag(stack, client, finished):
    path = f"/videos/{finished.id}/content"
    whole = _http(stack, "GET", path)
    assert whole.status_code == 200 and whole.headers["content-type"] == "video/mp4"
    assert whole.headers["accept-ranges"] == "bytes"
    size, etag = len(whole.content), whole.headers["etag"]
    assert int(whole.headers["content-length"]) == size

    part = _http(stack, "GET", path, headers={"Range": "bytes=100-1099"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 100-1099/{size}"
    assert part.content == whole.content[100:1100]
    tail = _http(stack, "GET", path, headers={"Range": "bytes=-500"})
    assert tail.status_code == 206 and tail.content == whole.content[-500:]
    rest = _http(stack, "GET", path, headers={"Range": f"bytes={size - 10}-"})
    assert rest.content == whole.content[-10:]
    past = _http(stack, "GET", path, headers={"Range": f"bytes={size}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{size}"
    assert past.json()["error"]["message"]
    assert _http(stack, "GET", path, headers={"If-None-Match": etag}).status_code == 304
    assert _http(stack, "GET", path, params={"variant": "thumbnail"}).headers["etag"] != etag


def test_list_pagination(stack, client):
    ids = [client.videos.create(model=MODEL, prompt=f"clip {i}", seconds="4").id for i in range(3)]
    first = client.videos.list(limit=2)
    assert len(first.data) == 2 and first.has_more
    assert [v.id for v in first.data] == ids[::-1][:2]  # newest first
    every = [v.id for v in client.videos.list(limit=2)]  # the SDK follows `after` cursors
    assert every[:3] == ids[::-1] and len(every) == len(set(every))
    ascending = client.videos.list(order="asc", limit=100)
    assert [v.id for v in ascending.data][-3:] == ids
    raw = _http(stack, "GET", "/videos", params={"limit": 2, "after": ids[2]})
    validate(raw.json(), "VideoListResource")
    assert [v["id"] for v in raw.json()["data"]][:2] == [ids[1], ids[0]]
    for video_id in ids:
        _wait(client, video_id)


def test_delete(client, content_store):
    video = client.videos.create_and_poll(model=MODEL, prompt="to be deleted", seconds="4", poll_interval_ms=250)
    assert len(content_store.keys(video.id)) == 3
    deleted = client.videos.delete(video.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (video.id, True, "video.deleted")
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content(video.id)
    assert video.id not in [v.id for v in client.videos.list(limit=100)]
    assert content_store.keys(video.id) == []  # its objects are gone from the store too


def test_seed_gives_the_same_video(client):
    def render(seed: int, prompt: str = "a spinning top") -> bytes:
        video = client.videos.create(model=MODEL, prompt=prompt, seconds="4", size="1280x720",
                                     extra_body={"seed": seed})
        assert _wait(client, video.id).status == "completed"
        return client.videos.download_content(video.id).read()

    first, again, other = render(5), render(5), render(6)
    assert first == again
    assert first != other


def test_remix(client, finished):
    remix = client.videos.remix(finished.id, prompt="the same boat, in a storm")
    assert remix.remixed_from_video_id == finished.id and remix.status in ("queued", "in_progress")
    done = _wait(client, remix.id)
    assert done.status == "completed" and (done.size, done.seconds) == (finished.size, finished.seconds)
    assert done.prompt == "the same boat, in a storm"
    queued = client.videos.create(model=MODEL, prompt="not finished yet", seconds="12")
    with pytest.raises(openai.BadRequestError):
        client.videos.remix(queued.id, prompt="too early")


def test_json_body_generations_alias_and_input_reference(stack, client):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (250, 10, 10)).save(buffer, "PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    body = {"model": MODEL, "prompt": "from a red card", "seconds": "4", "size": "1280x720",
            "input_reference": {"image_url": data_url}}
    created = _http(stack, "POST", "/videos/generations", json=body)
    assert created.status_code == 200, created.text
    validate(created.json(), "VideoResource")
    assert _wait(client, created.json()["id"]).status == "completed"
    first = _frames(client.videos.download_content(created.json()["id"]).read())[0]
    assert first[..., 0].mean() > first[..., 2].mean() + 60  # the first frame is the red reference
    upload = client.videos.create(model=MODEL, prompt="uploaded reference", seconds="4", size="1280x720",
                                  input_reference=("ref.png", buffer.getvalue(), "image/png"))
    assert _wait(client, upload.id).status == "completed"
    remote = _http(stack, "POST", "/videos", json={**body, "input_reference": {"image_url": "https://x/y.png"}})
    assert remote.status_code == 400 and remote.json()["error"]["param"] == "input_reference.image_url"


def test_bad_requests(stack, client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.videos.create(model=MODEL, prompt="x", seconds="5")
    assert caught.value.body["param"] == "seconds"
    with pytest.raises(openai.BadRequestError) as caught:
        client.videos.create(model=MODEL, prompt="x", size="640x480")
    assert caught.value.body["param"] == "size" and "720x1280" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.videos.create(model=MODEL, prompt="x" * 1001)
    assert caught.value.body["param"] == "prompt"
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve("video_doesnotexist")
    assert httpx.get(f"{stack.base_url}/videos").status_code == 401


def test_idempotency_key(stack, client):
    key = {"Idempotency-Key": "create-once-1"}
    first = client.videos.create(model=MODEL, prompt="idempotent", seconds="4", extra_headers=key)
    again = client.videos.create(model=MODEL, prompt="idempotent", seconds="4", extra_headers=key)
    assert again.id == first.id
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.videos.create(model=MODEL, prompt="something else", seconds="4", extra_headers=key)
    assert caught.value.body["code"] == "idempotency_key_reused"
    other = client.videos.create(model=MODEL, prompt="idempotent", seconds="4",
                                 extra_headers={"Idempotency-Key": "create-once-2"})
    assert other.id != first.id


def test_idempotency_key_concurrent(stack, client):
    # A large reference upload keeps the first create busy while the others arrive.
    buffer = io.BytesIO()
    Image.effect_noise((1280, 720), 80).convert("RGB").save(buffer, "PNG")
    results: list[tuple[int, str]] = []

    def create() -> None:
        reply = _http(stack, "POST", "/videos", headers={"Idempotency-Key": "race-1"},
                      data={"model": MODEL, "prompt": "race", "seconds": "4", "size": "1280x720"},
                      files={"input_reference": ("ref.png", buffer.getvalue(), "image/png")})
        body = reply.json()
        results.append((reply.status_code, body["id"] if reply.status_code == 200 else body["error"]["code"]))

    threads = [threading.Thread(target=create) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ok = {value for status, value in results if status == 200}
    assert len(ok) == 1, results  # one job, however many creates raced
    print("concurrent creates:", sorted(status for status, _ in results))
    assert {status for status, _ in results} <= {200, 409}
    assert all(value == "idempotency_key_in_use" for status, value in results if status == 409)


def test_video_seconds_are_metered(stack, client):
    def counted() -> float:
        text = httpx.get(f"http://127.0.0.1:{stack.edge_port}/metrics").text
        prefix = 'modelplex_request_units_total{kind="video_seconds",model="procedural-video"}'
        lines = [line for line in text.splitlines() if line.startswith(prefix)]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0

    before = counted()
    key = {"Idempotency-Key": "metered-1"}
    client.videos.create(model=MODEL, prompt="metered", seconds="8", extra_headers=key)
    client.videos.create(model=MODEL, prompt="metered", seconds="8", extra_headers=key)  # a replay: not charged
    assert counted() - before == 8


@pytest.fixture(scope="module")
def stranger(stack, tmp_path_factory):
    """A second edge on the same catalog and videos backend, admitting another key: another principal.

    (The dev admission accepts one key per edge; the gatekeeper will serve many from one edge.)
    """
    port = free_port()
    env = {**os.environ, "MODELPLEX_DEV_API_KEY": "sk-someone-else", "MODELPLEX_EDGE_PORT": str(port),
           "MODELPLEX_EDGE_CATALOG_TARGET": stack.catalog_listen}
    log = open(tmp_path_factory.mktemp("stranger") / "edge.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen([sys.executable, "-m", "modelplex_edge"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "the second edge did not start"
            time.sleep(0.2)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-someone-else", max_retries=0)
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_another_key_gets_404(client, stranger, finished):
    with pytest.raises(openai.NotFoundError):
        stranger.videos.retrieve(finished.id)
    with pytest.raises(openai.NotFoundError):
        stranger.videos.download_content(finished.id)
    with pytest.raises(openai.NotFoundError):
        stranger.videos.remix(finished.id, prompt="mine now")
    with pytest.raises(openai.NotFoundError):
        stranger.videos.delete(finished.id)
    assert finished.id not in [v.id for v in stranger.videos.list(limit=100)]
    # Idempotency keys are per key too: the same key from another principal makes its own job.
    key = {"Idempotency-Key": "shared-key"}
    mine = client.videos.create(model=MODEL, prompt="same key", seconds="4", extra_headers=key)
    theirs = stranger.videos.create(model=MODEL, prompt="same key", seconds="4", extra_headers=key)
    assert mine.id != theirs.id
    assert client.videos.retrieve(finished.id).status == "completed"  # untouched for its owner


def test_another_principal_sees_nothing(stack, client, finished):
    """The same, on the videos service's own gRPC API (what the edge relies on)."""
    target = next(m for m in yaml.safe_load(stack.catalog.read_text())["models"] if m["id"] == MODEL)["backend"]
    with grpc.insecure_channel(target) as channel:
        stub = videos_pb2_grpc.VideosServiceStub(channel)
        stranger = common_pb2.RequestMeta(principal_id="key_someone_else")
        for call in (
            lambda: stub.GetVideo(videos_pb2.GetVideoRequest(meta=stranger, video_id=finished.id)),
            lambda: stub.DeleteVideo(videos_pb2.DeleteVideoRequest(meta=stranger, video_id=finished.id)),
            lambda: list(stub.DownloadVideoContent(
                videos_pb2.DownloadVideoContentRequest(meta=stranger, video_id=finished.id))),
            lambda: stub.RemixVideo(videos_pb2.RemixVideoRequest(meta=stranger, video_id=finished.id, prompt="x")),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert not stub.ListVideos(videos_pb2.ListVideosRequest(meta=stranger, limit=100)).videos
    assert client.videos.retrieve(finished.id).status == "completed"  # untouched for its owner


def test_job_survives_a_crash_of_the_videos_service(stack, client):
    """Killed mid-generation (SIGKILL, no goodbye), restarted by the supervisor: the job is re-run to the end."""
    video = client.videos.create(model=MODEL, prompt="a long take", seconds="12", size="1792x1024")
    deadline = time.monotonic() + 60
    while (seen := client.videos.retrieve(video.id)).progress == 0 or seen.status != "in_progress":
        assert seen.status in ("queued", "in_progress") and time.monotonic() < deadline, seen
        time.sleep(0.05)
    process = next(p for p in stack.processes if p.name.startswith("videos@"))
    process.popen.send_signal(signal.SIGKILL)
    process.popen.wait()
    deadline = time.monotonic() + 60
    while process.restarts == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process.restarts == 1
    done = None
    while time.monotonic() < deadline + 120:
        try:
            done = client.videos.retrieve(video.id)
        except (openai.APIConnectionError, openai.InternalServerError, openai.APIStatusError):
            time.sleep(0.2)  # the backend is still coming back
            continue
        if done.status in ("completed", "failed"):
            break
        time.sleep(0.25)
    assert done is not None and done.status == "completed", done
    assert len(_frames(client.videos.download_content(video.id).read())) == 12 * FPS


def test_job_survives_a_restart_of_the_edge(stack, client):
    """Jobs live in the videos service: an edge that dies mid-generation loses nothing."""
    video = client.videos.create(model=MODEL, prompt="through an edge restart", seconds="8")
    edge = stack.process("edge")
    edge.popen.send_signal(signal.SIGKILL)
    edge.popen.wait()
    deadline = time.monotonic() + 120
    done = None
    while time.monotonic() < deadline:
        try:
            done = client.videos.retrieve(video.id)
        except (openai.APIConnectionError, openai.APIStatusError):
            time.sleep(0.2)
            continue
        if done.status in ("completed", "failed"):
            break
        time.sleep(0.25)
    assert edge.restarts >= 1
    assert done is not None and done.status == "completed", done
