"""The object store contract, run against both implementations: the local directory and S3 (moto's real
S3-protocol server, tests/support/s3_server.py)."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from modelplex_kit.objectstore import (
    LocalObjectStore,
    ObjectStoreSettings,
    TooLarge,
    expired,
    open_object_store,
)
from modelplex_kit.objectstore.s3 import MIN_PART_BYTES, S3ObjectStore
from tests.support.s3_server import S3Server

pytestmark = pytest.mark.integration
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def s3_server():
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture(params=["local", "s3"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def bucket(kind, s3_server) -> str:
    return s3_server.new_bucket() if kind == "s3" else ""


@pytest.fixture
async def store(kind, bucket, s3_server, tmp_path):
    local = {"MODELPLEX_TEST_OBJECT_STORE_DIR": str(tmp_path)}
    env = s3_server.env("MODELPLEX_TEST_", bucket) if kind == "s3" else local
    opened = open_object_store(_settings(env, part_bytes=MIN_PART_BYTES))
    yield opened
    await opened.close()


def _settings(env: dict[str, str], part_bytes: int = 8 * MiB) -> ObjectStoreSettings:
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        return ObjectStoreSettings(_env_prefix="MODELPLEX_TEST_", object_store_part_bytes=part_bytes)
    finally:
        os.environ.clear()
        os.environ.update(saved)


async def stream(data: bytes, chunk: int = 64 * 1024, fail_after: int = -1):
    for start in range(0, len(data), chunk):
        if 0 <= fail_after <= start:
            raise RuntimeError("the client went away")
        yield data[start:start + chunk]
        await asyncio.sleep(0)


async def read(store, key: str, offset: int = 0, length: int = -1) -> bytes:
    return b"".join([chunk async for chunk in store.get(key, offset, length)])


async def test_put_stat_get(store):
    data = os.urandom(300_000)
    put = await store.put("files/p1/a.jsonl", stream(data), content_type="application/jsonl", expires_at=1234)
    assert (put.key, put.size, put.content_type, put.expires_at) == ("files/p1/a.jsonl", len(data), "application/jsonl",
                                                                      1234)
    assert len(put.etag) == 32 and int(put.etag, 16) >= 0
    assert await store.stat("files/p1/a.jsonl") == put
    assert await read(store, "files/p1/a.jsonl") == data


async def test_ranges(store):
    data = bytes(range(256)) * 4000  # 1,024,000 bytes: several chunks
    await store.put("r", stream(data))
    assert await read(store, "r", 10, 5) == data[10:15]
    assert await read(store, "r", 1000) == data[1000:]
    assert await read(store, "r", len(data) - 3, 100) == data[-3:]  # clipped at the end
    assert await read(store, "r", 300_000, 400_000) == data[300_000:700_000]
    assert await read(store, "r", len(data)) == b""  # past the end: nothing, not an error
    assert await read(store, "r", len(data) + 10, 5) == b""
    assert await read(store, "r", 7, 0) == b""


async def test_absent_keys(store):
    assert await store.stat("nothing/here") is None
    with pytest.raises(KeyError):
        await read(store, "nothing/here")
    with pytest.raises(KeyError):
        await read(store, "nothing/here", 5, 10)
    await store.delete("nothing/here")  # no error


async def test_bad_keys_are_refused(store):
    for key in ("", "../escape", "a/../../b", "/absolute"):
        with pytest.raises(ValueError):
            await store.put(key, stream(b"x"))


async def test_delete(store):
    await store.put("d/x", stream(b"gone soon"))
    await store.delete("d/x")
    assert await store.stat("d/x") is None
    assert [obj async for obj in store.list("d/")] == []


async def test_list_is_a_string_prefix_in_key_order_and_expiry(store):
    for key, expires_at in [("files/p1/file-b", 100), ("files/p1/file-a", 0), ("files/p10/file-c", 50),
                            ("files/p1/sub/file-d", 300), ("videos/v1/video.mp4", 10)]:
        await store.put(key, stream(key.encode()), expires_at=expires_at)
    listed = [obj async for obj in store.list("files/p1/")]
    assert [obj.key for obj in listed] == ["files/p1/file-a", "files/p1/file-b", "files/p1/sub/file-d"]
    assert [obj.size for obj in listed] == [len(obj.key) for obj in listed]
    assert [obj.key async for obj in store.list("files/p1/fi")] == ["files/p1/file-a", "files/p1/file-b"]
    assert [obj.key async for obj in store.list("files/p1")] == [
        "files/p1/file-a", "files/p1/file-b", "files/p1/sub/file-d", "files/p10/file-c"]
    assert len([obj async for obj in store.list("")]) == 5
    due = await expired(store, "files/", now=100)
    assert sorted(obj.key for obj in due) == ["files/p1/file-b", "files/p10/file-c"]


async def test_replace(store):
    first = await store.put("k", stream(b"first version"), content_type="text/plain", expires_at=5)
    second = await store.put("k", stream(b"second, longer version"), content_type="application/json")
    assert second.etag != first.etag
    assert await store.stat("k") == second
    assert (await store.stat("k")).expires_at == 0
    assert await read(store, "k") == b"second, longer version"


@pytest.mark.parametrize("size", [200_000, 12 * MiB], ids=["one-part", "multipart"])
async def test_too_large_stores_nothing_and_keeps_the_old_object(store, kind, bucket, s3_server, size):
    await store.put("big", stream(b"the old one"))
    with pytest.raises(TooLarge):
        await store.put("big", stream(os.urandom(size), chunk=256 * 1024), max_bytes=size - 1)
    with pytest.raises(TooLarge):
        await store.put("new", stream(os.urandom(size), chunk=256 * 1024), max_bytes=size - 1)
    assert await read(store, "big") == b"the old one"
    assert await store.stat("new") is None
    assert [obj.key async for obj in store.list("")] == ["big"]
    if kind == "s3":  # no hidden parts left behind either
        assert not s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads")


@pytest.mark.parametrize("size", [200_000, 12 * MiB], ids=["one-part", "multipart"])
async def test_a_failed_stream_stores_nothing(store, kind, bucket, s3_server, size):
    with pytest.raises(RuntimeError):
        await store.put("broken", stream(os.urandom(size), fail_after=size // 2))
    assert await store.stat("broken") is None
    if kind == "s3":
        assert not s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads")


async def test_large_object_goes_up_in_parts(store, kind, bucket, s3_server):
    data = os.urandom(12 * MiB + 12345)  # three 5 MiB parts with MIN_PART_BYTES
    put = await store.put("videos/v/video.mp4", stream(data, chunk=256 * 1024), content_type="video/mp4",
                          expires_at=99, max_bytes=len(data))
    assert put.size == len(data) and await store.stat("videos/v/video.mp4") == put
    got = await read(store, "videos/v/video.mp4")
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    boundary = MIN_PART_BYTES
    assert await read(store, "videos/v/video.mp4", boundary - 100, 200) == data[boundary - 100:boundary + 100]
    if kind == "s3":
        head = s3_server.client().head_object(Bucket=bucket, Key="videos/v/video.mp4")
        assert head["ETag"].strip('"').endswith("-3")  # S3 saw a three-part upload
        assert head["Metadata"] == {"expires-at": "99"} and head["ContentType"] == "video/mp4"


async def test_concurrent_readers_never_see_half_an_object(store):
    size = 6 * MiB  # above one part: the S3 store uploads it in parts
    versions = [bytes([n]) * size for n in range(3)]
    await store.put("hot", stream(versions[0], chunk=512 * 1024))
    seen: set[int] = set()
    writing = True

    async def writer() -> None:
        nonlocal writing
        for version in versions[1:] * 2:
            await store.put("hot", stream(version, chunk=512 * 1024))
        writing = False

    async def reader() -> None:
        while writing:
            got = await read(store, "hot")
            assert len(got) == size and got.count(got[:1]) == size, "a mix of two versions"
            seen.add(got[0])

    await asyncio.wait_for(asyncio.gather(writer(), reader(), reader()), timeout=240)
    assert seen and await read(store, "hot") == versions[2]


async def test_an_object_being_replaced_is_never_missing(store):
    # A batch's record is rewritten at every step while clients poll it: no poll may find it absent.
    await store.put("record", stream(b"{}"))
    writing = True

    async def writer() -> None:
        nonlocal writing
        for n in range(150):
            await store.put("record", stream(b"x" * (1 + n % 7) * 100), content_type="application/json")
        writing = False

    async def poller() -> None:
        while writing:
            assert await store.stat("record") is not None, "the object vanished while it was being replaced"
            await asyncio.sleep(0)

    await asyncio.wait_for(asyncio.gather(writer(), poller(), poller()), timeout=120)


def test_settings_open_the_named_store(s3_server, tmp_path):
    local = open_object_store(ObjectStoreSettings(), default_dir=tmp_path / "content")
    assert isinstance(local, LocalObjectStore) and (tmp_path / "content").is_dir()
    s3 = open_object_store(_settings(s3_server.env("MODELPLEX_TEST_", "some-bucket")))
    assert isinstance(s3, S3ObjectStore)
    with pytest.raises(ValueError, match="object_store_bucket"):
        _settings({"MODELPLEX_TEST_OBJECT_STORE": "s3"})
    with pytest.raises(ValueError, match="part"):
        ObjectStoreSettings(object_store_part_bytes=MiB)
    secret = _settings(s3_server.env("MODELPLEX_TEST_", "b"))
    assert "modelplex-test-secret" not in repr(secret)  # the key never reaches a log line


async def test_s3_prefix_keeps_services_apart(s3_server):
    bucket = s3_server.new_bucket()
    env = s3_server.env("MODELPLEX_TEST_", bucket)
    videos = open_object_store(_settings({**env, "MODELPLEX_TEST_OBJECT_STORE_PREFIX": "videos"}))
    files = open_object_store(_settings({**env, "MODELPLEX_TEST_OBJECT_STORE_PREFIX": "files/"}))
    await videos.put("a", stream(b"video"))
    await files.put("a", stream(b"file"))
    assert await read(videos, "a") == b"video" and await read(files, "a") == b"file"
    assert [obj.key async for obj in videos.list("")] == ["a"]
    keys = sorted(obj["Key"] for obj in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == ["files/a", "videos/a"]
