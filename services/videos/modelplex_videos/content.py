"""Where finished videos and their previews live: an interface and a local-directory implementation.

An object store (S3, GCS) can implement the same four methods later; a mounted
volume shared by replicas works with :class:`LocalContentStore` as is.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

VARIANTS = {"video": ("video.mp4", "video/mp4"), "thumbnail": ("thumbnail.webp", "image/webp"),
            "spritesheet": ("spritesheet.jpg", "image/jpeg"),
            # The uploaded input_reference of a job; not downloadable.
            "reference": ("reference.bin", "application/octet-stream")}
PUBLIC_VARIANTS = ("video", "thumbnail", "spritesheet")
CHUNK_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class StoredObject:
    size: int
    etag: str
    mime_type: str


class ContentStore(Protocol):
    def put(self, job_id: str, variant: str, data: bytes) -> None: ...

    def stat(self, job_id: str, variant: str) -> StoredObject | None: ...

    def read(self, job_id: str, variant: str, offset: int, length: int) -> Iterator[bytes]:
        """Bytes [offset, offset + length) in chunks."""
        ...

    def delete(self, job_id: str) -> None: ...


class LocalContentStore:
    """One folder per job; files are written under a temporary name and renamed (readers never see half a file)."""

    def __init__(self, root: Path) -> None:
        self._root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, job_id: str, variant: str) -> Path:
        return self._root / job_id / VARIANTS[variant][0]

    def put(self, job_id: str, variant: str, data: bytes) -> None:
        path = self._path(job_id, variant)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_bytes(data)
        # The ETag is the content's hash, computed once and kept beside it.
        path.with_suffix(".etag").write_text(hashlib.sha256(data).hexdigest()[:32])
        os.replace(partial, path)

    def stat(self, job_id: str, variant: str) -> StoredObject | None:
        path = self._path(job_id, variant)
        try:
            return StoredObject(path.stat().st_size, path.with_suffix(".etag").read_text(), VARIANTS[variant][1])
        except FileNotFoundError:
            return None

    def read(self, job_id: str, variant: str, offset: int, length: int) -> Iterator[bytes]:
        with self._path(job_id, variant).open("rb") as file:
            file.seek(offset)
            left = length
            while left > 0 and (chunk := file.read(min(CHUNK_BYTES, left))):
                left -= len(chunk)
                yield chunk

    def delete(self, job_id: str) -> None:
        shutil.rmtree(self._root / job_id, ignore_errors=True)
