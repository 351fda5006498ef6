"""Where stored objects live (batch input and output files, finished videos): one small interface.

Every object is addressed by a key (``files/<project>/<id>``, ``videos/<id>/video.mp4``) and
written as a stream, so no writer holds a whole object in memory; readers take byte ranges.
An object may carry an expiry: ``list`` reports it and ``expired`` finds what is due, so the
owner (the Files API, the videos service) deletes it; no store relies on a bucket lifecycle rule.

Implementations: :class:`LocalObjectStore` (``local``: one directory, ``make run``; several
replicas need a shared volume) and ``modelplex_kit.objectstore.s3`` (``s3``: any S3-protocol
endpoint). ``open_object_store`` picks one from :class:`ObjectStoreSettings`.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Protocol

#: Reads and writes move this much at a time.
CHUNK_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str
    size: int
    #: The content's hash (hex, 32 characters): an HTTP ETag and a check that a copy is whole.
    etag: str
    content_type: str = "application/octet-stream"
    #: Unix seconds after which the object's owner deletes it; 0: never.
    expires_at: int = 0


class ObjectStore(Protocol):
    async def put(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str = "application/octet-stream",
        expires_at: int = 0,
        max_bytes: int = 0,
    ) -> StoredObject:
        """Stores the stream under ``key`` (replacing one there), visible only once whole.

        ``max_bytes`` (0: no bound) stops a longer stream with :class:`TooLarge`, storing nothing.
        """
        ...

    async def stat(self, key: str) -> StoredObject | None: ...

    def get(self, key: str, offset: int = 0, length: int = -1) -> AsyncIterator[bytes]:
        """Bytes [offset, offset + length) (length -1: to the end) in chunks; KeyError if absent."""
        ...

    async def delete(self, key: str) -> None:
        """Removes the object; nothing if it is absent."""
        ...

    def list(self, prefix: str) -> AsyncIterator[StoredObject]:
        """Every object whose key starts with ``prefix``, in key order."""
        ...

    async def close(self) -> None: ...


class TooLarge(ValueError):
    """A stream passed ``max_bytes``; nothing was stored."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"more than {max_bytes} bytes")
        self.max_bytes = max_bytes


async def expired(store: ObjectStore, prefix: str, now: int) -> list[StoredObject]:
    """The objects under ``prefix`` whose expiry has passed."""
    return [obj async for obj in store.list(prefix) if obj.expires_at and obj.expires_at <= now]


from modelplex_kit.objectstore.local import LocalObjectStore  # noqa: E402  (it imports the names above)
from modelplex_kit.objectstore.settings import ObjectStoreSettings, open_object_store  # noqa: E402

__all__ = [
    "CHUNK_BYTES", "LocalObjectStore", "ObjectStore", "ObjectStoreSettings", "StoredObject", "TooLarge", "expired",
    "open_object_store",
]
