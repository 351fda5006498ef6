"""Where finished videos, their previews and uploaded references live: objects of the kit's object store.

Keys are ``videos/<job id>/<file>``. With an ``s3`` store (``MODELPLEX_VIDEOS_OBJECT_STORE=s3``) every
replica reads and writes the same bucket, so replicas need no shared volume; the ``local`` store (the
default, ``<data_dir>/content``) serves one replica, or several on a shared volume.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from modelplex_kit.objectstore import ObjectStore, StoredObject

VARIANTS = {"video": ("video.mp4", "video/mp4"), "thumbnail": ("thumbnail.webp", "image/webp"),
            "spritesheet": ("spritesheet.jpg", "image/jpeg"),
            # The uploaded input_reference of a job; not downloadable.
            "reference": ("reference.bin", "application/octet-stream")}
PUBLIC_VARIANTS = ("video", "thumbnail", "spritesheet")


def _key(job_id: str, variant: str) -> str:
    return f"videos/{job_id}/{VARIANTS[variant][0]}"


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


class VideoContent:
    """A job's files on an :class:`ObjectStore`."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    async def put(self, job_id: str, variant: str, data: bytes, expires_at: int = 0) -> StoredObject:
        return await self.store.put(_key(job_id, variant), _once(data), content_type=VARIANTS[variant][1],
                                    expires_at=expires_at)

    async def stat(self, job_id: str, variant: str) -> StoredObject | None:
        return await self.store.stat(_key(job_id, variant))

    def read(self, job_id: str, variant: str, offset: int = 0, length: int = -1) -> AsyncIterator[bytes]:
        """Bytes [offset, offset + length) (-1: to the end) in chunks; KeyError if absent."""
        return self.store.get(_key(job_id, variant), offset, length)

    async def read_all(self, job_id: str, variant: str) -> bytes:
        return b"".join([chunk async for chunk in self.read(job_id, variant)])

    async def delete(self, job_id: str) -> None:
        for variant in VARIANTS:
            await self.store.delete(_key(job_id, variant))

    async def close(self) -> None:
        await self.store.close()
