"""The chart's objectStore: the videos backends and the edge get the bucket, the endpoint and the credentials
(from a Secret, never in the manifest), under their own env prefixes; the settings they name exist."""

from __future__ import annotations

from typing import Any

import pytest

from modelplex_videos.settings import VideosSettings
from tests.deploy.test_helm import RELEASE, container, env, find, one, render

VIDEO_MODEL = {"id": "v", "modality": "videos", "engine": {"kind": "procedural"}}
IMAGE_MODEL = {"id": "i", "modality": "images", "engine": {"kind": "procedural"}}
S3 = {"kind": "s3", "bucket": "modelplex-media", "endpoint": "http://minio.minio:9000", "region": "eu-west-1",
      "prefix": "prod", "secretName": "s3-credentials"}


def objects_with(object_store: dict[str, Any] | None) -> list[dict[str, Any]]:
    values: dict[str, Any] = {"models": [VIDEO_MODEL, IMAGE_MODEL]}
    if object_store is not None:
        values["objectStore"] = object_store
    return render(values)


def store_env(c: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in env(c).items() if "_OBJECT_STORE" in name}


def test_local_by_default_sets_nothing() -> None:
    objects = objects_with(None)
    for deployment in find(objects, "Deployment"):
        for c in deployment["spec"]["template"]["spec"]["containers"]:
            assert store_env(c) == {}, deployment["metadata"]["name"]


def test_s3_reaches_the_videos_backend_and_the_edge_with_credentials_from_the_secret() -> None:
    objects = objects_with(S3)
    videos = store_env(container(one(objects, "Deployment", f"{RELEASE}-videos-v")))
    assert videos == {
        "MODELPLEX_VIDEOS_OBJECT_STORE": "s3",
        "MODELPLEX_VIDEOS_OBJECT_STORE_BUCKET": "modelplex-media",
        "MODELPLEX_VIDEOS_OBJECT_STORE_PREFIX": "prod",
        "MODELPLEX_VIDEOS_OBJECT_STORE_ENDPOINT_URL": "http://minio.minio:9000",
        "MODELPLEX_VIDEOS_OBJECT_STORE_REGION": "eu-west-1",
        "MODELPLEX_VIDEOS_OBJECT_STORE_ADDRESSING_STYLE": "path",
        "MODELPLEX_VIDEOS_OBJECT_STORE_ACCESS_KEY_ID": {
            "secretKeyRef": {"name": "s3-credentials", "key": "access-key-id"}},
        "MODELPLEX_VIDEOS_OBJECT_STORE_SECRET_ACCESS_KEY": {
            "secretKeyRef": {"name": "s3-credentials", "key": "secret-access-key"}},
    }
    edge = store_env(container(one(objects, "Deployment", f"{RELEASE}-edge"), "edge"))
    assert edge == {name.replace("_VIDEOS_", "_EDGE_"): value for name, value in videos.items()}
    # Backends without objects (images) get none of it.
    assert store_env(container(one(objects, "Deployment", f"{RELEASE}-images-i"))) == {}


def test_the_rendered_settings_are_the_ones_the_videos_backend_reads(monkeypatch) -> None:
    rendered = env(container(one(objects_with(S3), "Deployment", f"{RELEASE}-videos-v")))
    for name, value in rendered.items():
        if name.startswith("MODELPLEX_"):
            monkeypatch.setenv(name, value if isinstance(value, str) else "from-the-secret")
    settings = VideosSettings()
    assert (settings.object_store, settings.object_store_bucket, settings.object_store_endpoint_url) == (
        "s3", "modelplex-media", "http://minio.minio:9000")
    assert settings.object_store_prefix == "prod" and settings.object_store_region == "eu-west-1"
    assert settings.object_store_secret_access_key.get_secret_value() == "from-the-secret"


def test_without_a_secret_the_pods_own_credentials_are_used() -> None:
    videos = store_env(container(one(objects_with({**S3, "secretName": ""}), "Deployment", f"{RELEASE}-videos-v")))
    assert "MODELPLEX_VIDEOS_OBJECT_STORE_ACCESS_KEY_ID" not in videos
    assert videos["MODELPLEX_VIDEOS_OBJECT_STORE"] == "s3"


@pytest.mark.parametrize("bad", [
    {"kind": "s3"}, {"kind": "gcs"}, {"kind": "s3", "bucket": "b", "endpoint": "minio:9000"},
    {"kind": "s3", "bucket": "b", "addressingStyle": "dns"},
])
def test_bad_object_store_values_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(Exception, match="objectStore"):
        objects_with(bad)
