"""Files in the object store: each file's bytes and its OpenAI ``File`` record, side by side.

Keys: ``files/<scope>/<id>`` (the content) and ``files/<scope>/<id>.json`` (the record), where scope is a
hash of the owner's project, so one project never reads another's, and names from a keys file need no
escaping. The object store is built here, in one place (``open_objects``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from modelplex_edge.settings import EdgeSettings
from modelplex_kit.objectstore import ObjectStore
from modelplex_kit.objectstore.settings import open_object_store

_RECORD = ".json"


def open_objects(settings: EdgeSettings) -> ObjectStore:
    """The edge's object store: MODELPLEX_EDGE_OBJECT_STORE (local: object_store_dir or object_dir; s3)."""
    return open_object_store(settings, default_dir=settings.object_dir)


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def scope_key(scope: str) -> str:
    return hashlib.sha256(scope.encode()).hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class FileRecord:
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    #: Unix seconds after which the file is gone; 0: never.
    expires_at: int = 0

    def wire(self) -> dict[str, Any]:
        """OpenAI's File object."""
        body: dict[str, Any] = {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }
        if self.expires_at:
            body["expires_at"] = self.expires_at
        return body

    def expired(self, now: float) -> bool:
        return bool(self.expires_at) and self.expires_at <= now


async def read_small(objects: ObjectStore, key: str) -> bytes | None:
    """A small object whole (a record), or None if absent."""
    try:
        return b"".join([chunk async for chunk in objects.get(key)])
    except KeyError:
        return None


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


class FileStore:
    def __init__(self, objects: ObjectStore) -> None:
        self._objects = objects

    @staticmethod
    def _key(scope: str, file_id: str) -> str:
        return f"files/{scope_key(scope)}/{file_id}"

    async def put(
        self,
        scope: str,
        chunks: AsyncIterable[bytes],
        *,
        filename: str,
        purpose: str,
        expires_at: int = 0,
        max_bytes: int = 0,
        file_id: str = "",
    ) -> FileRecord:
        """Stores the content as it streams (TooLarge past ``max_bytes``, nothing stored), then its record."""
        file_id = file_id or new_file_id()
        key = self._key(scope, file_id)
        stored = await self._objects.put(
            key, chunks, content_type="application/jsonl", expires_at=expires_at, max_bytes=max_bytes
        )
        record = FileRecord(file_id, stored.size, int(time.time()), filename, purpose, expires_at)
        await self._objects.put(key + _RECORD, _one(orjson.dumps(dataclasses.asdict(record))), expires_at=expires_at)
        return record

    async def get(self, scope: str, file_id: str) -> FileRecord | None:
        """The record of a file that is there and not expired."""
        if not file_id.startswith("file-") or "/" in file_id or "." in file_id:
            return None
        raw = await read_small(self._objects, self._key(scope, file_id) + _RECORD)
        if raw is None:
            return None
        record = FileRecord(**orjson.loads(raw))
        return None if record.expired(time.time()) else record

    def content(self, scope: str, file_id: str) -> AsyncIterator[bytes]:
        return self._objects.get(self._key(scope, file_id))

    async def list(self, scope: str) -> list[FileRecord]:
        """The scope's files, oldest first."""
        now = time.time()
        records = []
        async for obj in self._objects.list(f"files/{scope_key(scope)}/"):
            if obj.key.endswith(_RECORD) and (raw := await read_small(self._objects, obj.key)) is not None:
                record = FileRecord(**orjson.loads(raw))
                if not record.expired(now):
                    records.append(record)
        return sorted(records, key=lambda r: (r.created_at, r.id))

    async def delete(self, scope: str, file_id: str) -> bool:
        if await self.get(scope, file_id) is None:
            return False
        key = self._key(scope, file_id)
        await self._objects.delete(key + _RECORD)  # first: a half-deleted file is gone, never a record alone
        await self._objects.delete(key)
        return True

    async def sweep(self, now: int) -> int:
        """Deletes every file past its expiry (any scope); returns how many objects went."""
        gone = 0
        async for obj in self._objects.list("files/"):
            if obj.expires_at and obj.expires_at <= now:
                await self._objects.delete(obj.key)
                gone += 1
        return gone
