"""Which object store a service opens: settings read under the service's own env prefix, and the factory.

A service's settings class inherits :class:`ObjectStoreSettings` (``MODELPLEX_VIDEOS_OBJECT_STORE=s3``,
``MODELPLEX_VIDEOS_OBJECT_STORE_BUCKET=...``), or reads it alone under a prefix:
``ObjectStoreSettings(_env_prefix="MODELPLEX_EDGE_")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from modelplex_kit.objectstore import ObjectStore
from modelplex_kit.objectstore.local import LocalObjectStore


class ObjectStoreSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    # local: one directory (several replicas need it on a shared volume). s3: any S3-protocol endpoint.
    object_store: Literal["local", "s3"] = "local"
    # local: the directory; empty: the service's default (e.g. the videos service's <data_dir>/content).
    object_store_dir: str = ""
    # s3: the bucket (it must exist), and a key prefix inside it, so services can share one bucket.
    object_store_bucket: str = ""
    object_store_prefix: str = ""
    # s3: empty for AWS S3 (from the region); e.g. http://minio:9000, https://storage.googleapis.com.
    object_store_endpoint_url: str = ""
    object_store_region: str = ""
    # s3: empty credentials fall back to the environment (AWS_ACCESS_KEY_ID, ...) or an instance role.
    object_store_access_key_id: str = ""
    object_store_secret_access_key: SecretStr = SecretStr("")
    # s3: path (https://host/bucket/key; MinIO, Ceph, GCS) or virtual (https://bucket.host/key; an
    # endpoint URL given with it must then name the bucket's host).
    object_store_addressing_style: Literal["path", "virtual"] = "path"
    # s3: objects longer than one part are uploaded in parts of this size (S3's minimum is 5 MiB).
    object_store_part_bytes: int = Field(8 * 1024 * 1024, ge=5 * 1024 * 1024)
    # s3: the longest one request may take (a download streams in one GET).
    object_store_timeout_seconds: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _s3_needs_a_bucket(self) -> ObjectStoreSettings:
        if self.object_store == "s3" and not self.object_store_bucket:
            raise ValueError("object_store=s3 needs object_store_bucket")
        return self


def open_object_store(settings: ObjectStoreSettings, default_dir: Path | str = "") -> ObjectStore:
    """The store ``settings`` name; ``default_dir`` is the local store's directory when none is set."""
    if settings.object_store == "s3":
        from modelplex_kit.objectstore.s3 import S3ObjectStore

        return S3ObjectStore.connect(
            settings.object_store_bucket,
            prefix=settings.object_store_prefix,
            endpoint_url=settings.object_store_endpoint_url,
            region=settings.object_store_region,
            access_key_id=settings.object_store_access_key_id,
            secret_access_key=settings.object_store_secret_access_key.get_secret_value(),
            virtual_hosted=settings.object_store_addressing_style == "virtual",
            part_bytes=settings.object_store_part_bytes,
            timeout_seconds=settings.object_store_timeout_seconds,
        )
    directory = settings.object_store_dir or str(default_dir)
    if not directory:
        raise ValueError("object_store=local needs object_store_dir")
    return LocalObjectStore(Path(directory))
